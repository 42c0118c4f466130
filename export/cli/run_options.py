"""What the run commands (logits, generate, perplexity) share: engine and dtype choices, token parsing."""

from __future__ import annotations

from enum import Enum

from pocketllm.export.cli.engines import engine_names
from pocketllm.export.errors import PocketllmError

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
