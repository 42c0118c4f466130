"""The numpy reference model (runtime_py): what it computes, how its KV cache behaves, how it reads weights.

Every test builds its own tiny checkpoint: an upstream-style config.json plus model.safetensors with upstream
tensor names and random weights. The model is checked against a token-by-token float64 implementation written
straight from shared/docs/MODELS.md (reading config.json keys, not the spec), and against itself: prefill and
step-by-step decode must agree.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import spec_from_config
from pocketllm.runtime_py import ReferenceModel, generate
from pocketllm.runtime_py.rope import rope_tables
from pocketllm.runtime_py.weights import load_file

# --------------------------------------------------------------------------------------- tiny checkpoints


def minicpm4_config(**overrides) -> dict:
    cfg = {
        "model_type": "minicpm", "architectures": ["MiniCPMForCausalLM"],
        "vocab_size": 97, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": [2, 96],
    }
    cfg.update(overrides)
    return cfg


def smallthinker_config(**overrides) -> dict:
    cfg = {
        "model_type": "smallthinker", "architectures": ["SmallThinkerForCausalLM"],
        "vocab_size": 101, "hidden_size": 48, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,  # q width 64 != hidden 48
        "rms_norm_eps": 1e-6, "rope_theta": 1.5e6, "max_position_embeddings": 512,
        "rope_layout": [0, 1, 1], "sliding_window_layout": [0, 1, 1], "sliding_window_size": 16,
        "moe_num_primary_experts": 4, "moe_num_active_primary_experts": 2, "moe_ffn_hidden_size": 32,
        "moe_primary_router_apply_softmax": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    cfg.update(overrides)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under upstream names; q/k are scaled up so attention is far from uniform."""
    rng = np.random.default_rng(seed)
    V, H, n = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    D = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    Q, KV = cfg["num_attention_heads"] * D, cfg["num_key_value_heads"] * D

    def linear(out_f, in_f, gain=1.0):
        return (rng.standard_normal((out_f, in_f)) * gain / math.sqrt(in_f)).astype(np.float32)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(H)).astype(np.float32)

    emb_std = 0.1 if cfg["model_type"] == "minicpm" else 1.0  # MiniCPM4 multiplies embeddings by scale_emb
    w = {"model.embed_tokens.weight": (rng.standard_normal((V, H)) * emb_std).astype(np.float32)}
    for i in range(n):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(Q, H, 2.0)
        w[p + "self_attn.k_proj.weight"] = linear(KV, H, 2.0)
        w[p + "self_attn.v_proj.weight"] = linear(KV, H)
        w[p + "self_attn.o_proj.weight"] = linear(H, Q)
        w[p + "post_attention_layernorm.weight"] = norm()
        if cfg["model_type"] == "smallthinker":
            E, F = cfg["moe_num_primary_experts"], cfg["moe_ffn_hidden_size"]
            w[p + "block_sparse_moe.primary_router.weight"] = linear(E, H)
            for e in range(E):
                w[f"{p}block_sparse_moe.experts.{e}.gate.weight"] = linear(F, H)
                w[f"{p}block_sparse_moe.experts.{e}.up.weight"] = linear(F, H)
                w[f"{p}block_sparse_moe.experts.{e}.down.weight"] = linear(H, F)
        else:
            I = cfg["intermediate_size"]
            w[p + "mlp.gate_proj.weight"] = linear(I, H)
            w[p + "mlp.up_proj.weight"] = linear(I, H)
            w[p + "mlp.down_proj.weight"] = linear(H, I)
    w["model.norm.weight"] = norm()
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = linear(V, H)
    return w


def write_checkpoint(path, cfg: dict, weights: dict[str, np.ndarray]):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(weights, str(path / "model.safetensors"))
    return path


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounding to nearest even."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def save_bf16(weights: dict[str, np.ndarray], path) -> None:
    """A safetensors file with every tensor in BF16, written by hand (numpy cannot hold bf16)."""
    header, blobs, offset = {}, [], 0
    for name, x in weights.items():
        data = to_bf16_bits(x).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def build(tmp_path, cfg: dict, seed: int = 0, max_context=None, name="ckpt") -> ReferenceModel:
    ckpt = write_checkpoint(tmp_path / name, cfg, random_weights(cfg, seed))
    return ReferenceModel.from_checkpoint(ckpt, max_context=max_context)


def tokens_for(cfg: dict, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], size=n, dtype=np.int64)


def decode_one_by_one(model: ReferenceModel, tokens: np.ndarray) -> np.ndarray:
    model.reset()
    return np.concatenate([model.forward(tokens[t:t + 1], t) for t in range(tokens.size)])


def assert_close(a: np.ndarray, b: np.ndarray, tol: float = 1e-5) -> None:
    """Max abs difference <= tol, relative to the logits' magnitude when that exceeds 1."""
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, f"max diff {np.abs(a - b).max():.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------- token-by-token float64 implementation


def naive_logits(cfg: dict, w: dict[str, np.ndarray], tokens: np.ndarray, max_context: int) -> np.ndarray:
    """Per-token, per-head loops in float64 from config.json keys; RoPE as complex rotation of (x_i, x_{i+D/2}).

    Dense / sliding / NoPE attention only (no InfLLM v2).
    """
    f64 = {k: v.astype(np.float64) for k, v in w.items()}
    n, H, Hq, Hkv = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim") or H // Hq
    eps = cfg["rms_norm_eps"]
    minicpm = cfg["model_type"] == "minicpm"
    scale_emb = cfg["scale_emb"] if minicpm else 1.0
    residual = cfg["scale_depth"] / math.sqrt(n) if minicpm else 1.0
    logit_div = H / cfg["dim_model_base"] if minicpm else 1.0
    rope_on = cfg.get("rope_layout", [1] * n)
    swa_on = cfg.get("sliding_window_layout", [0] * n)

    inv = [1.0 / cfg["rope_theta"] ** (2 * i / D) for i in range(D // 2)]
    mag = 1.0
    rs = cfg.get("rope_scaling")
    if rs:
        orig = rs["original_max_position_embeddings"]
        factors = rs["long_factor"] if cfg["max_position_embeddings"] > orig else rs["short_factor"]
        inv = [f / s for f, s in zip(inv, factors)]
        mag = math.sqrt(1 + math.log(cfg["max_position_embeddings"] / orig) / math.log(orig))

    def rope(vec, pos):
        z = (vec[: D // 2] + 1j * vec[D // 2:]) * mag * np.exp(1j * pos * np.array(inv))
        return np.concatenate([z.real, z.imag])

    def norm(x, weight):
        return weight * x / math.sqrt(sum(v * v for v in x) / len(x) + eps)

    def silu(x):
        return x / (1 + np.exp(-x))

    keys = [[] for _ in range(n)]  # per layer, per position: [Hkv, D]
    values = [[] for _ in range(n)]
    out = []
    for pos, tok in enumerate(tokens):
        h = f64["model.embed_tokens.weight"][tok] * scale_emb
        for l in range(n):
            p = f"model.layers.{l}."
            r = f64.get(p + "block_sparse_moe.primary_router.weight")
            router = r @ h if r is not None else None
            x = norm(h, f64[p + "input_layernorm.weight"])
            q = (f64[p + "self_attn.q_proj.weight"] @ x).reshape(Hq, D)
            k = (f64[p + "self_attn.k_proj.weight"] @ x).reshape(Hkv, D)
            v = (f64[p + "self_attn.v_proj.weight"] @ x).reshape(Hkv, D)
            if rope_on[l]:
                q = np.stack([rope(q[i], pos) for i in range(Hq)])
                k = np.stack([rope(k[i], pos) for i in range(Hkv)])
            keys[l].append(k)
            values[l].append(v)
            first = pos - cfg["sliding_window_size"] + 1 if swa_on[l] else 0
            heads = []
            for hq in range(Hq):
                g = hq // (Hq // Hkv)
                js = range(max(first, 0), pos + 1)
                s = np.array([q[hq] @ keys[l][j][g] / math.sqrt(D) for j in js])
                a = np.exp(s - s.max())
                a /= a.sum()
                heads.append(sum(a_j * values[l][j][g] for a_j, j in zip(a, js)))
            h = h + f64[p + "self_attn.o_proj.weight"] @ np.concatenate(heads) * residual
            u = norm(h, f64[p + "post_attention_layernorm.weight"])
            if router is None:
                m = f64[p + "mlp.down_proj.weight"] @ (silu(f64[p + "mlp.gate_proj.weight"] @ u)
                                                       * (f64[p + "mlp.up_proj.weight"] @ u))
            else:
                top = sorted(range(len(router)), key=lambda e: (-router[e], e))[: cfg["moe_num_active_primary_experts"]]
                if cfg["moe_primary_router_apply_softmax"]:
                    gates = np.exp(router[top] - router[top].max())
                else:
                    gates = 1 / (1 + np.exp(-router[top]))
                gates = gates / gates.sum()
                m = 0
                for e, g_e in zip(top, gates):
                    q_ = f"{p}block_sparse_moe.experts.{e}."
                    m = m + g_e * (f64[q_ + "down.weight"] @ (np.maximum(f64[q_ + "gate.weight"] @ u, 0)
                                                             * (f64[q_ + "up.weight"] @ u)))
            h = h + m * residual
        head = f64.get("lm_head.weight", f64["model.embed_tokens.weight"])
        out.append(head @ (norm(h, f64["model.norm.weight"]) / logit_div))
    return np.array(out)


LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 64,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 2.0 * i for i in range(8)]}


@pytest.mark.parametrize("variant", ["plain", "longrope_short", "longrope_long"])
def test_minicpm4_matches_token_by_token_float64_math(tmp_path, variant):
    """muP scalings, SwiGLU, GQA, rotate-half RoPE and LongRoPE (upstream: the short list when max_pos <= original,
    the long list when max_pos > original, magnitude sqrt(1 + ln(max_pos/orig)/ln(orig)) unclamped)."""
    cfg = minicpm4_config(head_dim=16)
    max_context = 128
    if variant != "plain":
        cfg.update(max_position_embeddings=256 if variant == "longrope_long" else 48, rope_scaling=LONGROPE)
        max_context = 48
    model = build(tmp_path, cfg, max_context=max_context)
    tokens = tokens_for(cfg, 12)
    expected = naive_logits(cfg, random_weights(cfg), tokens, max_context)
    assert_close(model.forward(tokens, 0), expected, tol=1e-4)


@pytest.mark.parametrize("router_softmax", [False, True])
def test_smallthinker_matches_token_by_token_float64_math(tmp_path, router_softmax):
    """Pre-attention router on the layer input, top-k ReGLU experts, NoPE layer 0, sliding-window layers 1-2,
    q width (heads * head_dim) different from hidden_size, untied lm_head."""
    cfg = smallthinker_config(moe_primary_router_apply_softmax=router_softmax)
    model = build(tmp_path, cfg, max_context=64)
    tokens = tokens_for(cfg, 24)  # longer than the 16-token window
    expected = naive_logits(cfg, random_weights(cfg), tokens, 64)
    assert_close(model.forward(tokens, 0), expected, tol=1e-4)


# ---------------------------------------------------------------------------------------- KV cache behaviour


def test_minicpm4_prefill_equals_step_by_step_decode(tmp_path):
    cfg = minicpm4_config()
    model = build(tmp_path, cfg, max_context=64)
    tokens = tokens_for(cfg, 40)
    prefill = model.forward(tokens, 0)
    assert prefill.shape == (40, cfg["vocab_size"]) and prefill.dtype == np.float32
    assert_close(decode_one_by_one(model, tokens), prefill)


@pytest.mark.parametrize("router_softmax", [False, True])
def test_smallthinker_nope_and_sliding_window_prefill_equals_decode(tmp_path, router_softmax):
    cfg = smallthinker_config(moe_primary_router_apply_softmax=router_softmax)
    model = build(tmp_path, cfg, max_context=64)
    tokens = tokens_for(cfg, 50)  # > 3 sliding windows
    prefill = model.forward(tokens, 0)
    assert_close(decode_one_by_one(model, tokens), prefill)


def test_chunked_prefill_and_rewind(tmp_path):
    """Chunks continue where the cache ends; a start_pos below the cached length rewinds and overwrites."""
    cfg = minicpm4_config()
    model = build(tmp_path, cfg, max_context=64)
    a, b = tokens_for(cfg, 30, seed=1), tokens_for(cfg, 10, seed=2)
    full = model.forward(a, 0)
    model.reset()
    chunks = np.concatenate([model.forward(a[:7], 0), model.forward(a[7:20], 7), model.forward(a[20:], 20)])
    assert_close(chunks, full)

    rewound = model.forward(b, 12)  # cache held 30 tokens; keep 12, replace the rest with b
    assert model.length == 22
    model.reset()
    assert_close(rewound, model.forward(np.concatenate([a[:12], b]), 0)[12:])


def test_forward_rejects_gaps_overflow_and_bad_ids(tmp_path):
    cfg = minicpm4_config()
    model = build(tmp_path, cfg, max_context=16)
    model.forward(np.arange(4), 0)
    with pytest.raises(PocketllmError, match="cannot be skipped"):
        model.forward(np.arange(2), 5)
    with pytest.raises(PocketllmError, match="exceed max_context 16"):
        model.forward(np.arange(13), 4)
    with pytest.raises(PocketllmError, match=r"token ids must lie in \[0, 97\)"):
        model.forward(np.array([97]), 4)
    with pytest.raises(PocketllmError, match="1-D integer"):
        model.forward(np.array([1.0]), 4)
    assert model.length == 4  # failed calls leave the cache alone


def test_max_context_defaults_to_min_of_max_positions_and_4096(tmp_path):
    assert build(tmp_path, minicpm4_config(), name="a").max_context == 1024
    assert build(tmp_path, minicpm4_config(max_position_embeddings=32768), name="b").max_context == 4096
    with pytest.raises(PocketllmError, match="exceeds the model's max_position_embeddings"):
        build(tmp_path, minicpm4_config(), max_context=2048, name="c")


# ------------------------------------------------------------------------------------- InfLLM v2 in the model

SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 128,
          "topk": 4, "dense_len": 256}


def test_infllm_always_sparse_prefill_equals_chunks_and_decode(tmp_path):
    """dense_len = -1: every call is sparse, so one 600-token prefill equals a prefill, single-token decode
    steps and a prefill chunk over the same tokens. Selection really skips blocks (10 blocks, budget 6)."""
    cfg = minicpm4_config(sparse_config=dict(SPARSE, dense_len=-1))
    model = build(tmp_path, cfg, max_context=640)
    tokens = tokens_for(cfg, 600)
    full = model.forward(tokens, 0)
    selection = model.last_selection[1]  # [Hkv, 600, 10]
    assert selection.shape == (2, 600, 10)
    assert selection[:, -1].sum(axis=-1).tolist() == [6, 6]  # block 0, blocks 7-9 forced + 2 picked of 1..6
    model.reset()
    parts = [model.forward(tokens[:250], 0)]
    parts += [model.forward(tokens[t:t + 1], t) for t in range(250, 350)]
    parts.append(model.forward(tokens[350:], 350))
    assert_close(np.concatenate(parts), full)

    dense = build(tmp_path, minicpm4_config(), max_context=640, name="dense")
    assert np.abs(dense.forward(tokens, 0) - full)[400:].max() > 1e-2  # sparsity changes late logits


def test_infllm_dense_len_is_decided_per_call_from_the_total_length(tmp_path):
    cfg = minicpm4_config(sparse_config=SPARSE)  # dense_len 256
    sparse = build(tmp_path, cfg, max_context=640)
    dense = build(tmp_path, minicpm4_config(), max_context=640, name="dense")
    tokens = tokens_for(cfg, 600)
    # Total length 255 < 256: dense attention, even though the layers are InfLLM v2 layers.
    assert_close(sparse.forward(tokens[:255], 0), dense.forward(tokens[:255], 0))
    # Every call below ends at >= 256 tokens, so all of them are sparse, like the one-shot prefill.
    sparse.reset()
    full = sparse.forward(tokens, 0)
    sparse.reset()
    parts = [sparse.forward(tokens[:300], 0)]
    parts += [sparse.forward(tokens[t:t + 1], t) for t in range(300, 330)]
    parts.append(sparse.forward(tokens[330:], 330))
    assert_close(np.concatenate(parts), full)


def test_infllm_with_a_budget_covering_every_block_equals_dense(tmp_path):
    cfg = minicpm4_config(sparse_config=dict(SPARSE, dense_len=-1, topk=16))
    sparse = build(tmp_path, cfg, max_context=640)
    dense = build(tmp_path, minicpm4_config(), max_context=640, name="dense")
    tokens = tokens_for(cfg, 600)
    assert_close(sparse.forward(tokens, 0), dense.forward(tokens, 0))


# ---------------------------------------------------------------------------------------------- weights, RoPE


def test_bf16_checkpoint_loads_as_the_rounded_fp32_weights(tmp_path):
    cfg = minicpm4_config()
    w = random_weights(cfg)
    rounded = {k: (to_bf16_bits(v).astype(np.uint32) << 16).view(np.float32) for k, v in w.items()}
    (tmp_path / "bf16").mkdir()
    (tmp_path / "bf16" / "config.json").write_text(json.dumps(cfg))
    save_bf16(w, tmp_path / "bf16" / "model.safetensors")
    fp32 = ReferenceModel.from_checkpoint(write_checkpoint(tmp_path / "fp32", cfg, rounded), max_context=32)
    bf16 = ReferenceModel.from_checkpoint(tmp_path / "bf16", max_context=32)

    loaded = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(loaded[k].dtype == np.float32 and np.array_equal(loaded[k], rounded[k]) for k in w)
    tokens = tokens_for(cfg, 20)
    np.testing.assert_array_equal(bf16.forward(tokens, 0), fp32.forward(tokens, 0))


def test_f16_tensors_and_non_finite_weights(tmp_path):
    x = np.array([[1.5, -2.25], [0.0, 65504.0]], dtype=np.float16)
    save_file({"x": x, "bad": np.array([1.0, np.nan], dtype=np.float32)}, str(tmp_path / "w.safetensors"))
    got = load_file(tmp_path / "w.safetensors", ["x"])["x"]
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float32))
    with pytest.raises(PocketllmError, match="tensor 'bad' has 1 non-finite values"):
        load_file(tmp_path / "w.safetensors")


@pytest.mark.parametrize("max_pos,long", [(256, True), (64, False), (48, False)])
def test_longrope_factor_list_and_magnitude_depend_on_the_config_only(max_pos, long):
    """Upstream's rule: factors = long_factor if max_position_embeddings > original else short_factor, and
    cos/sin *= sqrt(1 + ln(max_pos / original) / ln(original)) with no clamp (< 1 below the original) — whatever the
    cache size. The torch table and the numpy table agree."""
    import torch

    from pocketllm.export.nn.rope import RotaryTable

    cfg = minicpm4_config(head_dim=16, max_position_embeddings=max_pos, rope_scaling=LONGROPE)
    rope = spec_from_config(cfg).rope
    magnitude = math.sqrt(1 + math.log(max_pos / 64) / math.log(64))
    factors = LONGROPE["long_factor"] if long else LONGROPE["short_factor"]
    for max_context in (16, 48):  # the cache size changes nothing
        cos, sin = rope_tables(rope, max_context)
        table = RotaryTable(rope, max_context)
        assert cos.shape == sin.shape == (max_context, 16)
        pos, i = 13, 3
        angle = pos * (1 / 10000 ** (2 * i / 16)) / factors[i]
        for col in (i, i + 8):  # both halves share frequency i
            assert cos[pos, col] == pytest.approx(math.cos(angle) * magnitude, abs=1e-5)
            assert sin[pos, col] == pytest.approx(math.sin(angle) * magnitude, abs=1e-5)
            assert float(table.cos[pos, col]) == pytest.approx(cos[pos, col], abs=1e-6)
    assert (magnitude < 1) == (max_pos < 64)


def test_generate_with_the_reference_model_is_deterministic_and_stops_at_eos(tmp_path):
    cfg = minicpm4_config()
    model = build(tmp_path, cfg, max_context=64)
    prompt = tokens_for(cfg, 5)
    first = generate(model, prompt, 12)
    assert len(first.tokens) == 12 and generate(model, prompt, 12).tokens == first.tokens
    stop = first.tokens[3]
    cut = generate(model, prompt, 12, eos_ids=[stop])
    assert cut.tokens == first.tokens[: first.tokens.index(stop) + 1] and cut.stopped_on_eos
