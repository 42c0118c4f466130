"""pocketllm::lightning_attention — lightning (decayed linear) attention with an explicit recurrent state.

Schema (layout [B, T, H, D] like the other attention ops; B = 1 outside training):
    lightning_attention(Tensor q, Tensor k, Tensor v, Tensor state, Tensor decay, int block_size)
        -> (Tensor out, Tensor new_state)
    lightning_attention.out(..., *, Tensor(a!) out, Tensor(b!) new_state) -> (Tensor(a!), Tensor(b!))

q, k, v: [B, T, H, D], already activated (SiLU), no RoPE, no 1/sqrt(D) scale.
state:   [B, H, D, D] fp32, S = sum over past tokens j of lambda^(age of j) k_j^T v_j (zeros for a new sequence).
decay:   [H] fp32 decay rate s_h >= 0 of this layer's heads; lambda_h = exp(-s_h).
Returns out [B, T, H, D] in q's dtype and the state after the T tokens, [B, H, D, D] fp32, both contiguous. The
op never writes its inputs: the calling module copies new_state into its buffer (what ExecuTorch and Core ML both
lower as a mutable buffer / state).

Math (docs/lightning.md), per head, for token i of the call (0-based) and S0 the incoming state:
    o_i = q_i (lambda^(i+1) S0 + sum_{j <= i} lambda^(i-j) k_j^T v_j)
    S_T = lambda^T S0 + sum_j lambda^(T-1-j) k_j^T v_j
computed in blocks of `block_size` tokens: intra-block [(Q K^T) * D] V with D_ij = lambda^(i-j) (i >= j), plus
inter-block (Q * lambda^(i+1)) S_prev, then S = lambda^n S_prev + (K * lambda^(n-1-j))^T V for a block of n
tokens. T = 1 is one decode step: S = lambda S + k^T v, o = q S. The cost is O(T B D + T D^2) per head and the
state is the same size whatever the position: decode memory does not grow with the context.
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor q, Tensor k, Tensor v, Tensor state, Tensor decay, int block_size"
LIB.define(f"lightning_attention({SCHEMA_ARGS}) -> (Tensor, Tensor)")
LIB.define(f"lightning_attention.out({SCHEMA_ARGS}, *, Tensor(a!) out, Tensor(b!) new_state) "
           "-> (Tensor(a!), Tensor(b!))")


def lightning_decay_rates(num_heads: int, layer_index: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rate s_h [H] fp32 of layer `layer_index` (upstream's `slope_rate`, computed the same way).

    s_h = 2^(-8(h+1)/H) * (1 - l / (L - 1 + 1e-5) + 1e-5): the deeper the layer, the slower its memory fades.
    """
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads) + 1)
    return (rate * (1 - layer_index / (num_layers - 1 + 1e-5) + 1e-5)).to(torch.float32)


def check_lightning_args(q, k, v, state, decay, block_size) -> None:
    """One-line PocketllmError for any shape/dtype mismatch (also runs under fake tensors at export time)."""
    if q.dim() != 4:
        raise PocketllmError(f"lightning_attention: q must be [batch, tokens, heads, head_dim] (got {list(q.shape)})")
    B, T, H, D = q.shape
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape) != tuple(q.shape):
        raise PocketllmError(f"lightning_attention: q, k, v must share one shape (got {list(q.shape)}, "
                             f"{list(k.shape)}, {list(v.shape)})")
    if tuple(state.shape) != (B, H, D, D):
        raise PocketllmError(f"lightning_attention: state has shape {list(state.shape)}, expected "
                             f"{[B, H, D, D]} (batch, heads, head_dim, head_dim) for q of shape {list(q.shape)}")
    if state.dtype != torch.float32:
        raise PocketllmError(f"lightning_attention: state must be float32 (got {state.dtype})")
    if tuple(decay.shape) != (H,):
        raise PocketllmError(f"lightning_attention: decay has shape {list(decay.shape)}, expected [{H}] (one rate "
                             "per head)")
    if block_size <= 0:
        raise PocketllmError(f"lightning_attention: block_size must be positive (got {block_size})")


def lightning_attention_reference(q, k, v, state, decay, block_size):
    """Readable reference: the block loop above. Returns (out [B,T,H,D] in q's dtype, new state [B,H,D,D] fp32).

    Computed in float64 and rounded once per call, so that a chunked prefill and one-token decode steps agree to
    fp32 rounding of the stored state (in fp32 a 256-token block alone drifts ~1e-6 relative from the recurrence).
    """
    check_lightning_args(q, k, v, state, decay, block_size)
    T = q.shape[1]
    qf, kf, vf = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    s = decay.double().view(1, -1, 1, 1)  # [1, H, 1, 1]
    S = state.double()
    outs = []
    for start in range(0, T, block_size):
        n = min(block_size, T - start)
        qb, kb, vb = qf[:, :, start:start + n], kf[:, :, start:start + n], vf[:, :, start:start + n]
        i = torch.arange(n, dtype=torch.float64)
        age = (i[:, None] - i[None, :]).view(1, 1, n, n)  # i - j
        mask = torch.exp(-s * age.clamp(min=0)) * (age >= 0)  # D_ij = lambda^(i-j), 0 above the diagonal
        intra = ((qb @ kb.transpose(-1, -2)) * mask) @ vb
        inter = (qb * torch.exp(-s * (i + 1).view(1, 1, n, 1))) @ S
        outs.append(intra + inter)
        k_decay = torch.exp(-s * (n - 1 - i).view(1, 1, n, 1))
        S = torch.exp(-s * n) * S + (kb * k_decay).transpose(-1, -2) @ vb
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype).contiguous()
    return out, S.float().contiguous()


@torch.library.impl(LIB, "lightning_attention", "CompositeExplicitAutograd")
def _lightning_attention(q, k, v, state, decay, block_size):
    return lightning_attention_reference(q, k, v, state, decay, block_size)


@torch.library.impl(LIB, "lightning_attention.out", "CompositeExplicitAutograd")
def _lightning_attention_out(q, k, v, state, decay, block_size, *, out, new_state):
    result, s = lightning_attention_reference(q, k, v, state, decay, block_size)
    out.resize_(result.shape)
    out.copy_(result)
    new_state.resize_(s.shape)
    new_state.copy_(s)
    return out, new_state


@torch.library.register_fake("pocketllm::lightning_attention")
def _lightning_attention_fake(q, k, v, state, decay, block_size):
    check_lightning_args(q, k, v, state, decay, block_size)
    # contiguous like the real outputs (q is usually a strided view of the fused qkv projection)
    return q.new_empty(q.shape), state.new_empty(state.shape)


@torch.library.register_fake("pocketllm::lightning_attention.out")
def _lightning_attention_out_fake(q, k, v, state, decay, block_size, *, out, new_state):
    return out, new_state
