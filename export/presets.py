"""Checkpoint presets: upstream config.json dicts for real model shapes and tiny test shapes.

Real shapes follow shared/docs/MODELS.md; tiny ones keep every feature (GQA, muP, InfLLM v2 or NoPE/SWA + MoE,
lightning + softmax layers) at sizes a test runs in milliseconds.
"""

from __future__ import annotations

from pocketllm.export.errors import PocketllmError

SPARSE_UPSTREAM = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                   "topk": 64, "use_nope": False, "dense_len": 8192}


def minicpm4_config(*, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                    intermediate_size, max_position_embeddings, tie_word_embeddings, head_dim=None,
                    sparse_config=None, rope_scaling=None, bos_token_id=1, eos_token_id=(2,)) -> dict:
    cfg = {
        "architectures": ["MiniCPMForCausalLM"],
        "model_type": "minicpm",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings,
        "scale_emb": 12,
        "scale_depth": 1.4,
        "dim_model_base": 256,
        "tie_word_embeddings": tie_word_embeddings,
        "initializer_range": 0.1,
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_id),
        "rope_scaling": rope_scaling,
        "torch_dtype": "bfloat16",
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if sparse_config is not None:
        cfg["sparse_config"] = dict(sparse_config)
    return cfg


def smallthinker_config(*, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                        head_dim, experts, active, ffn, rope_layout, sliding_window_layout, sliding_window_size,
                        max_position_embeddings, router_softmax=False, tie_word_embeddings=False,
                        bos_token_id=151643, eos_token_id=(151643, 151645)) -> dict:
    return {
        "architectures": ["SmallThinkerForCausalLM"],
        "model_type": "smallthinker",
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
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_id),
        "torch_dtype": "bfloat16",
    }


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


def _minimax_layout(n: int, every: int) -> list[str]:
    """MiniMax-M1 pattern: softmax attention on layers l % every == every - 1 (every = 8 upstream), lightning
    elsewhere."""
    return ["full_attention" if l % every == every - 1 else "linear_attention" for l in range(n)]


def _longrope(head_dim: int, orig: int) -> dict:
    # Smooth factors from 1 (high frequency) to 4 (low frequency): shaped like MiniCPM4's released lists.
    n = head_dim // 2
    short = [1.0 + 3.0 * (i / (n - 1)) ** 2 for i in range(n)]
    return {"rope_type": "longrope", "short_factor": short, "long_factor": [f * 1.25 for f in short],
            "original_max_position_embeddings": orig}


def _nope_swa_layout(n: int) -> tuple[list[int], list[int]]:
    """21B-A3B pattern: NoPE global attention every 4th layer (l % 4 == 0), SWA + RoPE otherwise."""
    rope = [0 if l % 4 == 0 else 1 for l in range(n)]
    return rope, [1 - r for r in rope]


PRESETS = {
    "minicpm4": {
        "tiny": lambda: minicpm4_config(
            vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=160, max_position_embeddings=2048, tie_word_embeddings=True,
            sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                           "window_size": 128, "topk": 4, "use_nope": False, "dense_len": 512},
            rope_scaling=_longrope(16, 1024)),
        "0.5b": lambda: minicpm4_config(
            vocab_size=73448, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=2, intermediate_size=4096, max_position_embeddings=32768,
            tie_word_embeddings=True, head_dim=64, sparse_config=SPARSE_UPSTREAM, eos_token_id=(2, 73440)),
        "8b": lambda: minicpm4_config(
            vocab_size=73448, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=2, intermediate_size=16384, max_position_embeddings=32768,
            tie_word_embeddings=False, head_dim=128, sparse_config=SPARSE_UPSTREAM, eos_token_id=(2, 73440)),
    },
    "smallthinker": {
        "tiny": lambda: smallthinker_config(
            vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, experts=4, active=2, ffn=48, rope_layout=_nope_swa_layout(4)[0],
            sliding_window_layout=_nope_swa_layout(4)[1], sliding_window_size=32, max_position_embeddings=2048,
            bos_token_id=0, eos_token_id=(0, 2)),
        "4b-a0.6b": lambda: smallthinker_config(
            vocab_size=151936, hidden_size=1536, num_hidden_layers=32, num_attention_heads=12,
            num_key_value_heads=2, head_dim=128, experts=32, active=4, ffn=768, rope_layout=[1] * 32,
            sliding_window_layout=[0] * 32, sliding_window_size=4096, max_position_embeddings=32768),
        "21b-a3b": lambda: smallthinker_config(
            vocab_size=151936, hidden_size=2560, num_hidden_layers=52, num_attention_heads=28,
            num_key_value_heads=4, head_dim=128, experts=64, active=6, ffn=768,
            rope_layout=_nope_swa_layout(52)[0], sliding_window_layout=_nope_swa_layout(52)[1],
            sliding_window_size=4096, max_position_embeddings=16384),
    },
    "minimax": {
        # Every feature at test size: lightning and softmax layers (M1's 7:1 pattern at 3:1), partial RoPE, GQA,
        # DeepNorm residual weights, top-2 of 4 experts, prefill blocks of 32 so prompts span several blocks.
        "tiny": lambda: minimax_config(
            vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
            layer_types=_minimax_layout(4, 4), block_size=32, max_position_embeddings=2048,
            initializer_range=0.1),
    },
}


def preset_config(arch: str, preset: str) -> dict:
    if arch not in PRESETS:
        raise PocketllmError(f"unknown --arch {arch!r} (expected one of: {', '.join(PRESETS)})")
    if preset not in PRESETS[arch]:
        raise PocketllmError(f"unknown --preset {preset!r} for {arch} (expected one of: {', '.join(PRESETS[arch])})")
    return PRESETS[arch][preset]()
