"""MiniMax presets for `init-checkpoint`: transformers' MiniMaxConfig keys, at a tiny size that keeps every feature."""

from __future__ import annotations


def minimax_config(*, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
                   intermediate_size, num_local_experts, num_experts_per_tok, layer_types, block_size,
                   max_position_embeddings, rope_theta=10_000_000.0, partial_rotary_factor=0.5, initializer_range=0.02,
                   tie_word_embeddings=False, bos_token_id=1, eos_token_id=2) -> dict:
    """transformers' MiniMaxConfig keys, as `save_pretrained` writes them. Residual weights are DeepNorm's
    alpha = (2 * layers)^(1/4), beta = 1 for every sublayer (MiniMax-M1: 80 layers, alpha 3.5566)."""
    alpha = (2 * num_hidden_layers) ** 0.25
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-5,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": num_experts_per_tok,
        "num_local_experts": num_local_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                            "partial_rotary_factor": partial_rotary_factor},
        "layer_types": list(layer_types),
        "block_size": block_size,
        "full_attn_alpha_factor": alpha, "full_attn_beta_factor": 1.0,
        "linear_attn_alpha_factor": alpha, "linear_attn_beta_factor": 1.0,
        "mlp_alpha_factor": alpha, "mlp_beta_factor": 1.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": "bfloat16",
    }


def minimax_layout(n: int, every: int) -> list[str]:
    """MiniMax-M1 pattern: softmax attention on layers l % every == every - 1 (every = 8 upstream), lightning
    elsewhere."""
    return ["full_attention" if l % every == every - 1 else "linear_attention" for l in range(n)]

PRESETS = {
    # Every feature at test size: lightning and softmax layers (M1's 7:1 pattern at 3:1), partial RoPE, GQA,
    # DeepNorm residual weights, top-2 of 4 experts, prefill blocks of 32 so prompts span several blocks.
    "tiny": lambda: minimax_config(
        vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        layer_types=minimax_layout(4, 4), block_size=32, max_position_embeddings=2048,
        initializer_range=0.1),
}
