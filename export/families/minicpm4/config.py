"""MiniCPM4 config.json -> ModelSpec (keys and defaults as upstream's MiniCPMConfig; MODELS.md sections 1-2)."""

from __future__ import annotations

import math

from pocketllm.export.families.config import ConfigReader, common_keys, eos_ids, head_dim_of, longrope_or_plain
from pocketllm.export.spec import LayerSpec, ModelSpec, SparseSpec


def sparse_config(cfg: ConfigReader) -> SparseSpec | None:
    """`sparse_config` (InfLLM v2), or None for dense attention."""
    raw = cfg.raw.get("sparse_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise cfg.fail("sparse_config", "an object or null", raw)
    sub = cfg.sub("sparse_config")
    vals = {}
    defaults = SparseSpec()
    for key in ("kernel_size", "kernel_stride", "block_size"):
        vals[key] = sub.get(key, "posint", getattr(defaults, key), required=False)
    for key in ("init_blocks", "window_size", "topk", "dense_len"):
        vals[key] = sub.get(key, "int", getattr(defaults, key), required=False)
    vals["use_nope"] = sub.get("use_nope", "bool", False, required=False)
    spec = SparseSpec(**vals)
    if spec.init_blocks < 0 or spec.topk < 0 or spec.window_size < 0:
        raise cfg.fail("sparse_config", "non-negative init_blocks, topk and window_size", raw)
    if spec.window_size % spec.block_size:
        raise cfg.fail("sparse_config.window_size", f"a multiple of block_size ({spec.block_size})", spec.window_size)
    if spec.dense_len < -1:
        raise cfg.fail("sparse_config.dense_len", "-1 (always sparse) or a non-negative length", spec.dense_len)
    if spec.use_nope:
        raise cfg.fail("sparse_config.use_nope", "false (block selection on pre-RoPE keys is not supported yet)", True)
    if spec.budget <= 0:
        raise cfg.fail("sparse_config.topk", "such that topk + window_size / block_size > 0", spec.topk)
    return spec


def parse(cfg: ConfigReader) -> ModelSpec:
    c = common_keys(cfg)
    hidden, heads, n_layers = c["hidden_size"], c["num_heads"], c["num_layers"]
    head_dim = head_dim_of(cfg, hidden, heads)
    scale_depth = cfg.get("scale_depth", "float")
    dim_model_base = cfg.get("dim_model_base", "posfloat")
    sparse = sparse_config(cfg)
    layer = LayerSpec(attention="infllm" if sparse else "dense", use_rope=True, mlp="swiglu")
    return ModelSpec(
        family="minicpm4", model_type=cfg.raw.get("model_type") or "minicpm", head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", "posint"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", True, required=False),
        rope=longrope_or_plain(cfg, head_dim, c["max_position_embeddings"], 10000.0),
        layers=tuple([layer] * n_layers),
        scale_emb=cfg.get("scale_emb", "float"),
        residual_scale=scale_depth / math.sqrt(n_layers),
        logit_scale=1.0 / (hidden / dim_model_base),
        sparse=sparse,
        bos_token_id=cfg.get("bos_token_id", "int", 1, required=False),
        eos_token_ids=eos_ids(cfg, [2]),
        **c,
    )
