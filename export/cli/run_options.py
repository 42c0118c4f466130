"""What the run commands (logits, generate, perplexity) share: engine and dtype choices, and the checks they make
before any model is loaded (common.py states the rule): which engine reads what, sampling options, and whether a
run fits the context of the checkpoint or bundle."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from pocketllm.export.cli.engines import CHECKPOINT_ENGINES, BundleSource, engine_names
from pocketllm.export.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets import targets

Engine = Enum("Engine", {name: name for name in engine_names()}, type=str)  # torch, reference, every target


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


def engine_option():
    return typer.Option("torch", "--engine", help="torch (our model) or reference (numpy) on --checkpoint; "
                        f"{', '.join(targets())}: that target's runtime on --bundle.")


def checkpoint_option():
    return typer.Option(None, "--checkpoint", help="Hugging Face style checkpoint directory (torch, reference).")


def bundle_option():
    return typer.Option(None, "--bundle", help=f"Bundle directory written by `pocketllm export` "
                        f"({', '.join(targets())} engines).")


def dtype_option():
    return typer.Option(None, "--dtype", help="torch engine compute dtype (default fp32; auto = the checkpoint's).")


def max_context_option():
    return typer.Option(None, "--max-context", min=1, help="KV cache length (default min(max pos, "
                        f"{DEFAULT_MAX_CONTEXT}); a bundle's is fixed at export).")


def check_engine(engine: str, checkpoint: Path | None, bundle: Path | None, dtype: str | None) -> None:
    """Each engine reads one kind of input; an option the engine would ignore is refused, not dropped."""
    if engine in CHECKPOINT_ENGINES:
        if bundle is not None:
            raise PocketllmError(f"--bundle is read by the {', '.join(targets())} engine(s), not --engine {engine} "
                                 "(which runs --checkpoint)")
        if checkpoint is None:
            raise PocketllmError(f"--engine {engine} needs --checkpoint DIR")
    else:
        if checkpoint is not None:
            raise PocketllmError(f"--checkpoint is read by the {' and '.join(CHECKPOINT_ENGINES)} engines; --engine "
                                 f"{engine} runs the bundle's own weights (--bundle DIR)")
        if bundle is None:
            raise PocketllmError(f"--engine {engine} needs --bundle DIR (a bundle written by `pocketllm export`)")
    if dtype is not None and dtype != "fp32" and engine != "torch":
        what = "the reference computes in fp32" if engine == "reference" else "a bundle's dtypes are fixed at export"
        raise PocketllmError(f"--dtype {dtype} applies to the torch engine only ({what})")


def compute_dtype(dtype: str | None) -> str | None:
    """--dtype as the torch engine takes it: fp32 unless given; None (auto) = the checkpoint's."""
    return "fp32" if dtype is None else None if dtype == "auto" else dtype


def check_sampling(greedy: bool, temperature: float | None, top_p: float | None) -> tuple[float, float]:
    """(temperature, top_p) to sample with; --greedy with either is refused (they would be ignored)."""
    if greedy:
        given = [o for o, v in (("--temperature", temperature), ("--top-p", top_p)) if v is not None]
        if given:
            raise PocketllmError(f"--greedy always picks the most likely token: {' and '.join(given)} would be "
                                 "ignored (leave them out, or drop --greedy to sample)")
        return 1.0, 1.0
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = DEFAULT_TOP_P if top_p is None else top_p
    if not temperature > 0:
        raise PocketllmError(f"--temperature must be greater than 0 (got {temperature}); for the most likely token "
                             "use --greedy")
    if not 0 < top_p <= 1:
        raise PocketllmError(f"--top-p must be in (0, 1] (got {top_p}); 1 keeps every token")
    return temperature, top_p


def check_context(source, max_context: int | None, need: int, what: str, shrink: str,
                  default: int | None = None) -> int:
    """The cache size to run with. `need` positions (`what`, e.g. "the prompt (9 tokens) + --max-new-tokens
    (80)") must fit; `shrink` says how to need fewer. A bundle's size was fixed at export (the default is it); a
    checkpoint's is --max-context (default `default`, capped by max_position_embeddings)."""
    if isinstance(source, BundleSource):
        limit, whose, fixed = source.max_context, "the bundle's context", " (fixed at export)"
        grow = "re-export the bundle with a larger --max-context"
        default = None
    else:
        limit, whose, fixed = source.spec.max_position_embeddings, "the model's max_position_embeddings", ""
        grow = None
    if max_context is not None and max_context > limit:
        extra = f"; re-export with --max-context {max_context} for more" if grow else ""
        raise PocketllmError(f"--max-context {max_context} exceeds {whose} ({limit}){fixed}{extra}")
    ctx = max_context or min(limit, default or limit)
    if need > ctx:
        if ctx < limit:
            advice = f"raise --max-context (up to {limit}) or {shrink}"
        else:
            advice = shrink + (f", or {grow}" if grow else "")
        where = f"--max-context ({ctx})" if max_context else f"{whose} ({ctx}){fixed}"
        raise PocketllmError(f"{what} needs {need} positions, more than {where}: {advice}")
    return ctx


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
