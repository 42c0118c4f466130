"""`pocketllm logits`: the logits of a token sequence through an engine, to a .npy file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import typer

from pocketllm.export.atomic import atomic_write
from pocketllm.export.defaults import DEFAULT_MAX_CONTEXT
from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.cli.engines import make_engine, open_source
from pocketllm.export.cli.run_options import DType, Engine, parse_tokens
from pocketllm.export.errors import PocketllmError
from pocketllm.runtime_py.evaluate import run_logits


class Mode(str, Enum):
    prefill = "prefill"
    decode = "decode"


def logits(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Hugging Face style checkpoint directory."),
    tokens: str = typer.Option(..., "--tokens", help="Comma-separated token ids, e.g. 1,2,3."),
    mode: Mode = typer.Option(Mode.prefill, "--mode", help="prefill: one call; decode: one token per step."),
    engine: Engine = typer.Option("torch", "--engine", help="torch (our model), reference (numpy) or a target's "
                                  "runtime on --bundle."),
    out: Path = typer.Option(..., "--out", help="Where to write float32 logits [T, vocab] (.npy)."),
    max_context: int = typer.Option(None, "--max-context", help=f"KV cache length (default min(max pos, {DEFAULT_MAX_CONTEXT}))."),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="torch engine compute dtype (auto = checkpoint's)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle directory, for a target's engine."),
):
    """Write the logits of a token sequence to a .npy file."""
    _logits(checkpoint, tokens, mode.value, engine.value, out, max_context, dtype.value, threads, bundle)


@user_errors
def _logits(checkpoint, tokens, mode, engine_name, out, max_context, dtype, threads, bundle=None):
    set_threads(threads)
    ckpt = open_source(checkpoint, bundle, engine_name, threads)
    ids = parse_tokens(tokens, ckpt.spec.vocab_size)
    max_context = max_context or (ckpt.spec.max_position_embeddings if bundle is not None else  # the bundle's
                                  min(ckpt.spec.max_position_embeddings, DEFAULT_MAX_CONTEXT))
    max_context = min(max(max_context, len(ids)), ckpt.spec.max_position_embeddings)
    if len(ids) > max_context:
        raise PocketllmError(f"--tokens has {len(ids)} ids, more than the model's context ({max_context})")
    engine = make_engine(engine_name, ckpt, max_context, None if dtype == "auto" else dtype)
    result = run_logits(engine, ids, mode)
    atomic_write(out, lambda tmp: _save_npy(tmp, result))
    console.print(f"wrote {out} {list(result.shape)} float32 ({engine_name}, {mode})")


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
