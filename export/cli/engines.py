"""Engines behind `--engine`: each has forward(tokens int64 [T], start_pos) -> fp32 logits [T, vocab] and reset().

torch: our export/nn model in eager mode. reference: the independent numpy runtime (runtime_py).
"""

from __future__ import annotations

import numpy as np

from pocketllm.export.checkpoint import Checkpoint
from pocketllm.export.errors import PocketllmError

ENGINES = ("torch", "reference", "executorch")


class TorchEngine:
    def __init__(self, ckpt: Checkpoint, max_context: int | None, dtype: str | None):
        import torch

        from pocketllm.export.nn import load_model

        self.torch = torch
        self.model, _ = load_model(ckpt, max_context=max_context, dtype=dtype)
        self.max_context = self.model.max_context

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        with self.torch.no_grad():
            t = self.torch.as_tensor(np.asarray(tokens, dtype=np.int64))[None]
            return self.model(t, start_pos)[0].float().numpy()

    def reset(self) -> None:
        self.model.reset_cache()


def open_source(checkpoint, bundle, engine_name: str, threads: int | None = None):
    """What a command runs: the checkpoint (torch, reference) or, for --engine executorch, the bundle."""
    if engine_name == "executorch":
        if bundle is None:
            raise PocketllmError("--engine executorch needs --bundle DIR (a bundle written by `pocketllm export`)")
        from pocketllm.export.bundle import BundleSource

        return BundleSource.open(bundle, threads)
    if bundle is not None:
        raise PocketllmError("--bundle is read by --engine executorch only")
    if checkpoint is None:
        raise PocketllmError(f"--engine {engine_name} needs --checkpoint DIR")
    from pocketllm.export.checkpoint import open_checkpoint

    return open_checkpoint(checkpoint)


def make_engine(name: str, ckpt: Checkpoint, max_context: int | None = None, dtype: str | None = None):
    if name == "executorch":  # ckpt is a BundleSource (open_source); the cache size is the bundle's
        from pocketllm.runtime_py.executorch_runner import ExecutorchEngine

        return ExecutorchEngine(ckpt.dir, verify=False, threads=ckpt.threads)
    if name == "torch":
        return TorchEngine(ckpt, max_context, dtype)
    if name == "reference":
        from pocketllm.runtime_py import ReferenceModel

        return ReferenceModel.from_checkpoint(ckpt.dir, max_context=max_context)
    raise PocketllmError(f"unknown --engine {name!r} (expected one of: {', '.join(ENGINES)})")
