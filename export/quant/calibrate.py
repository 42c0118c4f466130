"""Calibration: the text the model reads while it is quantized, and the input statistics collected per Linear.

`--calibration` takes literal text or a path to a UTF-8 text file; without it one short built-in mixed-domain
prompt is used (export.init_checkpoint.BUILTIN_TEXT: prose, code, numbers, a Q&A, several scripts), which the any4
paper found calibrates as well as 128 x 2048 tokens of a dataset.

Per quantized Linear we accumulate, over every calibration token t, the sums of x[t, j], |x[t, j]| and x[t, j]^2 of
its input column j (float64). any4 weighs its k-means by a per-column statistic (ACT_STATS); the error report weighs
columns by their RMS input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.init_checkpoint import BUILTIN_TEXT
from pocketllm.export.paths import read_text_file
from pocketllm.export.quant.format import ACT_STATS, DEFAULT_ACT_STAT  # noqa: F401  (re-exported)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".py")


def calibration_text(value: str | None) -> tuple[str, str]:
    """(text, source description). `value` None: the built-in prompt; an existing file: its contents; a value
    that looks like a path (no whitespace, has a '/' or a text-file suffix) but is not a file: an error; anything
    else: the literal text."""
    if value is None:
        return BUILTIN_TEXT, "builtin"
    if not value.strip():
        raise PocketllmError("--calibration is empty: give a text file, literal text, or leave it out for the "
                             "built-in prompt")
    path = Path(value)
    looks_like_path = not any(ch.isspace() for ch in value) and ("/" in value or path.suffix.lower() in TEXT_SUFFIXES)
    if path.exists() or looks_like_path:
        text = read_text_file(path, "calibration file")
        if not text.strip():
            raise PocketllmError(f"{path}: calibration file is empty")
        return text, f"file:{path.name}"
    return value, "text"


def calibration_windows(ids: list[int], bos_id: int | None, window: int, max_tokens: int) -> list[list[int]]:
    """Split token ids (starting with BOS when the tokenizer adds one) into windows of at most `window` tokens,
    each further window again starting with BOS; at most `max_tokens` tokens in all."""
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise PocketllmError(f"calibration text is too short: {len(ids)} token(s) after tokenization (need 2+)")
    lead = [bos_id] if bos_id is not None and ids[0] == bos_id else []
    body = ids[len(lead):]
    step = window - len(lead)
    return [lead + body[i:i + step] for i in range(0, len(body), step)]


@dataclass
class ColumnStats:
    count: int = 0
    total: torch.Tensor | None = None  # sum x   [K] float64
    total_abs: torch.Tensor | None = None  # sum |x|
    total_sq: torch.Tensor | None = None  # sum x^2

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.total is None:
            self.total = torch.zeros(x.shape[-1], dtype=torch.float64)
            self.total_abs = torch.zeros_like(self.total)
            self.total_sq = torch.zeros_like(self.total)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.total_abs += x.abs().sum(0)
        self.total_sq += (x * x).sum(0)

    def column_weight(self, stat: str) -> torch.Tensor | None:
        """Per-column weight [K] fp32, or None when no token reached this module (an unrouted expert)."""
        if not self.count:
            return None
        if stat == "abs_mean":
            w = (self.total / self.count).abs()
        elif stat == "mean_abs":
            w = self.total_abs / self.count
        elif stat == "rms":
            w = (self.total_sq / self.count).sqrt()
        else:
            raise PocketllmError(f"unknown activation statistic {stat!r} (expected one of: {', '.join(ACT_STATS)})")
        return w.to(torch.float32)


@dataclass
class ActivationStats:
    """Input statistics per module name, filled by forward pre-hooks on the Linear modules."""

    modules: dict[str, ColumnStats] = field(default_factory=dict)

    def get(self, name: str) -> ColumnStats:
        return self.modules.setdefault(name, ColumnStats())

    def hook(self, name: str):
        stats = self.get(name)

        def pre_hook(module, args):
            stats.add(args[0])

        return pre_hook
