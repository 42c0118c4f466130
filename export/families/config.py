"""Typed reading of an upstream config.json: every failure names the file and the key (one PocketllmError line).

Shared by the family packages; a family's own `config.py` turns a ConfigReader into a ModelSpec.
"""

from __future__ import annotations

import math
from typing import Any

from pocketllm.export.errors import PocketllmError
from pocketllm.export.spec import RopeSpec


class _Missing:
    pass


MISSING = _Missing()
_KIND_TEXT = {"int": "an integer", "posint": "a positive integer", "float": "a number", "posfloat": "a positive number",
              "bool": "true or false", "dict": "an object", "str": "a string", "list": "a list"}


class ConfigReader:
    """Typed access to a config dict; `where` (the file) prefixes every message."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw, self.where = raw, where

    def fail(self, key: str, expected: str, got: Any = None) -> PocketllmError:
        shown = "missing" if got is MISSING else f"got {got!r}"
        return PocketllmError(f"{self.where}: key '{key}' must be {expected} ({shown})")

    def get(self, key: str, kind: str, default: Any = None, required: bool = True) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise self.fail(key, _KIND_TEXT[kind], MISSING)
            return default
        value = self.raw[key]
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, "an integer", value)
        elif kind == "posint":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise self.fail(key, "a positive integer", value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(key, "a number", value)
            value = float(value)
        elif kind == "posfloat":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise self.fail(key, "a positive number", value)
            value = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(key, "true or false", value)
        elif kind == "dict":
            if not isinstance(value, dict):
                raise self.fail(key, "an object", value)
        elif kind == "str":
            if not isinstance(value, str):
                raise self.fail(key, "a string", value)
        return value

    def sub(self, key: str) -> "ConfigReader":
        """A reader over the nested object `key` (same file in messages)."""
        return ConfigReader(self.raw[key], self.where)

    def layout(self, key: str, n: int, default: int | None = None) -> list[int]:
        """A per-layer list of n entries, each 0 or 1."""
        if key not in self.raw and default is not None:
            return [default] * n
        value = self.get(key, "list")
        if not isinstance(value, list) or len(value) != n or any(v not in (0, 1) or isinstance(v, float) for v in value):
            raise self.fail(key, f"a list of {n} entries, each 0 or 1", value)
        return [int(v) for v in value]


def bos_id(cfg: ConfigReader, default: int | None) -> int | None:
    """`bos_token_id`: the config class default when the key is absent; an explicit null means no BOS."""
    if "bos_token_id" not in cfg.raw:
        return default
    return cfg.get("bos_token_id", "int", None, required=False)


def eos_ids(cfg: ConfigReader, default: list[int]) -> tuple[int, ...]:
    eos = cfg.raw.get("eos_token_id", default)
    if eos is None:
        return ()
    eos = eos if isinstance(eos, list) else [eos]
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos):
        raise cfg.fail("eos_token_id", "an integer or a list of integers", cfg.raw.get("eos_token_id"))
    return tuple(eos)


def common_keys(cfg: ConfigReader, max_position_default: int | None = None) -> dict[str, Any]:
    """The keys every family shares, as ModelSpec keyword arguments. max_position_default: the family's config class
    default for max_position_embeddings (None: required)."""
    hidden = cfg.get("hidden_size", "posint")
    heads = cfg.get("num_attention_heads", "posint")
    kv_heads = cfg.get("num_key_value_heads", "posint", heads, required=False)
    if heads % kv_heads:
        raise cfg.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
    return dict(
        vocab_size=cfg.get("vocab_size", "posint"),
        hidden_size=hidden,
        num_layers=cfg.get("num_hidden_layers", "posint"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", "posfloat", 1e-6, required=False),
        max_position_embeddings=cfg.get("max_position_embeddings", "posint", max_position_default,
                                        required=max_position_default is None),
        torch_dtype=str(cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "float32"),
    )


def longrope_or_plain(cfg: ConfigReader, head_dim: int, max_pos: int, default_theta: float) -> RopeSpec:
    """`rope_theta` and an optional `rope_scaling` of rope_type "longrope" (MiniCPM4's LongRoPE lists)."""
    theta = cfg.get("rope_theta", "posfloat", default_theta, required=False)
    scaling = cfg.raw.get("rope_scaling")
    if scaling is None:
        return RopeSpec(theta=theta, dim=head_dim, max_position_embeddings=max_pos)
    if not isinstance(scaling, dict):
        raise cfg.fail("rope_scaling", "an object or null", scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "longrope":
        raise cfg.fail("rope_scaling.rope_type", "'longrope' (the only scaling MiniCPM4 uses)", rope_type)
    factors = {}
    for name in ("short_factor", "long_factor"):
        f = scaling.get(name)
        if (not isinstance(f, list) or len(f) != head_dim // 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in f)):
            raise cfg.fail(f"rope_scaling.{name}", f"a list of {head_dim // 2} positive numbers (head_dim / 2)", f)
        factors[name] = tuple(float(x) for x in f)
    orig = scaling.get("original_max_position_embeddings")
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 1:
        raise cfg.fail("rope_scaling.original_max_position_embeddings", "an integer > 1", orig)
    return RopeSpec(theta=theta, dim=head_dim, short_factor=factors["short_factor"], long_factor=factors["long_factor"],
                    original_max_position_embeddings=orig, max_position_embeddings=max_pos)


def head_dim_of(cfg: ConfigReader, hidden: int, heads: int, required: bool = False, even: bool = True) -> int:
    """`head_dim` when given, else hidden_size / num_attention_heads; even when every channel rotates (rotate-half
    RoPE over the whole head)."""
    head_dim = cfg.get("head_dim", "posint", None, required=required)
    if head_dim is None:
        if hidden % heads:
            raise cfg.fail("head_dim", f"given when hidden_size ({hidden}) is not a multiple of num_attention_heads",
                           None)
        head_dim = hidden // heads
    if even and head_dim % 2:
        raise cfg.fail("head_dim", "even (rotate-half RoPE)", head_dim)
    return head_dim
