"""`pocketllm perplexity`: token-level perplexity of a text file through an engine."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import typer
from rich.progress import Progress
from rich.table import Table

from pocketllm.export.atomic import atomic_write
from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.cli.engines import make_engine
from pocketllm.export.cli.run_options import DType, Engine
from pocketllm.export.errors import PocketllmError
from pocketllm.export.tokenizer import load_tokenizer
from pocketllm.runtime_py.evaluate import perplexity_of


def perplexity(
    checkpoint: Path = typer.Option(..., "--checkpoint"),
    text: Path = typer.Option(..., "--text", help="Plain UTF-8 text file to score."),
    context: int = typer.Option(256, "--context", min=2, help="Window length in tokens (BOS + context-1 scored)."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text."),
    engine: Engine = typer.Option("torch", "--engine"),
    dtype: DType = typer.Option(DType.fp32, "--dtype"),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON."),
    threads: int = typer.Option(None, "--threads"),
):
    """Token-level perplexity of a text file, in non-overlapping windows that each start with BOS."""
    _perplexity(checkpoint, text, context, max_tokens, engine.value, dtype.value, json_out, threads)


@user_errors
def _perplexity(checkpoint, text, context, max_tokens, engine_name, dtype, json_out, threads):
    set_threads(threads)
    ckpt = open_checkpoint(checkpoint)
    if not Path(text).is_file():
        raise PocketllmError(f"{text}: text file not found")
    content = Path(text).read_text(encoding="utf-8")
    tok = load_tokenizer(ckpt.dir, ckpt.spec.bos_token_id)
    ids = tok.encode_plain(content)
    if max_tokens:
        ids = ids[:max_tokens]
    if context > ckpt.spec.max_position_embeddings:
        raise PocketllmError(f"--context {context} exceeds max_position_embeddings ({ckpt.spec.max_position_embeddings})")
    engine = make_engine(engine_name, ckpt, context, None if dtype == "auto" else dtype)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=len(ids))
        nll, count = perplexity_of(engine, ids, ckpt.spec.bos_token_id, context, lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - t0
    ppl = float(np.exp(nll))
    result = {"checkpoint": str(checkpoint), "text": str(text), "engine": engine_name, "context": context,
              "tokens": count, "nll": nll, "perplexity": ppl, "seconds": seconds}
    table = Table(title="perplexity")
    for k in ("tokens", "context", "nll", "perplexity", "seconds"):
        table.add_column(k, justify="right")
    table.add_row(str(count), str(context), f"{nll:.4f}", f"{ppl:.3f}", f"{seconds:.1f}")
    console.print(table)
    print(f"perplexity {ppl:.3f} over {count} tokens")
    if json_out:
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
