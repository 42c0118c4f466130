"""Engines behind `--engine`: each has forward(tokens int64 [T], start_pos) -> fp32 logits [T, vocab] and reset().

torch: our export/nn model in eager mode. reference: the independent numpy runtime (runtime_py).
"""

from __future__ import annotations

import numpy as np

from export.checkpoint import Checkpoint
from export.errors import PocketllmError

ENGINES = ("torch", "reference")


class TorchEngine:
    def __init__(self, ckpt: Checkpoint, max_context: int | None, dtype: str | None):
        import torch

        from export.nn import load_model

        self.torch = torch
        self.model, _ = load_model(ckpt, max_context=max_context, dtype=dtype)
        self.max_context = self.model.max_context

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        with self.torch.no_grad():
            t = self.torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
            return self.model(t, start_pos)[0].float().numpy()

    def reset(self) -> None:
        self.model.reset_cache()


def make_engine(name: str, ckpt: Checkpoint, max_context: int | None = None, dtype: str | None = None):
    if name == "torch":
        return TorchEngine(ckpt, max_context, dtype)
    if name == "reference":
        from runtime_py import ReferenceModel

        return ReferenceModel.from_checkpoint(ckpt.dir, max_context=max_context)
    raise PocketllmError(f"unknown --engine {name!r} (expected one of: {', '.join(ENGINES)})")
