"""`pocketllm logits`, `pocketllm generate`, `pocketllm perplexity`: run a checkpoint through an engine."""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path

import numpy as np
import typer
from rich.progress import Progress
from rich.table import Table

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.atomic import atomic_write
from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.cli.engines import engine_names, make_engine, open_source
from pocketllm.export.errors import PocketllmError
from pocketllm.export.tokenizer import load_tokenizer


class Mode(str, Enum):
    prefill = "prefill"
    decode = "decode"


Engine = Enum("Engine", {name: name for name in engine_names()}, type=str)  # torch, reference, every target


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


def parse_tokens(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise PocketllmError(f"--tokens must be comma-separated integers (got {text!r})") from None
    if not ids:
        raise PocketllmError("--tokens is empty: give at least one token id, e.g. --tokens 1,2,3")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PocketllmError(f"--tokens: id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def run_logits(engine, tokens: list[int], mode: str) -> np.ndarray:
    """[T, vocab] fp32: one prefill call, or one token per step through the cache."""
    engine.reset()
    ids = np.asarray(tokens, dtype=np.int64)
    if mode == "prefill":
        return np.asarray(engine.forward(ids, 0), dtype=np.float32)
    return np.concatenate([engine.forward(ids[i:i + 1], i) for i in range(len(ids))]).astype(np.float32)


def logits(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Hugging Face style checkpoint directory."),
    tokens: str = typer.Option(..., "--tokens", help="Comma-separated token ids, e.g. 1,2,3."),
    mode: Mode = typer.Option(Mode.prefill, "--mode", help="prefill: one call; decode: one token per step."),
    engine: Engine = typer.Option("torch", "--engine", help="torch (our model), reference (numpy) or a target's "
                                  "runtime on --bundle."),
    out: Path = typer.Option(..., "--out", help="Where to write float32 logits [T, vocab] (.npy)."),
    max_context: int = typer.Option(None, "--max-context", help="KV cache length (default min(max pos, 4096))."),
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
    max_context = max_context or max(len(ids), 1)
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


def generate(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Hugging Face style checkpoint directory."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    greedy: bool = typer.Option(False, "--greedy", help="Always pick the most likely token."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    seed: int = typer.Option(0, "--seed"),
    engine: Engine = typer.Option("torch", "--engine"),
    max_context: int = typer.Option(None, "--max-context", help="KV cache length (default min(max pos, 4096))."),
    dtype: DType = typer.Option(DType.fp32, "--dtype"),
    threads: int = typer.Option(None, "--threads"),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle directory, for a target's engine."),
):
    """Stream a continuation of PROMPT, then print prefill and decode speed."""
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


def perplexity_of(engine, ids: list[int], bos_id: int | None, context: int, progress=None) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) and token count over non-overlapping windows."""
    step = context - 1 if bos_id is not None else context
    total_nll, count = 0.0, 0
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        window = ([bos_id] if bos_id is not None else []) + chunk
        if len(window) < 2:
            break
        engine.reset()
        logits = np.asarray(engine.forward(np.asarray(window, dtype=np.int64), 0), dtype=np.float64)[:-1]
        targets = np.asarray(window[1:])
        m = logits.max(axis=-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1)))
        total_nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        if progress:
            progress(len(chunk))
    return total_nll / max(count, 1), count


@user_errors
def _perplexity(checkpoint, text, context, max_tokens, engine_name, dtype, json_out, threads):
    set_threads(threads)
    ckpt = open_checkpoint(checkpoint)
    if not Path(text).is_file():
        raise PocketllmError(f"{text}: text file not found")
    content = Path(text).read_text(encoding="utf-8")
    tok = load_tokenizer(ckpt.dir, ckpt.spec.bos_token_id)
    ids = tok.tokenizer.encode(content, add_special_tokens=False).ids
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
