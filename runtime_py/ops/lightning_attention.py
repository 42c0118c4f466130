"""Lightning attention in numpy, written from shared/docs/MODELS.md section 5 and docs/lightning.md.

One lightning layer with H heads of width d keeps a state S [H, d, d] (float32 between calls): for head h,
S = sum over every token j seen so far of lambda^(age of j) k_j^T v_j, lambda = exp(-rate_h). Per new token i:

    decode (one token)       S <- lambda S + k_i^T v_i,   o_i = q_i S
    prefill (blocks of B)    token i of a block of n, S0 = the state before the block:
                             o_i = sum_{j <= i in the block} (q_i . k_j) lambda^(i-j) v_j      (intra-block)
                                 + lambda^(i+1) q_i S0                                          (inter-block)
                             S <- lambda^n S0 + sum_j lambda^(n-1-j) k_j^T v_j

Both are the same sum; the block form is what a prefill runs. Decay rates (per layer l of L, head h of H):
rate_h = 2^(-8(h+1)/H) * (1 - l / (L - 1 + 1e-5) + 1e-5). Arithmetic in float64, rounded to float32 once per call,
so that chunked prefill and token-by-token decode agree to the rounding of the stored state. The state's size never
depends on the position: decode memory is constant in the context length.
"""

from __future__ import annotations

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError


def decay_rates(num_heads: int, layer: int, num_layers: int) -> np.ndarray:
    """float64 [H]: the decay rate of each head of layer `layer` (lambda_h = exp(-rate_h))."""
    h = np.arange(1, num_heads + 1, dtype=np.float64)
    depth = 1.0 - layer / (num_layers - 1 + 1e-5) + 1e-5
    return 2.0 ** (-8.0 * h / num_heads) * depth


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray, state: np.ndarray, rates: np.ndarray) -> None:
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise PocketllmError(f"lightning attention: q, k, v must each be [tokens, heads, head_dim] of one shape "
                             f"(got {list(q.shape)}, {list(k.shape)}, {list(v.shape)})")
    _, H, D = q.shape
    if state.shape != (H, D, D):
        raise PocketllmError(f"lightning attention: state has shape {list(state.shape)}, expected [{H}, {D}, {D}] "
                             f"(heads, head_dim, head_dim) for q of shape {list(q.shape)}")
    if rates.shape != (H,):
        raise PocketllmError(f"lightning attention: {rates.shape[0] if rates.ndim == 1 else rates.shape} decay rates "
                             f"for {H} heads")


def lightning_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, state: np.ndarray, rates: np.ndarray,
                        block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """T new tokens through one lightning layer, in blocks of `block_size`.

    q, k, v: [T, H, d] (already SiLU-activated); state: [H, d, d] before the call; rates: [H].
    Returns (out float32 [T, H, d], new state float32 [H, d, d]).
    """
    _check(q, k, v, state, rates)
    T, H, _ = q.shape
    lam = np.exp(-np.asarray(rates, dtype=np.float64))[:, None, None]  # [H, 1, 1]
    S = state.astype(np.float64)
    out = np.empty(q.shape, dtype=np.float64)
    for b0 in range(0, T, block_size):
        n = min(block_size, T - b0)
        Q, K, V = (x[b0:b0 + n].astype(np.float64).transpose(1, 0, 2) for x in (q, k, v))  # [H, n, d]
        t = np.arange(n)
        gap = t[:, None] - t[None, :]  # i - j
        decay = np.where(gap >= 0, lam ** np.maximum(gap, 0), 0.0)  # [H, n, n]
        o = np.einsum("hid,hjd,hij,hje->hie", Q, K, decay, V, optimize=True)  # intra-block
        o += np.einsum("hid,hi,hde->hie", Q, lam[:, :, 0] ** (t + 1), S)  # inter-block
        out[b0:b0 + n] = o.transpose(1, 0, 2)
        S = lam ** n * S + np.einsum("hjd,hj,hje->hde", K, lam[:, :, 0] ** (n - 1 - t), V)
    return out.astype(np.float32), S.astype(np.float32)


def lightning_recurrent(q: np.ndarray, k: np.ndarray, v: np.ndarray, state: np.ndarray,
                        rates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The decode rule applied token by token (S <- lambda S + k^T v, o = q S): the definition the block form
    must reproduce. Same arguments and results as `lightning_attention`."""
    _check(q, k, v, state, rates)
    lam = np.exp(-np.asarray(rates, dtype=np.float64))[:, None, None]
    S = state.astype(np.float64)
    out = np.empty(q.shape, dtype=np.float64)
    for i in range(q.shape[0]):
        qi, ki, vi = (x[i].astype(np.float64) for x in (q, k, v))  # [H, d]
        S = lam * S + ki[:, :, None] * vi[:, None, :]
        out[i] = np.einsum("hd,hde->he", qi, S)
    return out.astype(np.float32), S.astype(np.float32)
