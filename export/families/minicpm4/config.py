"""MiniCPM4 config.json -> ModelSpec (keys and defaults as upstream's MiniCPMConfig; MODELS.md sections 1-2).

Upstream's config class has a default for every key. We apply it for the keys a released config may omit
(MiniCPM4-0.5B's has no model_type, rope_theta or tie_word_embeddings): scale_emb, scale_depth and dim_model_base
default to 1 (no muP), rope_theta to 10000, rms_norm_eps to 1e-6, tie_word_embeddings to true, bos/eos to 1/2,
max_position_embeddings to 2048. The shape keys (vocab_size, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads) stay required (choice): their defaults describe some other model, and silently assuming them
would only fail later as a tensor-shape mismatch. head_dim is not a MiniCPM key: upstream always uses
hidden_size / num_attention_heads, so a head_dim that disagrees is an error, not a different model.
"""

from __future__ import annotations

import math

from pocketllm.export.families.config import ConfigReader, bos_id, common_keys, eos_ids, longrope_or_plain
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
    c = common_keys(cfg, max_position_default=2048)
    hidden, heads, n_layers = c["hidden_size"], c["num_heads"], c["num_layers"]
    if hidden % heads:
        raise cfg.fail("num_attention_heads", f"a divisor of hidden_size ({hidden}): MiniCPM's head_dim is "
                       "hidden_size / num_attention_heads", heads)
    head_dim = hidden // heads
    given = cfg.get("head_dim", "posint", None, required=False)
    if given is not None and given != head_dim:
        raise cfg.fail("head_dim", f"hidden_size / num_attention_heads = {head_dim} (MiniCPM ignores head_dim and "
                       f"uses {hidden} / {heads}; this config says {given})", given)
    if head_dim % 2:
        raise cfg.fail("num_attention_heads", f"such that hidden_size / num_attention_heads is even (rotate-half "
                       f"RoPE; got head_dim {head_dim})", heads)
    scale_depth = cfg.get("scale_depth", "float", 1.0, required=False)
    dim_model_base = cfg.get("dim_model_base", "posfloat", 1.0, required=False)
    sparse = sparse_config(cfg)
    layer = LayerSpec(attention="infllm" if sparse else "dense", use_rope=True, mlp="swiglu")
    return ModelSpec(
        family="minicpm4", model_type=cfg.raw.get("model_type") or "minicpm", head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", "posint"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", True, required=False),
        rope=longrope_or_plain(cfg, head_dim, c["max_position_embeddings"], 10000.0),
        layers=tuple([layer] * n_layers),
        scale_emb=cfg.get("scale_emb", "float", 1.0, required=False),
        residual_scale=scale_depth / math.sqrt(n_layers),
        logit_scale=1.0 / (hidden / dim_model_base),
        sparse=sparse,
        bos_token_id=bos_id(cfg, 1),
        eos_token_ids=eos_ids(cfg, [2]),
        **c,
    )
