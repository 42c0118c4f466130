"""The pre-norm decoder the MiniCPM4 and SmallThinker reference models share: embeddings, KV caches, softmax
attention (dense, sliding window or InfLLM v2, with or without RoPE), the residual stream and the LM head. A family
module (runtime_py/families/<name>.py) adds its feed-forward block and its weight names.

    h = embed[ids] * scale_emb                                            [T, H]
    per layer:
        h = h + attn(rmsnorm(h)) * residual_scale
        h = h + ffn(rmsnorm(h), layer input) * residual_scale
    logits = (rmsnorm(h) * logit_scale) @ lm_head.T                       [T, V]

KV cache: one preallocated float32 [max_context, kv_heads, head_dim] array per layer for keys (post-RoPE, or raw for
NoPE layers) and one for values. `forward(tokens, start_pos)` writes rows start_pos .. start_pos + T - 1 and then
attends over rows 0 .. start_pos + T - 1. start_pos may be any value up to the number of cached tokens: a smaller
one rewinds the cache (the rows after it are dropped), which lets a caller re-run a suffix. Everything is float32;
an artifact with an fp16 cache (ExecuTorch's `kv_cache_dtype` float16) is reproduced by rounding each key and value
to fp16 as it is stored (KVCaches.dtype), which is all such a cache changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.mlp import RouterTrace
from pocketllm.runtime_py.ops.infllm_attention import infllm_attention
from pocketllm.runtime_py.ops.rms_norm import rms_norm
from pocketllm.runtime_py.ops.rope import apply_rope
from pocketllm.runtime_py.rope import rope_tables


def take(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 tensor `name`, checked against `shape` (one-line error otherwise)."""
    if name not in weights:
        raise PocketllmError(f"reference model: missing tensor '{name}' (expected shape {list(shape)})")
    w = weights[name]
    if not getattr(w, "__array_ufunc__", True):  # a weight operator (runtime_py/quant.W4A8Weight): `x @ w.T` works
        if tuple(w.shape) != shape:
            raise PocketllmError(f"reference model: tensor '{name}' has shape {list(w.shape)}, expected {list(shape)}")
        return w
    w = np.asarray(w, dtype=np.float32)
    if w.shape != shape:
        raise PocketllmError(f"reference model: tensor '{name}' has shape {list(w.shape)}, expected {list(shape)}")
    return w


def check_max_context(spec, max_context) -> int:
    if isinstance(max_context, bool) or not isinstance(max_context, (int, np.integer)) or max_context <= 0:
        raise PocketllmError(f"reference model: max_context must be a positive integer (got {max_context!r})")
    if max_context > spec.max_position_embeddings:
        raise PocketllmError(f"reference model: max_context {max_context} exceeds the model's "
                             f"max_position_embeddings ({spec.max_position_embeddings})")
    return int(max_context)


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


@dataclass
class AttentionWeights:
    wq: np.ndarray  # [Hq * D, H]
    wk: np.ndarray  # [Hkv * D, H]
    wv: np.ndarray  # [Hkv * D, H]
    wo: np.ndarray  # [H, Hq * D]


def attention_weights(spec, w: dict[str, np.ndarray], prefix: str) -> AttentionWeights:
    H, a = spec.hidden_size, prefix + "self_attn."
    return AttentionWeights(wq=take(w, a + "q_proj.weight", (spec.q_width, H)),
                            wk=take(w, a + "k_proj.weight", (spec.kv_width, H)),
                            wv=take(w, a + "v_proj.weight", (spec.kv_width, H)),
                            wo=take(w, a + "o_proj.weight", (H, spec.q_width)))


class KVCaches:
    """Per softmax layer: key and value arrays [max_context, kv_heads, head_dim]; None for layers without one.
    dtype "float16": what is stored is rounded to fp16 (kept in float32 arrays: the attention then reads exactly the
    values an fp16 cache widens to)."""

    DTYPES = ("float32", "float16")

    def __init__(self, spec, max_context: int, layers: list[bool], dtype: str = "float32"):
        if dtype not in self.DTYPES:
            raise PocketllmError(f"KV cache dtype {dtype!r}: expected one of {', '.join(self.DTYPES)}")
        shape = (max_context, spec.num_kv_heads, spec.head_dim)
        self.dtype = dtype
        self.k = [np.zeros(shape, np.float32) if has else None for has in layers]
        self.v = [np.zeros(shape, np.float32) if has else None for has in layers]

    def store(self, i: int, start_pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write layer i's keys and values [T, Hkv, D] at rows start_pos.."""
        if self.dtype == "float16":
            k, v = k.astype(np.float16), v.astype(np.float16)
        self.k[i][start_pos:start_pos + k.shape[0]] = k
        self.v[i][start_pos:start_pos + v.shape[0]] = v


def softmax_attention(spec, layer, aw: AttentionWeights, caches: KVCaches, i: int, x: np.ndarray, start_pos: int,
                      cos: np.ndarray, sin: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Self-attention of layer i for normed input x [T, H]; writes the layer's cache. Returns ([T, H], the InfLLM v2
    block selection bool [Hkv, T, n_blocks] or None)."""
    T, L, D = x.shape[0], start_pos + x.shape[0], spec.head_dim
    q = (x @ aw.wq.T).reshape(T, spec.num_heads, D)  # [T, Hq, D]
    k = (x @ aw.wk.T).reshape(T, spec.num_kv_heads, D)  # [T, Hkv, D]
    v = (x @ aw.wv.T).reshape(T, spec.num_kv_heads, D)  # [T, Hkv, D]
    if layer.use_rope:  # NoPE layers skip the rotation entirely
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    caches.store(i, start_pos, k, v)
    keys, values = caches.k[i][:L], caches.v[i][:L]  # [L, Hkv, D]
    selection = None
    if layer.attention == "infllm":
        out, selection = infllm_attention(q, keys, values, start_pos, spec.sparse)
    else:  # dense, or sliding window (window None = every earlier key)
        out = causal_attention(q, keys, values, start_pos, window=layer.sliding_window)
    return out.reshape(T, spec.q_width) @ aw.wo.T, selection


class PreNormDecoder:
    """Numpy reference of one pre-norm checkpoint, with its own KV caches (module docstring). Subclasses load their
    feed-forward weights (`load_ffn`) and compute it (`feed_forward`)."""

    def __init__(self, spec, weights: dict[str, np.ndarray], max_context: int | None = None):
        for i, layer in enumerate(spec.layers):
            if layer.attention == "infllm" and spec.sparse is None:
                raise PocketllmError(f"reference model: layer {i} uses InfLLM v2 but the spec has no sparse_config")
            if layer.attention not in ("dense", "sliding", "infllm"):
                raise PocketllmError(f"reference model: layer {i} attention {layer.attention!r} is not supported")
        self.spec, self.max_context = spec, check_max_context(spec, max_context)
        V, H = spec.vocab_size, spec.hidden_size
        self.embed = take(weights, "model.embed_tokens.weight", (V, H))  # [V, H]
        self.input_norms = [take(weights, f"model.layers.{i}.input_layernorm.weight", (H,)) for i in range(spec.num_layers)]
        self.post_norms = [take(weights, f"model.layers.{i}.post_attention_layernorm.weight", (H,))
                           for i in range(spec.num_layers)]
        self.attn = [attention_weights(spec, weights, f"model.layers.{i}.") for i in range(spec.num_layers)]
        self.ffn = [self.load_ffn(weights, i) for i in range(spec.num_layers)]
        self.final_norm = take(weights, "model.norm.weight", (H,))  # [H]
        self.lm_head = self.embed if spec.tie_word_embeddings else take(weights, "lm_head.weight", (V, H))  # [V, H]
        self.cos, self.sin = rope_tables(spec.rope, self.max_context)  # [max_context, rope.dim] each
        self.caches = KVCaches(spec, self.max_context, [True] * spec.num_layers)
        self.length = 0  # tokens currently in the cache
        # Per layer, the InfLLM v2 block selection of the last call (bool [Hkv, T, n_blocks]); None elsewhere.
        self.last_selection: list[np.ndarray | None] = [None] * spec.num_layers
        self.router = RouterTrace()  # margins of the last call for parity; families with routers route through it

    def load_ffn(self, weights: dict[str, np.ndarray], i: int):
        raise NotImplementedError

    def feed_forward(self, i: int, u: np.ndarray, layer_input: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every cached token (the next forward must start at position 0)."""
        self.length = 0
        self.last_selection = [None] * self.spec.num_layers

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        """Run T new tokens at positions start_pos .. start_pos + T - 1 and append them to the KV cache.

        tokens: int [T]. Returns logits float32 [T, vocab]. start_pos <= cached tokens (smaller rewinds the cache).
        """
        tokens, start_pos = check_tokens(tokens, start_pos, self.spec.vocab_size, self.max_context)
        if not 0 <= start_pos <= self.length:
            raise PocketllmError(f"forward: start_pos {start_pos} must be between 0 and the {self.length} cached "
                                 "tokens (positions cannot be skipped)")
        spec = self.spec
        L = start_pos + tokens.size
        eps, residual_scale = spec.rms_norm_eps, np.float32(spec.residual_scale)

        h = self.embed[tokens] * np.float32(spec.scale_emb)  # [T, H]
        cos, sin = self.cos[start_pos:L], self.sin[start_pos:L]  # [T, rope.dim]
        self.router.start(start_pos, tokens.size)
        for i, layer in enumerate(spec.layers):
            layer_input = h
            x = rms_norm(h, self.input_norms[i], eps)
            a, self.last_selection[i] = softmax_attention(spec, layer, self.attn[i], self.caches, i, x, start_pos,
                                                          cos, sin)
            h = h + a * residual_scale
            u = rms_norm(h, self.post_norms[i], eps)
            h = h + self.feed_forward(i, u, layer_input) * residual_scale
        self.length = L

        h = rms_norm(h, self.final_norm, eps) * np.float32(spec.logit_scale)  # [T, H]
        return (h @ self.lm_head.T).astype(np.float32)  # [T, V]
