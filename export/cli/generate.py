"""`pocketllm generate`: stream a continuation of a prompt through an engine, then print prefill and decode speed.

stdout carries the text only (prompt + continuation + newline), so that it can be piped; the speed table goes to
stderr with the other messages."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from pocketllm.export.cli.common import console, set_threads, threads_option, user_errors
from pocketllm.export.cli.engines import make_engine, open_source
from pocketllm.export.cli.run_options import (DType, Engine, bundle_option, check_context, check_engine,
                                              compute_dtype, check_sampling, checkpoint_option, dtype_option,
                                              engine_option, max_context_option)
from pocketllm.export.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from pocketllm.export.errors import PocketllmError
from pocketllm.export.tokenizer import load_tokenizer


def generate(
    checkpoint: Path = checkpoint_option(),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="Always pick the most likely token (no sampling)."),
    temperature: float = typer.Option(None, "--temperature", help=f"Sampling temperature, > 0 (default "
                                      f"{DEFAULT_TEMPERATURE})."),
    top_p: float = typer.Option(None, "--top-p", help=f"Nucleus sampling mass, in (0, 1] (default {DEFAULT_TOP_P})."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    engine: Engine = engine_option(),
    max_context: int = max_context_option(),
    dtype: DType = dtype_option(),
    threads: int = threads_option(),
    bundle: Path = bundle_option(),
    expert_cache_mb: float = typer.Option(None, "--expert-cache-mb", min=0.0,
                                          help="Bundles with an expert store (--experts file): MiB of expert "
                                               "weights kept resident (0: no budget); default: the bundle's."),
):
    """Stream a continuation of PROMPT to stdout, then print prefill and decode speed (stderr)."""
    with expert_budget(expert_cache_mb):
        _generate(checkpoint, prompt, max_new_tokens, greedy, temperature, top_p, seed, engine.value, max_context,
                  dtype.value if dtype else None, threads, bundle)


@contextlib.contextmanager
def expert_budget(mib: float | None):
    """--expert-cache-mb for the ExecuTorch runner, which reads it from $POCKETLLM_EXPERT_CACHE_MB (set for this
    command only: in-process callers such as tests see their own environment again afterwards)."""
    if mib is None:
        yield
        return
    from pocketllm.runtime_py.runners.executorch import EXPERT_CACHE_ENV

    saved = os.environ.get(EXPERT_CACHE_ENV)
    os.environ[EXPERT_CACHE_ENV] = repr(mib)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(EXPERT_CACHE_ENV, None)
        else:
            os.environ[EXPERT_CACHE_ENV] = saved


@user_errors
def _generate(checkpoint, prompt, max_new_tokens, greedy, temperature, top_p, seed, engine_name, max_context,
              dtype, threads, bundle=None):
    from pocketllm.runtime_py.generate import generate as generate_loop

    check_engine(engine_name, checkpoint, bundle, dtype)
    temperature, top_p = check_sampling(greedy, temperature, top_p)
    set_threads(threads)
    source = open_source(checkpoint, bundle, engine_name, threads)
    spec = source.spec
    tok = load_tokenizer(source.dir, spec.bos_token_id)
    ids = tok.encode(prompt)
    if not ids:
        raise PocketllmError("--prompt is empty after tokenization")
    need = len(ids) + max_new_tokens
    ctx = check_context(source, max_context, need, f"the prompt ({len(ids)} tokens) + --max-new-tokens "
                        f"({max_new_tokens})", "lower --max-new-tokens or shorten the prompt",
                        default=DEFAULT_MAX_CONTEXT)
    engine = make_engine(engine_name, source, ctx, compute_dtype(dtype))

    out = sys.stdout
    out.write(prompt)
    out.flush()
    generated: list[int] = []
    shown = ""

    def on_token(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tok.decode_continuation(ids, generated)  # in context: SentencePiece drops a text's leading space
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    result = generate_loop(engine, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                           seed=seed, eos_ids=spec.eos_token_ids, on_token=on_token)
    out.write("\n")
    out.flush()
    table = Table(title=f"{engine_name} engine, {source.dir.name}", show_header=True)
    for col in ("phase", "tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    table.add_row("prefill", str(len(ids)), f"{result.prefill_seconds:.3f}", f"{result.prefill_tokens_per_s:.1f}")
    n_dec = max(len(result.tokens) - 1, 0)
    table.add_row("decode", str(n_dec), f"{result.decode_seconds:.3f}", f"{result.decode_tokens_per_s:.1f}")
    console.print(table)
    console.print(f"{result.decode_tokens_per_s:.1f} tokens/s", highlight=False)
