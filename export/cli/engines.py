"""Engines behind `--engine`: each has forward(tokens int64 [T], start_pos) -> fp32 logits [T, vocab] and reset().

torch: our export/nn model in eager mode, on a checkpoint. reference: the independent numpy runtime (runtime_py),
on a checkpoint. Every registered target: that target's runner (runtime_py/runners/<target>.py) on a bundle.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets import targets

CHECKPOINT_ENGINES = ("torch", "reference")


def engine_names() -> tuple[str, ...]:
    return CHECKPOINT_ENGINES + tuple(targets())


class TorchEngine:
    def __init__(self, ckpt, max_context: int | None, dtype: str | None):
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


class BundleSource:
    """A bundle seen by the run commands where they expect a checkpoint: `.dir` holds the tokenizer, `.spec` the
    few spec values they read (from the verified manifest)."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], threads: int | None = None):
        self.dir, self.manifest, self.threads = Path(bundle), manifest, threads
        model, tok = manifest["model"], manifest["tokenizer"]
        self.max_context = int(model["max_context"])  # the KV cache size, fixed at export
        self.spec = SimpleNamespace(vocab_size=model["vocab_size"], max_position_embeddings=model["max_context"],
                                    bos_token_id=tok["bos_id"], eos_token_ids=tuple(tok["eos_ids"]),
                                    family=manifest["architecture"])


def open_source(checkpoint, bundle, engine_name: str, threads: int | None = None):
    """What a command runs: the checkpoint (torch, reference) or, for a target's engine, the bundle (its manifest
    verified). Reads config.json / manifest.json only; run_options.check_engine has checked the combination."""
    if engine_name not in CHECKPOINT_ENGINES:
        from pocketllm.export.bundle.manifest import read_manifest

        return BundleSource(Path(bundle), read_manifest(bundle, verify=True), threads)
    from pocketllm.export.checkpoint import open_checkpoint

    return open_checkpoint(checkpoint)


def make_engine(name: str, source, max_context: int | None = None, dtype: str | None = None):
    if name == "torch":
        return TorchEngine(source, max_context, dtype)
    if name == "reference":
        from pocketllm.runtime_py import ReferenceModel

        return ReferenceModel.from_checkpoint(source.dir, max_context=max_context)
    if name in targets():  # source is a BundleSource (open_source); the cache size is the bundle's
        from pocketllm.runtime_py.runners import open_runner

        return open_runner(source.dir, name, threads=source.threads, verify=False)
    raise PocketllmError(f"unknown --engine {name!r} (expected one of: {', '.join(engine_names())})")
