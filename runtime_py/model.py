"""The numpy reference model: MiniCPM4 (dense or InfLLM v2) and SmallThinker (MoE, NoPE / sliding-window layers).

Written from shared/docs/MODELS.md sections 1-3 and docs/infllm_v2.md; shares only the spec reader with export/,
so that parity against the torch model means something. Everything is float32.

    h = embed[ids] * scale_emb                                            [T, H]
    per layer:
        r = h @ router.T                        (SmallThinker: routes on the layer input, before any norm)
        h = h + attn(rmsnorm(h)) * residual_scale
        h = h + mlp(rmsnorm(h)) * residual_scale      (mlp = SwiGLU, or the routed ReGLU experts with r)
    logits = (rmsnorm(h) * logit_scale) @ lm_head.T                       [T, V]

MiniCPM4's muP scalars live in the spec (scale_emb, residual_scale = scale_depth / sqrt(layers),
logit_scale = dim_model_base / hidden_size); they are 1.0 for SmallThinker.

KV cache: one preallocated float32 [max_context, kv_heads, head_dim] array per layer for keys (post-RoPE, or raw for
NoPE layers) and one for values. `forward(tokens, start_pos)` writes rows start_pos .. start_pos + T - 1 and then
attends over rows 0 .. start_pos + T - 1. start_pos may be any value up to the number of cached tokens: a smaller
one rewinds the cache (the rows after it are dropped), which lets a caller re-run a suffix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pocketllm.export.errors import PocketllmError
from pocketllm.export.spec import LayerSpec, ModelSpec
from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.infllm import infllm_attention
from pocketllm.runtime_py.mlp import Expert, moe, swiglu
from pocketllm.runtime_py.rope import apply_rope, rope_tables

DEFAULT_MAX_CONTEXT = 4096


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. x: [T, H], weight: [H]."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + np.float32(eps)) * weight


def check_tokens(tokens, start_pos, vocab_size: int, max_context: int) -> tuple[np.ndarray, int]:
    """Validate one forward call's inputs: a non-empty 1-D int array of ids in [0, vocab), an integer start, and
    room in a cache of max_context positions. Returns (int64 tokens, start)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise PocketllmError(f"forward: tokens must be a non-empty 1-D integer array (got dtype {tokens.dtype}, "
                             f"shape {list(tokens.shape)})")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise PocketllmError(f"forward: token ids must lie in [0, {vocab_size}) "
                             f"(got {int(tokens.min())} .. {int(tokens.max())})")
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
        raise PocketllmError(f"forward: start_pos must be an integer (got {start_pos!r})")
    start_pos = int(start_pos)
    if start_pos + tokens.size > max_context:
        raise PocketllmError(f"forward: {start_pos} cached + {tokens.size} new tokens exceed max_context "
                             f"{max_context}; reset() or build the model with a larger max_context")
    return tokens.astype(np.int64), start_pos


# --------------------------------------------------------------------------------------------------- weights
@dataclass
class LayerWeights:
    input_norm: np.ndarray  # [H]
    wq: np.ndarray  # [Hq * D, H]
    wk: np.ndarray  # [Hkv * D, H]
    wv: np.ndarray  # [Hkv * D, H]
    wo: np.ndarray  # [H, Hq * D]
    post_norm: np.ndarray  # [H]
    # SwiGLU MLP (MiniCPM4)
    gate: np.ndarray | None = None  # [I, H]
    up: np.ndarray | None = None  # [I, H]
    down: np.ndarray | None = None  # [H, I]
    # MoE (SmallThinker)
    router: np.ndarray | None = None  # [E, H]
    experts: list[Expert] | None = None


def _take(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in weights:
        raise PocketllmError(f"reference model: missing tensor '{name}' (expected shape {list(shape)})")
    w = np.asarray(weights[name], dtype=np.float32)
    if w.shape != shape:
        raise PocketllmError(f"reference model: tensor '{name}' has shape {list(w.shape)}, expected {list(shape)}")
    return w


def _layer_weights(spec: ModelSpec, i: int, w: dict[str, np.ndarray]) -> LayerWeights:
    H, p = spec.hidden_size, f"model.layers.{i}."
    lw = LayerWeights(
        input_norm=_take(w, p + "input_layernorm.weight", (H,)),
        wq=_take(w, p + "self_attn.q_proj.weight", (spec.q_width, H)),
        wk=_take(w, p + "self_attn.k_proj.weight", (spec.kv_width, H)),
        wv=_take(w, p + "self_attn.v_proj.weight", (spec.kv_width, H)),
        wo=_take(w, p + "self_attn.o_proj.weight", (H, spec.q_width)),
        post_norm=_take(w, p + "post_attention_layernorm.weight", (H,)),
    )
    if spec.layers[i].mlp == "moe":
        E, F, q = spec.moe.num_experts, spec.moe.ffn_hidden_size, p + "block_sparse_moe."
        lw.router = _take(w, q + "primary_router.weight", (E, H))
        lw.experts = [Expert(gate=_take(w, f"{q}experts.{e}.gate.weight", (F, H)),
                             up=_take(w, f"{q}experts.{e}.up.weight", (F, H)),
                             down=_take(w, f"{q}experts.{e}.down.weight", (H, F))) for e in range(E)]
    else:
        I = spec.intermediate_size
        lw.gate = _take(w, p + "mlp.gate_proj.weight", (I, H))
        lw.up = _take(w, p + "mlp.up_proj.weight", (I, H))
        lw.down = _take(w, p + "mlp.down_proj.weight", (H, I))
    return lw


# ----------------------------------------------------------------------------------------------------- model
class ReferenceModel:
    """Numpy reference of one checkpoint, with its own KV cache. See the module docstring for the math."""

    def __init__(self, spec: ModelSpec, weights: dict[str, np.ndarray], max_context: int | None = None):
        """weights: upstream tensor name -> array (any float dtype; converted to float32)."""
        if max_context is None:
            max_context = min(spec.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or max_context <= 0:
            raise PocketllmError(f"reference model: max_context must be a positive integer (got {max_context!r})")
        if max_context > spec.max_position_embeddings:
            raise PocketllmError(f"reference model: max_context {max_context} exceeds the model's "
                                 f"max_position_embeddings ({spec.max_position_embeddings})")
        for i, layer in enumerate(spec.layers):
            if layer.attention == "infllm" and spec.sparse is None:
                raise PocketllmError(f"reference model: layer {i} uses InfLLM v2 but the spec has no sparse_config")
            if layer.attention not in ("dense", "sliding", "infllm"):
                raise PocketllmError(f"reference model: layer {i} attention {layer.attention!r} is not supported")
        self.spec = spec
        self.max_context = int(max_context)

        V, H = spec.vocab_size, spec.hidden_size
        self.embed = _take(weights, "model.embed_tokens.weight", (V, H))  # [V, H]
        self.layers = [_layer_weights(spec, i, weights) for i in range(spec.num_layers)]
        self.final_norm = _take(weights, "model.norm.weight", (H,))  # [H]
        self.lm_head = self.embed if spec.tie_word_embeddings else _take(weights, "lm_head.weight", (V, H))  # [V, H]

        self.cos, self.sin = rope_tables(spec.rope, self.max_context)  # [max_context, rope.dim] each
        shape = (self.max_context, spec.num_kv_heads, spec.head_dim)
        self.k_cache = [np.zeros(shape, dtype=np.float32) for _ in range(spec.num_layers)]
        self.v_cache = [np.zeros(shape, dtype=np.float32) for _ in range(spec.num_layers)]
        self.length = 0  # tokens currently in the cache
        # Per layer, the InfLLM v2 block selection of the last call (bool [Hkv, T, n_blocks]); None elsewhere.
        self.last_selection: list[np.ndarray | None] = [None] * spec.num_layers

    @classmethod
    def from_checkpoint(cls, path: str | Path, max_context: int | None = None) -> "ReferenceModel":
        """Validate a HF-style checkpoint directory (export.checkpoint) and load its weights as float32."""
        from pocketllm.export.checkpoint import open_checkpoint
        from pocketllm.runtime_py.weights import load_weights

        ckpt = open_checkpoint(path)
        if ckpt.quantization is not None:  # hook: packed 4/8-bit weights, dequantized by runtime_py/quant.py
            from pocketllm.runtime_py.quant import quantized_weight_loader

            load_weights = quantized_weight_loader(ckpt.quantization)  # noqa: F811
        if ckpt.spec.family == "minimax":  # hook: lightning hybrids have their own model (runtime_py/minimax.py)
            from pocketllm.runtime_py.minimax import MiniMaxReferenceModel

            return MiniMaxReferenceModel(ckpt.spec, load_weights(ckpt.dir, ckpt.weight_map), max_context=max_context)
        return cls(ckpt.spec, load_weights(ckpt.dir, ckpt.weight_map), max_context=max_context)

    def reset(self) -> None:
        """Forget every cached token (the next forward must start at position 0)."""
        self.length = 0
        self.last_selection = [None] * self.spec.num_layers

    # ------------------------------------------------------------------------------------------- forward
    def _check_call(self, tokens, start_pos) -> tuple[np.ndarray, int]:
        tokens, start_pos = check_tokens(tokens, start_pos, self.spec.vocab_size, self.max_context)
        if not 0 <= start_pos <= self.length:
            raise PocketllmError(f"forward: start_pos {start_pos} must be between 0 and the {self.length} cached "
                                 "tokens (positions cannot be skipped)")
        return tokens, start_pos

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        """Run T new tokens at positions start_pos .. start_pos + T - 1 and append them to the KV cache.

        tokens: int [T]. Returns logits float32 [T, vocab]. start_pos <= cached tokens (smaller rewinds the cache).
        """
        tokens, start_pos = self._check_call(tokens, start_pos)
        spec = self.spec
        T, L = tokens.size, start_pos + tokens.size
        eps, residual_scale = spec.rms_norm_eps, np.float32(spec.residual_scale)

        h = self.embed[tokens] * np.float32(spec.scale_emb)  # [T, H]
        cos, sin = self.cos[start_pos:L], self.sin[start_pos:L]  # [T, rope.dim]
        for i, (layer, lw) in enumerate(zip(spec.layers, self.layers)):
            router_logits = h @ lw.router.T if layer.mlp == "moe" else None  # [T, E], from the layer input
            x = rms_norm(h, lw.input_norm, eps)
            h = h + self._attention(i, layer, lw, x, start_pos, cos, sin) * residual_scale
            u = rms_norm(h, lw.post_norm, eps)
            if layer.mlp == "moe":
                m = moe(u, router_logits, lw.experts, spec.moe.top_k, spec.moe.router_softmax)
            else:
                m = swiglu(u, lw.gate, lw.up, lw.down)
            h = h + m * residual_scale
        self.length = L

        h = rms_norm(h, self.final_norm, eps) * np.float32(spec.logit_scale)  # [T, H]
        return (h @ self.lm_head.T).astype(np.float32)  # [T, V]

    def _attention(self, i: int, layer: LayerSpec, lw: LayerWeights, x: np.ndarray, start_pos: int,
                   cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Self-attention of layer i for normed input x [T, H]; writes the layer's cache. Returns [T, H]."""
        spec = self.spec
        T, L, D = x.shape[0], start_pos + x.shape[0], spec.head_dim
        q = (x @ lw.wq.T).reshape(T, spec.num_heads, D)  # [T, Hq, D]
        k = (x @ lw.wk.T).reshape(T, spec.num_kv_heads, D)  # [T, Hkv, D]
        v = (x @ lw.wv.T).reshape(T, spec.num_kv_heads, D)  # [T, Hkv, D]
        if layer.use_rope:  # NoPE layers skip the rotation entirely
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.k_cache[i][start_pos:L] = k
        self.v_cache[i][start_pos:L] = v
        keys, values = self.k_cache[i][:L], self.v_cache[i][:L]  # [L, Hkv, D]

        if layer.attention == "infllm":
            out, self.last_selection[i] = infllm_attention(q, keys, values, start_pos, spec.sparse)
        elif layer.attention == "sliding":
            out = causal_attention(q, keys, values, start_pos, window=layer.sliding_window)
        else:
            out = causal_attention(q, keys, values, start_pos)
        return out.reshape(T, spec.q_width) @ lw.wo.T  # [T, H]
