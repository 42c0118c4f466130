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
from pocketllm.export.cli.common import console, set_threads, threads_option, user_errors
from pocketllm.export.cli.engines import make_engine, open_source
from pocketllm.export.cli.run_options import (DType, Engine, bundle_option, check_context, check_engine,
                                              compute_dtype, checkpoint_option, dtype_option, engine_option)
from pocketllm.export.errors import PocketllmError
from pocketllm.export.outputs import check_out_file
from pocketllm.export.paths import read_text_file
from pocketllm.export.tokenizer import load_tokenizer
from pocketllm.runtime_py.evaluate import perplexity_of


def perplexity(
    checkpoint: Path = checkpoint_option(),
    text: Path = typer.Option(..., "--text", help="Plain UTF-8 text file to score."),
    context: int = typer.Option(256, "--context", min=2, help="Window length in tokens (BOS + context-1 scored)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Score only the first N tokens of the text."),
    engine: Engine = engine_option(),
    dtype: DType = dtype_option(),
    json_out: Path = typer.Option(None, "--json", help="Also write the result to this JSON file."),
    threads: int = threads_option(),
    bundle: Path = bundle_option(),
):
    """Token-level perplexity of a text file, in non-overlapping windows that each start with BOS."""
    _perplexity(checkpoint, text, context, max_tokens, engine.value, dtype.value if dtype else None, json_out,
                threads, bundle)


@user_errors
def _perplexity(checkpoint, text, context, max_tokens, engine_name, dtype, json_out, threads, bundle=None):
    check_engine(engine_name, checkpoint, bundle, dtype)
    if json_out is not None:
        check_out_file(json_out, "--json", inputs={"--text": text, "--checkpoint": checkpoint, "--bundle": bundle})
    content = read_text_file(text, "text file")
    if not content.strip():
        raise PocketllmError(f"{text}: the text file is empty: nothing to score")
    set_threads(threads)
    source = open_source(checkpoint, bundle, engine_name, threads)
    spec = source.spec
    check_context(source, None, context, f"--context {context}", "lower --context")
    tok = load_tokenizer(source.dir, spec.bos_token_id)
    ids = tok.encode_plain(content)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) + (spec.bos_token_id is not None) < 2:
        raise PocketllmError(f"{text}: nothing to score ({len(ids)} token(s) after tokenization; a window needs 2)")
    engine = make_engine(engine_name, source, context, compute_dtype(dtype))
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("scoring", total=len(ids))
        nll, count = perplexity_of(engine, ids, spec.bos_token_id, context, lambda n: bar.advance(task, n))
    seconds = time.perf_counter() - t0
    ppl = float(np.exp(nll))
    result = {"checkpoint": None if checkpoint is None else str(checkpoint),
              "bundle": None if bundle is None else str(bundle), "text": str(text), "engine": engine_name,
              "context": context, "tokens": count, "nll": nll, "perplexity": ppl, "seconds": seconds}
    table = Table(title="perplexity")
    for k in ("tokens", "context", "nll", "perplexity", "seconds"):
        table.add_column(k, justify="right")
    table.add_row(str(count), str(context), f"{nll:.4f}", f"{ppl:.3f}", f"{seconds:.1f}")
    console.print(table)
    print(f"perplexity {ppl:.3f} over {count} tokens")
    if json_out:
        atomic_write(json_out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
