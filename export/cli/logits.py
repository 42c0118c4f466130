"""`pocketllm logits`: the logits of a token sequence through an engine, to a .npy file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import typer

from pocketllm.export.atomic import atomic_write
from pocketllm.export.cli.common import console, set_threads, threads_option, user_errors
from pocketllm.export.cli.engines import make_engine, open_source
from pocketllm.export.cli.run_options import (DType, Engine, bundle_option, check_context, check_engine,
                                              compute_dtype, checkpoint_option, dtype_option, engine_option,
                                              max_context_option, parse_tokens)
from pocketllm.export.defaults import DEFAULT_MAX_CONTEXT
from pocketllm.export.outputs import check_out_file
from pocketllm.runtime_py.evaluate import run_logits


class Mode(str, Enum):
    prefill = "prefill"
    decode = "decode"


def logits(
    checkpoint: Path = checkpoint_option(),
    tokens: str = typer.Option(..., "--tokens", help="Comma-separated token ids, e.g. 1,2,3."),
    mode: Mode = typer.Option(Mode.prefill, "--mode", help="prefill: one call; decode: one token per step."),
    engine: Engine = engine_option(),
    out: Path = typer.Option(..., "--out", help="Where to write float32 logits [T, vocab] (.npy)."),
    max_context: int = max_context_option(),
    dtype: DType = dtype_option(),
    threads: int = threads_option(),
    bundle: Path = bundle_option(),
):
    """Write the logits of a token sequence to a .npy file."""
    _logits(checkpoint, tokens, mode.value, engine.value, out, max_context, dtype.value if dtype else None, threads,
            bundle)


@user_errors
def _logits(checkpoint, tokens, mode, engine_name, out, max_context, dtype, threads, bundle=None):
    check_engine(engine_name, checkpoint, bundle, dtype)
    check_out_file(out, "--out", inputs={"--checkpoint": checkpoint, "--bundle": bundle})
    set_threads(threads)
    source = open_source(checkpoint, bundle, engine_name, threads)
    ids = parse_tokens(tokens, source.spec.vocab_size)
    ctx = check_context(source, max_context, len(ids), f"--tokens ({len(ids)} ids)", "pass fewer --tokens",
                        default=DEFAULT_MAX_CONTEXT)
    engine = make_engine(engine_name, source, ctx, compute_dtype(dtype))
    result = run_logits(engine, ids, mode)
    atomic_write(out, lambda tmp: _save_npy(tmp, result))
    console.print(f"wrote {out} {list(result.shape)} float32 ({engine_name}, {mode})", highlight=False)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
