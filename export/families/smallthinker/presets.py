"""SmallThinker presets for `init-checkpoint`: upstream config.json dicts (MODELS.md section 3) and a tiny test shape
that keeps every feature (GQA, NoPE global + sliding-window RoPE layers, routed ReGLU experts)."""

from __future__ import annotations


def smallthinker_config(*, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                        head_dim, experts, active, ffn, rope_layout, sliding_window_layout, sliding_window_size,
                        max_position_embeddings, router_softmax=False, tie_word_embeddings=False,
                        bos_token_id=151643, eos_token_id=(151643, 151645), model_name="smallthinker") -> dict:
    """Every key upstream's SmallThinkerConfig and modeling code read (its forward reads output_router_logits), as
    the released config.json spells them."""
    return {
        "architectures": ["SmallThinkerForCausalLM"],
        "model_type": "smallthinker",
        "model_name": model_name,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1.5e6,
        "max_position_embeddings": max_position_embeddings,
        "rope_layout": list(rope_layout),
        "sliding_window_layout": list(sliding_window_layout),
        "sliding_window_size": sliding_window_size,
        "moe_num_primary_experts": experts,
        "moe_num_active_primary_experts": active,
        "moe_ffn_hidden_size": ffn,
        "moe_primary_router_apply_softmax": router_softmax,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.02,
        "pad_token_id": None,
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_id),
        "use_cache": True,
        "output_router_logits": False,
        "norm_topk_prob": True,
        "attention_dropout": 0.0,
        "rope_scaling": None,
        "torch_dtype": "bfloat16",
    }


def nope_swa_layout(n: int) -> tuple[list[int], list[int]]:
    """21B-A3B pattern (upstream and llama.cpp): layers l % 4 == 0 are NoPE + global attention, the others RoPE +
    sliding window. Returns (rope_layout, sliding_window_layout)."""
    rope = [0 if l % 4 == 0 else 1 for l in range(n)]
    return rope, list(rope)


PRESETS = {
    "tiny": lambda: smallthinker_config(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, experts=4, active=2, ffn=48, rope_layout=nope_swa_layout(4)[0],
        sliding_window_layout=nope_swa_layout(4)[1], sliding_window_size=32, max_position_embeddings=2048,
        bos_token_id=0, eos_token_id=(0, 2)),
    "4b-a0.6b": lambda: smallthinker_config(
        vocab_size=151936, hidden_size=1536, num_hidden_layers=32, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, experts=32, active=4, ffn=768, rope_layout=[1] * 32,
        sliding_window_layout=[0] * 32, sliding_window_size=4096, max_position_embeddings=32768,
        tie_word_embeddings=True, model_name="smallthinker_4b_instruct"),  # as the released config.json
    "21b-a3b": lambda: smallthinker_config(
        vocab_size=151936, hidden_size=2560, num_hidden_layers=52, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, experts=64, active=6, ffn=768,
        rope_layout=nope_swa_layout(52)[0], sliding_window_layout=nope_swa_layout(52)[1],
        sliding_window_size=4096, max_position_embeddings=16384),
}
