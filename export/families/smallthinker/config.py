"""SmallThinker config.json -> ModelSpec (keys as upstream's SmallThinkerConfig; MODELS.md section 3). Absent
optional keys take upstream's defaults (rope_theta 1e6; MiniCPM's muP defaults do not apply: no muP here)."""

from __future__ import annotations

from pocketllm.export.families.config import ConfigReader, bos_id, common_keys, eos_ids, longrope_or_plain
from pocketllm.export.spec import LayerSpec, ModelSpec, MoESpec


def parse(cfg: ConfigReader) -> ModelSpec:
    c = common_keys(cfg)
    n_layers = c["num_layers"]
    head_dim = cfg.get("head_dim", "posint")
    if head_dim % 2:
        raise cfg.fail("head_dim", "even (rotate-half RoPE)", head_dim)
    rope_layout = cfg.layout("rope_layout", n_layers, default=1)  # SmallThinkerConfig: RoPE, no window by default
    swa_layout = cfg.layout("sliding_window_layout", n_layers, default=0)
    window = cfg.get("sliding_window_size", "posint", None, required=any(swa_layout))
    experts = cfg.get("moe_num_primary_experts", "posint")
    active = cfg.get("moe_num_active_primary_experts", "posint")
    if active > experts:
        raise cfg.fail("moe_num_active_primary_experts", f"at most moe_num_primary_experts ({experts})", active)
    if cfg.raw.get("moe_shared_primary_experts") or cfg.raw.get("moe_enable_secondary_experts"):
        raise cfg.fail("moe_shared_primary_experts", "0 (shared/secondary experts are not in released SmallThinker)",
                       cfg.raw.get("moe_shared_primary_experts"))
    moe = MoESpec(num_experts=experts, top_k=active, ffn_hidden_size=cfg.get("moe_ffn_hidden_size", "posint"),
                  router="pre_attention", activation="relu",
                  router_softmax=cfg.get("moe_primary_router_apply_softmax", "bool", False, required=False))
    layers = tuple(
        LayerSpec(attention="sliding" if swa else "dense", use_rope=bool(rope),
                  sliding_window=window if swa else None, mlp="moe")
        for rope, swa in zip(rope_layout, swa_layout)
    )
    return ModelSpec(
        family="smallthinker", model_type="smallthinker", head_dim=head_dim,
        intermediate_size=moe.ffn_hidden_size,
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", True, required=False),
        rope=longrope_or_plain(cfg, head_dim, c["max_position_embeddings"], 1e6),  # SmallThinkerConfig's default
        layers=layers, moe=moe,
        bos_token_id=bos_id(cfg, 151643),  # SmallThinkerConfig's defaults
        eos_token_ids=eos_ids(cfg, [151643, 151645]),
        **c,
    )
