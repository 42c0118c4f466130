"""MiniMax config.json -> ModelSpec: hybrids of lightning attention and softmax attention, with MoE.

Config keys exactly as transformers' `MiniMaxConfig` writes them (`save_pretrained`); defaults are that class's
defaults, so a config.json that omits a key means what it means to transformers. Math: docs/lightning.md.

    layer_types            per layer "linear_attention" (lightning) or "full_attention" (softmax, GQA, RoPE);
                           absent: transformers' default (full on even layers, linear on odd ones)
    block_size             lightning prefill block length (default 256)
    *_alpha_factor/_beta   post-norm residual weights: x = norm(h); h = x * alpha + f(x) * beta
                           (full_attn_*, linear_attn_* around the token mixer, mlp_* around the MoE)
    rope_parameters        {"rope_type": "default", "rope_theta", "partial_rotary_factor"} (transformers 5); the
                           older top-level rope_theta / partial_rotary_factor and MiniMax's own `rotary_dim` are
                           read too. RoPE covers the first int(head_dim * factor) channels of each head.
    num_local_experts, num_experts_per_tok, intermediate_size
                           softmax router over all experts, top-k, renormalised; SwiGLU experts w1/w3/w2
"""

from __future__ import annotations

from typing import Any

from pocketllm.export.families.config import ConfigReader, bos_id, common_keys, eos_ids, head_dim_of
from pocketllm.export.spec import LayerSpec, LightningSpec, ModelSpec, MoESpec, RopeSpec

LAYER_TYPES = {"linear_attention": "lightning", "full_attention": "softmax"}
DEFAULT_THETA = 1_000_000.0  # MiniMaxConfig.default_theta
DEFAULT_BLOCK_SIZE = 256


def _layer_types(cfg: ConfigReader, n: int) -> list[str]:
    raw = cfg.raw.get("layer_types")
    if raw is None:  # transformers' default pattern
        return ["full_attention" if (i + 1) % 2 else "linear_attention" for i in range(n)]
    if not isinstance(raw, list) or len(raw) != n:
        raise cfg.fail("layer_types", f"a list of {n} entries (num_hidden_layers), each "
                       "'linear_attention' or 'full_attention'", raw)
    for i, t in enumerate(raw):
        if not isinstance(t, str) or t not in LAYER_TYPES:
            raise cfg.fail(f"layer_types[{i}]", "'linear_attention' (lightning) or 'full_attention' (softmax)", t)
    return list(raw)


def _rope(cfg: ConfigReader, head_dim: int, max_pos: int) -> RopeSpec:
    params: Any = cfg.raw.get("rope_parameters")
    if params is None:
        params = cfg.raw.get("rope_scaling") or {}
        key = "rope_scaling"
    else:
        key = "rope_parameters"
    if not isinstance(params, dict):
        raise cfg.fail(key, "an object or null", params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise cfg.fail(f"{key}.rope_type", "'default' (the only RoPE MiniMax uses)", rope_type)
    sub = ConfigReader(params, cfg.where)  # keys inside rope_parameters / rope_scaling
    theta = sub.get("rope_theta", "posfloat", None, required=False)
    if theta is None:
        theta = cfg.get("rope_theta", "posfloat", DEFAULT_THETA, required=False)

    factor = sub.get("partial_rotary_factor", "posfloat", None, required=False)
    if factor is None:
        factor = cfg.get("partial_rotary_factor", "posfloat", None, required=False)
    if factor is None and cfg.raw.get("rotary_dim") is not None:  # MiniMax's own spelling
        factor = cfg.get("rotary_dim", "posint") / head_dim
    factor = 1.0 if factor is None else factor
    dim = int(head_dim * factor)  # transformers truncates the same way
    if factor > 1.0 or dim < 2 or dim % 2:
        raise cfg.fail(f"{key}.partial_rotary_factor",
                       f"in (0, 1] with head_dim * factor an even number of channels (head_dim {head_dim})", factor)
    return RopeSpec(theta=theta, dim=dim, max_position_embeddings=max_pos)


def parse(cfg: ConfigReader) -> ModelSpec:
    c = common_keys(cfg)
    c["rms_norm_eps"] = cfg.get("rms_norm_eps", "posfloat", 1e-5, required=False)  # MiniMaxConfig's default
    hidden, heads, n_layers = c["hidden_size"], c["num_heads"], c["num_layers"]
    head_dim = head_dim_of(cfg, hidden, heads, even=False)  # partial RoPE: only the rotated channels pair up
    act = cfg.get("hidden_act", "str", "silu", required=False)
    if act != "silu":
        raise cfg.fail("hidden_act", "'silu' (lightning q/k/v and the SwiGLU experts use it)", act)

    experts = cfg.get("num_local_experts", "posint", 8, required=False)
    active = cfg.get("num_experts_per_tok", "posint", 2, required=False)
    if active > experts:
        raise cfg.fail("num_experts_per_tok", f"at most num_local_experts ({experts})", active)
    intermediate = cfg.get("intermediate_size", "posint")
    moe = MoESpec(num_experts=experts, top_k=active, ffn_hidden_size=intermediate, router="post_attention",
                  router_softmax=True, activation="silu")

    window = cfg.get("sliding_window", "posint", None, required=False)
    factors = {k: cfg.get(k, "float", 1.0, required=False) for k in (
        "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor", "linear_attn_beta_factor",
        "mlp_alpha_factor", "mlp_beta_factor")}
    layers = []
    for t in _layer_types(cfg, n_layers):
        kind = "linear" if t == "linear_attention" else "full"
        if kind == "linear":
            attention, use_rope, sliding = "lightning", False, None
        else:
            attention, use_rope, sliding = ("sliding" if window else "dense"), True, window
        layers.append(LayerSpec(attention=attention, use_rope=use_rope, sliding_window=sliding, mlp="moe",
                                residual="post_norm", attn_alpha=factors[f"{kind}_attn_alpha_factor"],
                                attn_beta=factors[f"{kind}_attn_beta_factor"], mlp_alpha=factors["mlp_alpha_factor"],
                                mlp_beta=factors["mlp_beta_factor"]))
    lightning = LightningSpec(block_size=cfg.get("block_size", "posint", DEFAULT_BLOCK_SIZE, required=False))
    return ModelSpec(
        family="minimax", model_type="minimax", head_dim=head_dim, intermediate_size=intermediate,
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", False, required=False),
        rope=_rope(cfg, head_dim, c["max_position_embeddings"]),
        layers=tuple(layers), moe=moe, lightning=lightning, lm_head_fp32=True,
        bos_token_id=bos_id(cfg, 1),
        eos_token_ids=eos_ids(cfg, [2]),
        **c,
    )
