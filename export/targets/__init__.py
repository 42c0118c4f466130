"""The target registry: one package per phone runtime (`export/targets/<name>/`), each exposing `TARGET`.

Packages are discovered, not listed; importing one never imports its SDK, so `--help` and argument validation work
without any SDK installed. The CLI's `--target` choices, the pipeline, parity and the runners read this registry.
"""

from __future__ import annotations

from functools import cache

from pocketllm.export.errors import PocketllmError
from pocketllm.export.registry import discover
from pocketllm.export.targets.base import Target


@cache
def targets() -> dict[str, Target]:
    """name -> Target for every package in this folder, in name order."""
    return discover(__name__, __path__, "TARGET")


def get_target(name: str) -> Target:
    known = targets()
    if name not in known:
        raise PocketllmError(f"unknown --target {name!r} (supported: {', '.join(known)})")
    return known[name]


def parse_targets(value: str) -> list[Target]:
    """`--target executorch,coreml` -> the targets, in the order given, each once."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise PocketllmError(f"--target is empty (expected one or more of: {', '.join(targets())}, comma-separated)")
    if len(set(names)) != len(names):
        raise PocketllmError(f"--target {value!r} names a target twice")
    return [get_target(n) for n in names]
