"""InfLLM v2 sparse attention, exactly as docs/infllm_v2.md states it (numbers below are that file's steps).

One call processes T new queries at absolute positions p0 .. p0 + T - 1 against the cache's first L = p0 + T keys
(post-RoPE, this call's keys already written). Per KV head (its G query heads share one selection):

  1. dense fallback   dense_len != -1 and L < dense_len: plain causal attention for the whole call
  2. kernels          Kc[j] = mean(K[s*j : s*j + k]), j = 0 .. floor((L - k) / s); query i sees j iff s*j + k - 1 <= i
  3. kernel scores    sum over the group's heads of softmax_j(q_h . Kc[j] / sqrt(d)) over visible kernels
  4. block scores     score[b] = max over visible kernels touching block b ([B*b, B*b + B)), -inf if none
  5. forced blocks    b < init_blocks, and b_q - W/B <= b <= b_q (b_q = i // B); blocks b > b_q are invalid
  6. selection        all forced valid blocks + the best (K - #forced) other valid blocks with a finite score,
                      K = topk + W/B, ties to the lower block index
  7. attention        exact softmax over the tokens j <= i of the selected blocks

Vectorised over queries: kernel scores [Hkv, T, n_kernels] -> block scores [Hkv, T, n_blocks] -> selection mask
[Hkv, T, n_blocks] -> token mask [Hkv, T, L]. The only Python loop runs over blocks (n_blocks = ceil(L / B)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np


from pocketllm.runtime_py.attention import masked_attention, softmax

if TYPE_CHECKING:  # annotations only: the spec's SparseSpec fields are read, no code is shared
    from pocketllm.export.spec import SparseSpec


def uses_dense_fallback(total_len: int, sparse: SparseSpec) -> bool:
    """Step 1: the whole call is dense when the total length after it is below dense_len (-1: never dense)."""
    return sparse.dense_len != -1 and total_len < sparse.dense_len


def compressed_keys(k: np.ndarray, sparse: SparseSpec) -> np.ndarray:
    """Step 2. k: [L, Hkv, D] -> Kc [n_kernels, Hkv, D], the mean of each complete kernel window (none if L < k)."""
    size, stride = sparse.kernel_size, sparse.kernel_stride
    L = k.shape[0]
    if L < size:
        return np.zeros((0,) + k.shape[1:], dtype=np.float32)
    n = (L - size) // stride + 1
    windows = np.lib.stride_tricks.sliding_window_view(k, size, axis=0)[: (n - 1) * stride + 1 : stride]
    # windows: [n, Hkv, D, size]; the mean is accumulated in float64 and rounded once
    return windows.mean(axis=-1, dtype=np.float64).astype(np.float32)


def kernel_scores(q: np.ndarray, kc: np.ndarray, positions: np.ndarray, sparse: SparseSpec) -> np.ndarray:
    """Step 3. q: [T, Hq, D], kc: [n, Hkv, D], positions: [T] absolute -> group scores [Hkv, T, n].

    Kernels a query cannot see (they end after it) score -inf; they also take no part in the softmax.
    """
    T, Hq, D = q.shape
    n, Hkv, _ = kc.shape
    G = Hq // Hkv
    if n == 0:  # fewer keys than one kernel: nothing to score yet (only forced blocks will be read)
        return np.full((Hkv, T, 0), -np.inf, dtype=np.float32)
    visible = (sparse.kernel_stride * np.arange(n) + sparse.kernel_size - 1)[None, :] <= positions[:, None]  # [T, n]
    qg = q.reshape(T, Hkv, G, D).transpose(1, 2, 0, 3)  # [Hkv, G, T, D]
    logits = (qg @ kc.transpose(1, 2, 0)[:, None]) * np.float32(1.0 / np.sqrt(D))  # [Hkv, G, T, n]
    logits = np.where(visible, logits, np.float32(-np.inf))
    group = softmax(logits, axis=-1).sum(axis=1)  # [Hkv, T, n]
    return np.where(visible, group, np.float32(-np.inf))


def kernel_range(b: int, n: int, sparse: SparseSpec) -> tuple[int, int]:
    """Kernels j in [lo, hi) touch block b: s*j <= B*b + B - 1 and s*j + k - 1 >= B*b (clipped to 0 .. n)."""
    size, stride, B = sparse.kernel_size, sparse.kernel_stride, sparse.block_size
    lo = max(0, -((size - 1 - B * b) // stride))  # ceil((B*b - size + 1) / stride)
    hi = min(n, (B * b + B - 1) // stride + 1)
    return lo, hi


def block_scores(group: np.ndarray, n_blocks: int, sparse: SparseSpec) -> np.ndarray:
    """Step 4. group: [Hkv, T, n] (-inf = not visible) -> [Hkv, T, n_blocks], max over the kernels touching each
    block; -inf where none is visible."""
    Hkv, T, n = group.shape
    scores = np.full((Hkv, T, n_blocks), -np.inf, dtype=np.float32)
    for b in range(n_blocks):
        lo, hi = kernel_range(b, n, sparse)
        if lo < hi:
            scores[:, :, b] = group[:, :, lo:hi].max(axis=-1)
    return scores


def select_blocks(scores: np.ndarray, positions: np.ndarray, sparse: SparseSpec) -> np.ndarray:
    """Steps 5-6. scores: [Hkv, T, n_blocks], positions: [T] -> bool selection mask [Hkv, T, n_blocks]."""
    n_blocks = scores.shape[-1]
    b = np.arange(n_blocks)[None, :]  # [1, n_blocks]
    b_q = (positions // sparse.block_size)[:, None]  # [T, 1]
    valid = b <= b_q
    forced = valid & ((b < sparse.init_blocks) | (b >= b_q - sparse.local_blocks))  # [T, n_blocks]
    free_slots = np.maximum(sparse.budget - forced.sum(axis=-1), 0)  # [T]

    candidate = valid & ~forced & np.isfinite(scores)  # [Hkv, T, n_blocks]
    ranked = np.where(candidate, scores, np.float32(-np.inf))
    # Stable sort on the negated score: best first, equal scores in increasing block order.
    order = np.argsort(-ranked, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n_blocks)[None, None, :], axis=-1)
    chosen = candidate & (rank < free_slots[None, :, None])
    return forced[None] | chosen


def infllm_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                     sparse: SparseSpec) -> tuple[np.ndarray, np.ndarray]:
    """InfLLM v2 attention for one layer and one call.

    q: [T, Hq, D] float32, post-RoPE, positions start_pos .. start_pos + T - 1.
    k, v: [>= L, Hkv, D] float32 KV cache with this call's keys already written; only its first
          L = start_pos + T rows are read (a whole preallocated cache may be passed).
    Returns (out [T, Hq, D], selected bool [Hkv, T, n_blocks]) with n_blocks = ceil(L / block_size).
    In the dense fallback `selected` marks every valid block (b <= the query's own block): what dense attention
    reads.
    """
    T, L = q.shape[0], start_pos + q.shape[0]
    if k.shape[0] < L or v.shape[0] < L:
        raise ValueError(f"infllm_attention: the cache holds {k.shape[0]} rows, fewer than start_pos + T = {L}")
    k, v = k[:L], v[:L]
    Hkv = k.shape[1]
    B = sparse.block_size
    n_blocks = -(-L // B)
    positions = np.arange(start_pos, L)  # [T]
    causal = np.arange(L)[None, :] <= positions[:, None]  # [T, L]

    if uses_dense_fallback(L, sparse):
        valid = np.arange(n_blocks)[None, :] <= (positions // B)[:, None]  # [T, n_blocks]
        selected = np.broadcast_to(valid, (Hkv, T, n_blocks)).copy()
        return masked_attention(q, k, v, causal), selected

    kc = compressed_keys(k, sparse)  # [n, Hkv, D]
    group = kernel_scores(q, kc, positions, sparse)  # [Hkv, T, n]
    scores = block_scores(group, n_blocks, sparse)  # [Hkv, T, n_blocks]
    selected = select_blocks(scores, positions, sparse)  # [Hkv, T, n_blocks]
    token_mask = selected[:, :, np.arange(L) // B] & causal[None]  # [Hkv, T, L]
    return masked_attention(q, k, v, token_mask), selected
