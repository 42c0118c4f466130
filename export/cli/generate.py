"""`pocketllm generate`: stream a continuation of a prompt through an engine, then print prefill and decode speed."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from pocketllm.export.defaults import DEFAULT_MAX_CONTEXT
from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.cli.engines import make_engine, open_source
from pocketllm.export.cli.run_options import DType, Engine
from pocketllm.export.errors import PocketllmError
from pocketllm.export.tokenizer import load_tokenizer


def generate(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Hugging Face style checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="Always pick the most likely token."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    engine: Engine = typer.Option("torch", "--engine"),
    max_context: int = typer.Option(None, "--max-context", help=f"KV cache length (default min(max pos, {DEFAULT_MAX_CONTEXT}))."),
    dtype: DType = typer.Option(DType.fp32, "--dtype"),
    threads: int = typer.Option(None, "--threads"),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle directory, for a target's engine."),
    expert_cache_mb: float = typer.Option(None, "--expert-cache-mb", min=0.0,
                                          help="Bundles with an expert store (--experts file): MiB of expert "
                                               "weights kept resident (0: no budget); default: the bundle's."),
):
    """Stream a continuation of PROMPT, then print prefill and decode speed."""
    if expert_cache_mb is not None:  # read by the ExecuTorch runner (runtime_py/runners/executorch.py)
        import os

        from pocketllm.runtime_py.runners.executorch import EXPERT_CACHE_ENV

        os.environ[EXPERT_CACHE_ENV] = repr(expert_cache_mb)
    _generate(checkpoint, prompt, max_new_tokens, greedy, temperature, top_p, seed, engine.value, max_context,
              dtype.value, threads, bundle)


@user_errors
def _generate(checkpoint, prompt, max_new_tokens, greedy, temperature, top_p, seed, engine_name, max_context,
              dtype, threads, bundle=None):
    from pocketllm.runtime_py.generate import generate as generate_loop

    set_threads(threads)
    ckpt = open_source(checkpoint, bundle, engine_name, threads)
    spec = ckpt.spec
    tok = load_tokenizer(ckpt.dir, spec.bos_token_id)
    ids = tok.encode(prompt)
    if not ids:
        raise PocketllmError("--prompt is empty after tokenization")
    need = len(ids) + max_new_tokens
    ctx = max_context or min(spec.max_position_embeddings, max(need, 256))
    if need > ctx:
        raise PocketllmError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                             f"context ({ctx}); lower --max-new-tokens or raise --max-context")
    engine = make_engine(engine_name, ckpt, ctx, None if dtype == "auto" else dtype)

    out = sys.stdout
    out.write(prompt)
    out.flush()
    generated: list[int] = []
    shown = ""

    def on_token(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text

    result = generate_loop(engine, ids, max_new_tokens, greedy=greedy, temperature=temperature, top_p=top_p,
                           seed=seed, eos_ids=spec.eos_token_ids, on_token=on_token)
    out.write("\n")
    out.flush()
    table = Table(title=f"{engine_name} engine, {ckpt.dir.name}", show_header=True)
    for col in ("phase", "tokens", "seconds", "tokens/s"):
        table.add_column(col, justify="right")
    table.add_row("prefill", str(len(ids)), f"{result.prefill_seconds:.3f}", f"{result.prefill_tokens_per_s:.1f}")
    n_dec = max(len(result.tokens) - 1, 0)
    table.add_row("decode", str(n_dec), f"{result.decode_seconds:.3f}", f"{result.decode_tokens_per_s:.1f}")
    console.print(table)
    print(f"{result.decode_tokens_per_s:.1f} tokens/s")
