"""MiniCPM4 presets for `init-checkpoint`: upstream config.json dicts (MODELS.md section 1) and a tiny test shape
that keeps every feature (GQA, muP, InfLLM v2 engaged past a small dense_len, LongRoPE)."""

from __future__ import annotations

SPARSE_UPSTREAM = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                   "topk": 64, "use_nope": False, "dense_len": 8192}


def minicpm4_config(*, vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
                    intermediate_size, max_position_embeddings, tie_word_embeddings, head_dim=None,
                    sparse_config=None, rope_scaling=None, bos_token_id=1, eos_token_id=(2,)) -> dict:
    """Every key upstream's MiniCPMConfig reads, as MiniCPM4's configs spell them."""
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
        "pad_token_id": None,
        "bos_token_id": bos_token_id,
        "eos_token_id": list(eos_token_id),
        "rope_scaling": rope_scaling,
        "use_cache": True,
        "pretraining_tp": 1,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "bfloat16",
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if sparse_config is not None:
        cfg["sparse_config"] = dict(sparse_config)
    return cfg


def longrope(head_dim: int, orig: int) -> dict:
    # Smooth factors from 1 (high frequency) to 4 (low frequency): shaped like MiniCPM4's released lists.
    n = head_dim // 2
    short = [1.0 + 3.0 * (i / (n - 1)) ** 2 for i in range(n)]
    return {"rope_type": "longrope", "short_factor": short, "long_factor": [f * 1.25 for f in short],
            "original_max_position_embeddings": orig}


# The LongRoPE list of the released MiniCPM4-0.5B config.json (short_factor == long_factor, head_dim 64).
RELEASED_LONGROPE_64 = [
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297]
ADDED_TOKENS = 8  # <|im_end|> .. <|fim_suffix|>: the last 8 ids of the vocabulary (added_tokens.json)


def released_like(**shape) -> dict:
    """A config.json with exactly the keys and values of the released MiniCPM4-0.5B (openbmb/MiniCPM4-0.5B
    config.json; MODELS.md section 1) at any shape: no model_type (the family comes from `architectures`), no
    rope_theta, no tie_word_embeddings, no head_dim, no sparse_config (the 0.5B runs dense; InfLLM v2 is enabled by
    adding one), rms_norm_eps 1e-5, LongRoPE with original = max_position_embeddings and identical short/long lists
    (the released list when head_dim is 64), EOS [2, <|im_end|>] with <|im_end|> the first of the 8 added tokens at
    the end of the vocabulary (73440 for the released 73448)."""
    max_pos = shape.pop("max_position_embeddings", 32768)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    factors = RELEASED_LONGROPE_64 if head_dim == 64 else longrope(head_dim, max_pos)["short_factor"]
    cfg = {
        "_name_or_path": "openbmb/MiniCPM4-0.5B",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
                     "AutoModel": "modeling_minicpm.MiniCPMModel",
                     "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
                     "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
                     "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification"},
        "bos_token_id": 1,
        "eos_token_id": [2, shape["vocab_size"] - ADDED_TOKENS],
        "hidden_act": "silu",
        "hidden_size": None,
        "initializer_range": 0.1,
        "intermediate_size": None,
        "max_position_embeddings": max_pos,
        "num_attention_heads": None,
        "num_hidden_layers": None,
        "num_key_value_heads": None,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"rope_type": "longrope", "long_factor": list(factors), "short_factor": list(factors),
                         "original_max_position_embeddings": max_pos},
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": None,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
    }
    shape_keys = {k for k, v in cfg.items() if v is None}
    if set(shape) != shape_keys:
        raise ValueError(f"released_like: give exactly {sorted(shape_keys)} (got {sorted(shape)})")
    cfg.update(shape)  # in the released file's key order
    return cfg


def released_0_5b() -> dict:
    return released_like(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=2)


PRESETS = {
    "tiny": lambda: minicpm4_config(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=160, max_position_embeddings=2048, tie_word_embeddings=True,
        sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                       "window_size": 128, "topk": 4, "use_nope": False, "dense_len": 512},
        rope_scaling=longrope(16, 1024)),
    "0.5b": lambda: released_0_5b(),
    "8b": lambda: minicpm4_config(
        vocab_size=73448, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=2, intermediate_size=16384, max_position_embeddings=32768,
        tie_word_embeddings=False, head_dim=128, sparse_config=SPARSE_UPSTREAM, eos_token_id=(2, 73440)),
}
