"""The numpy reference model for MiniMax-style hybrids (model_type "minimax"): lightning + softmax attention, MoE.

Written from shared/docs/MODELS.md section 5 and docs/lightning.md, against the tensor names transformers'
`MiniMaxForCausalLM.save_pretrained` writes. Shares only the spec reader with export/. Everything is float32
(lightning arithmetic in float64, see lightning.py).

    h = embed[ids]                                                          [T, H]
    per layer (post-norm, DeepNorm-style residual weights from the spec):
        x = rmsnorm(h);  h = x * attn_alpha + mixer(x) * attn_beta
        u = rmsnorm(h);  h = u * mlp_alpha  + moe(u) * mlp_beta
    mixer = lightning attention (layer_types "linear_attention"):
        q | k | v = silu(x @ qkv_proj.T), per head [q | k | v];  o = lightning(q, k, v) over the layer's state
        mixer(x) = (rmsnorm_1e-6(o over all heads) * sigmoid(x @ output_gate.T)) @ out_proj.T
    or softmax attention ("full_attention"): GQA, RoPE on the first rope.dim channels of each head, KV cache
    moe(u) = sum over the top-k experts of softmax-renormalised weight * w2(silu(w1 u) * w3 u); router = gate(u)
    logits = rmsnorm(h) @ lm_head.T                                         [T, V]

Caches: KV arrays [max_context, kv_heads, head_dim] for the softmax layers only; one state [heads, head_dim,
head_dim] per lightning layer, whose size does not depend on the position. A call at start_pos 0 starts a new
sequence; otherwise start_pos must continue the cached sequence (a running state cannot rewind).
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.decoder import check_max_context, check_tokens, take as _take
from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.mlp import RouterTrace, swiglu
from pocketllm.runtime_py.ops.lightning_attention import decay_rates, lightning_attention
from pocketllm.runtime_py.ops.rms_norm import rms_norm
from pocketllm.runtime_py.ops.rope import apply_rope
from pocketllm.runtime_py.ops.silu_mul import sigmoid, silu
from pocketllm.runtime_py.rope import rope_tables


@dataclass
class MiniMaxLayer:
    input_norm: np.ndarray  # [H]
    post_norm: np.ndarray  # [H]
    router: np.ndarray  # [E, H]
    experts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # (w1 [F, H], w3 [F, H], w2 [H, F]) per expert
    # lightning layers
    qkv: np.ndarray | None = None  # [3 * heads * D, H]
    gate: np.ndarray | None = None  # [heads * D, H]
    norm: np.ndarray | None = None  # [heads * D]
    out: np.ndarray | None = None  # [H, heads * D]
    rates: np.ndarray | None = None  # [heads] float64
    # softmax layers
    wq: np.ndarray | None = None  # [Hq * D, H]
    wk: np.ndarray | None = None  # [Hkv * D, H]
    wv: np.ndarray | None = None  # [Hkv * D, H]
    wo: np.ndarray | None = None  # [H, Hq * D]


def _layer(spec, i: int, w: dict[str, np.ndarray]) -> MiniMaxLayer:
    H, p = spec.hidden_size, f"model.layers.{i}."
    E, F, m = spec.moe.num_experts, spec.moe.ffn_hidden_size, p + "block_sparse_moe."
    layer = MiniMaxLayer(
        input_norm=_take(w, p + "input_layernorm.weight", (H,)),
        post_norm=_take(w, p + "post_attention_layernorm.weight", (H,)),
        router=_take(w, m + "gate.weight", (E, H)),
        experts=[(_take(w, f"{m}experts.{e}.w1.weight", (F, H)), _take(w, f"{m}experts.{e}.w3.weight", (F, H)),
                  _take(w, f"{m}experts.{e}.w2.weight", (H, F))) for e in range(E)],
    )
    a = p + "self_attn."
    if spec.layers[i].attention == "lightning":
        W = spec.num_heads * spec.head_dim
        layer.qkv = _take(w, a + "qkv_proj.weight", (3 * W, H))
        layer.gate = _take(w, a + "output_gate.weight", (W, H))
        layer.norm = _take(w, a + "norm.weight", (W,))
        layer.out = _take(w, a + "out_proj.weight", (H, W))
        layer.rates = decay_rates(spec.num_heads, i, spec.num_layers)
    else:
        layer.wq = _take(w, a + "q_proj.weight", (spec.q_width, H))
        layer.wk = _take(w, a + "k_proj.weight", (spec.kv_width, H))
        layer.wv = _take(w, a + "v_proj.weight", (spec.kv_width, H))
        layer.wo = _take(w, a + "o_proj.weight", (H, spec.q_width))
    return layer


class Model:
    """Numpy reference of one MiniMax checkpoint with its own KV caches and lightning states (module docstring).

    Load it with `runtime_py.ReferenceModel.from_checkpoint(dir)`, which picks this class for minimax checkpoints.
    """

    def __init__(self, spec, weights: dict[str, np.ndarray], max_context: int | None = None):
        if spec.family != "minimax":
            raise PocketllmError(f"MiniMax reference model: expected a minimax spec (got family {spec.family!r})")
        self.spec, self.max_context = spec, check_max_context(spec, max_context)
        V, H = spec.vocab_size, spec.hidden_size
        self.embed = _take(weights, "model.embed_tokens.weight", (V, H))
        self.layers = [_layer(spec, i, weights) for i in range(spec.num_layers)]
        self.final_norm = _take(weights, "model.norm.weight", (H,))
        self.lm_head = self.embed if spec.tie_word_embeddings else _take(weights, "lm_head.weight", (V, H))
        self.cos, self.sin = rope_tables(spec.rope, self.max_context)  # [max_context, rope.dim]

        kv = (self.max_context, spec.num_kv_heads, spec.head_dim)
        st = (spec.num_heads, spec.head_dim, spec.head_dim)
        lightning = [layer.attention == "lightning" for layer in spec.layers]
        self.k_cache = [None if lt else np.zeros(kv, np.float32) for lt in lightning]
        self.v_cache = [None if lt else np.zeros(kv, np.float32) for lt in lightning]
        self.states = [np.zeros(st, np.float32) if lt else None for lt in lightning]  # [heads, D, D] each
        self.length = 0
        self.router = RouterTrace()  # margins of the last call, for parity (mlp.RouterTrace)

    def reset(self) -> None:
        """Forget the sequence: zero every lightning state (KV rows are overwritten by the next call)."""
        self.length = 0
        for s in self.states:
            if s is not None:
                s.fill(0.0)

    def _check_call(self, tokens, start_pos) -> tuple[np.ndarray, int]:
        tokens, start_pos = check_tokens(tokens, start_pos, self.spec.vocab_size, self.max_context)
        if start_pos not in (0, self.length):
            raise PocketllmError(f"forward: start_pos {start_pos} must be 0 (new sequence) or {self.length} "
                                 "(continue): lightning layers keep a running state that cannot rewind")
        return tokens, start_pos

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        """tokens int [T] at positions start_pos .. start_pos + T - 1 -> logits float32 [T, vocab]."""
        tokens, start_pos = self._check_call(tokens, start_pos)
        if start_pos == 0:
            self.reset()
        spec, eps = self.spec, self.spec.rms_norm_eps
        L = start_pos + tokens.size
        h = self.embed[tokens]  # [T, H]
        cos, sin = self.cos[start_pos:L], self.sin[start_pos:L]
        self.router.start(start_pos, tokens.size)
        for i, (ls, lw) in enumerate(zip(spec.layers, self.layers)):
            x = rms_norm(h, lw.input_norm, eps)
            if ls.attention == "lightning":
                mixed = self._lightning(i, lw, x)
            else:
                mixed = self._softmax(i, ls, lw, x, start_pos, cos, sin)
            h = x * np.float32(ls.attn_alpha) + mixed * np.float32(ls.attn_beta)
            u = rms_norm(h, lw.post_norm, eps)
            h = u * np.float32(ls.mlp_alpha) + self._moe(i, lw, u) * np.float32(ls.mlp_beta)
        self.length = L
        h = rms_norm(h, self.final_norm, eps)
        return (h @ self.lm_head.T).astype(np.float32)

    def _lightning(self, i: int, lw: MiniMaxLayer, x: np.ndarray) -> np.ndarray:
        spec = self.spec
        T, Hh, D = x.shape[0], spec.num_heads, spec.head_dim
        qkv = silu(x @ lw.qkv.T).reshape(T, Hh, 3, D)  # per head [q | k | v]
        o, self.states[i] = lightning_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.states[i], lw.rates,
                                                spec.lightning.block_size)
        o = rms_norm(o.reshape(T, Hh * D), lw.norm, spec.lightning.norm_eps)
        return (o * sigmoid(x @ lw.gate.T)) @ lw.out.T

    def _softmax(self, i, ls, lw: MiniMaxLayer, x, start_pos, cos, sin) -> np.ndarray:
        spec = self.spec
        T, L, D = x.shape[0], start_pos + x.shape[0], spec.head_dim
        q = apply_rope((x @ lw.wq.T).reshape(T, spec.num_heads, D), cos, sin)
        k = apply_rope((x @ lw.wk.T).reshape(T, spec.num_kv_heads, D), cos, sin)
        self.k_cache[i][start_pos:L] = k
        self.v_cache[i][start_pos:L] = (x @ lw.wv.T).reshape(T, spec.num_kv_heads, D)
        out = causal_attention(q, self.k_cache[i][:L], self.v_cache[i][:L], start_pos, window=ls.sliding_window)
        return out.reshape(T, spec.q_width) @ lw.wo.T

    def _moe(self, i: int, lw: MiniMaxLayer, u: np.ndarray) -> np.ndarray:
        chosen, weights = self.router.route(i, u @ lw.router.T, self.spec.moe.top_k, apply_softmax=True)  # [T, k]
        out = np.zeros_like(u)
        for e, (w1, w3, w2) in enumerate(lw.experts):
            rows, slot = np.nonzero(chosen == e)
            if rows.size:
                out[rows] += weights[rows, slot, None] * swiglu(u[rows], w1, w3, w2)
        return out
