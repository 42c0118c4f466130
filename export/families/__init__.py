"""The family registry: one package per architecture family (`export/families/<name>/`), each exposing `FAMILY`.

Packages are discovered, not listed: adding a family means adding its folder. `family_for_config` finds a
config.json's family by `model_type`, or by `architectures` when `model_type` is absent (MiniCPM4's released
config has none).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pocketllm.export.errors import PocketllmError
from pocketllm.export.families.base import Family
from pocketllm.export.families.config import ConfigReader
from pocketllm.export.registry import discover
from pocketllm.export.spec import ModelSpec


@cache
def families() -> dict[str, Family]:
    """name -> Family for every package in this folder, in name order."""
    return discover(__name__, __path__, "FAMILY")


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise PocketllmError(f"unknown family {name!r} (expected one of: {', '.join(known)})")
    return known[name]


def family_for_config(raw: dict[str, Any], where: str) -> Family:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    for family in families().values():
        if isinstance(model_type, str) and model_type in family.model_types:
            return family
    if model_type is None and isinstance(archs, list):
        for family in families().values():
            if any(a in family.architectures for a in archs):
                return family
    known = ", ".join(sorted(t for f in families().values() for t in f.model_types))
    raise PocketllmError(f"{where}: unknown model_type {model_type!r} (supported: {known})")


def spec_from_config(raw: Any, where: str = "config.json") -> ModelSpec:
    """config.json (a parsed dict) -> validated ModelSpec, or one PocketllmError line naming the key."""
    if not isinstance(raw, dict):
        raise PocketllmError(f"{where}: expected a JSON object at the top level")
    return family_for_config(raw, where).parse(ConfigReader(raw, where))


def preset_config(arch: str, preset: str) -> dict:
    """The config.json dict of a family's preset (init-checkpoint)."""
    family = families().get(arch)
    if family is None:
        raise PocketllmError(f"unknown --arch {arch!r} (expected one of: {', '.join(families())})")
    if preset not in family.presets:
        raise PocketllmError(f"unknown --preset {preset!r} for {arch} (expected one of: {', '.join(family.presets)})")
    return family.presets[preset]()
