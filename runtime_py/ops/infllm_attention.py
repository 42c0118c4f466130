"""InfLLM v2 sparse attention, exactly as docs/infllm_v2.md states it (numbers below are that file's steps).

One call processes T new queries at absolute positions p0 .. p0 + T - 1 against the cache's first L = p0 + T keys
(post-RoPE, this call's keys already written). Per KV head (its G query heads share one selection):

  1. dense fallback   dense_len != -1 and L < dense_len: plain causal attention for the whole call
  2. kernels          Kc1[j] = mean(K[s*j : s*j + k]); coarse Kc2 the same with 4k, 4s; a query at i sees a
                      compressed key iff its window ends at or before i
  3. kernel scores    upstream: p_h[j] = exp(q_h . Kc1[j] / sqrt(d) - LSE_j'(q_h . Kc2[j'] / sqrt(d)))
                      exact:    p_h[j] = softmax_j(q_h . Kc1[j] / sqrt(d))
                      summed over the group's heads; float64 arithmetic in a fixed order (step 3a)
  4. block scores     score[b] = max over visible kernels touching block b ([B*b, B*b + B)), -inf if none
  5. forced blocks    b < init_blocks, and b_q - W/B <= b <= b_q (b_q = i // B); blocks b > b_q are invalid
  6. selection        all forced valid blocks + the best (K - #forced) other valid blocks scoring above -inf,
                      K = topk + W/B, ties to the lower block index
  7. attention        exact softmax over the tokens j <= i of the selected blocks

Step 3a is why the sums below are Python loops: every sum runs in one fixed order (over the window, over head_dim,
over coarse keys, over heads) and exp is `exp_fixed`, built from IEEE +, -, * only, so that this file, the torch op
and the C++ kernel compute bit-identical block scores.

Vectorised over queries: logits [Hkv, G, T, n] -> kernel scores [Hkv, T, n] -> block scores [Hkv, T, n_blocks]
-> selection mask [Hkv, T, n_blocks] -> token mask [Hkv, T, L].
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

from pocketllm.runtime_py.attention import masked_attention

if TYPE_CHECKING:  # annotations only: the spec's SparseSpec fields are read, no code is shared
    from pocketllm.export.spec import SparseSpec

# exp_fixed (docs/infllm_v2.md step 3a): x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor polynomial of degree 11
# (relative error < 1e-14), times 2^k built from bits. Below EXP_ZERO_BELOW the result is 0 and above EXP_INF_ABOVE
# +inf, so that every intermediate value stays a normal double (no engine's flush-to-zero setting can matter).
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238  # 32 significant bits: k * LN2_HI is exact for |k| < 2^21
LN2_LO = 1.9082149292705877e-10
EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(12))  # 1/n!, n = 0 .. 11
EXP_ZERO_BELOW = -600.0
EXP_INF_ABOVE = 700.0


def exp_fixed(x: np.ndarray) -> np.ndarray:
    """exp(x) in float64 from a fixed sequence of IEEE operations: bit-identical in numpy, torch and C++."""
    xc = np.clip(x, EXP_ZERO_BELOW, EXP_INF_ABOVE)
    k = np.rint(xc * LOG2E)  # nearest integer, ties to even
    r = (xc - k * LN2_HI) - k * LN2_LO
    p = np.full_like(r, EXP_TAYLOR[11])
    for c in reversed(EXP_TAYLOR[:11]):
        p = p * r + c
    two_k = ((k.astype(np.int64) + 1023) << 52).view(np.float64)
    return np.where(x < EXP_ZERO_BELOW, 0.0, np.where(x > EXP_INF_ABOVE, np.inf, p * two_k))


def uses_dense_fallback(total_len: int, sparse: SparseSpec) -> bool:
    """Step 1: the whole call is dense when the total length after it is below dense_len (-1: never dense)."""
    return sparse.dense_len != -1 and total_len < sparse.dense_len


def compressed_keys(k: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Step 2. k: [L, Hkv, D] -> [n, Hkv, D] fp32, the mean of each complete window of `size` keys every `stride`
    (n = floor((L - size) / stride) + 1; none if L < size). Summed in float64 over the window in order, divided
    once, rounded once to fp32."""
    L = k.shape[0]
    n = (L - size) // stride + 1 if L >= size else 0
    starts = stride * np.arange(n)
    total = np.zeros((n,) + k.shape[1:], dtype=np.float64)
    for t in range(size):
        total += k[starts + t]
    return (total / size).astype(np.float32)


def visible_keys(n: int, size: int, stride: int, positions: np.ndarray) -> np.ndarray:
    """Step 2: [T, n] bool, compressed key j (window [stride*j, stride*j + size)) is visible to the query at i iff
    its window ends at or before i."""
    return (stride * np.arange(n) + size - 1)[None, :] <= positions[:, None]


def logits(q: np.ndarray, kc: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """q: [T, Hq, D], kc: [n, Hkv, D], visible: [T, n] -> q_h . kc[j] / sqrt(D) as float64 [Hkv, G, T, n], -inf
    where not visible. The dot product is summed over head_dim in order (products of fp32 values are exact in
    float64, so this is also what a fused multiply-add computes)."""
    T, Hq, D = q.shape
    n, Hkv, _ = kc.shape
    qg = q.astype(np.float64).reshape(T, Hkv, Hq // Hkv, D).transpose(1, 2, 0, 3)  # [Hkv, G, T, D]
    kd = kc.astype(np.float64).transpose(1, 0, 2)[:, None, None]  # [Hkv, 1, 1, n, D]
    dot = np.zeros((Hkv, Hq // Hkv, T, n))
    for d in range(D):
        dot += qg[..., d, None] * kd[..., d]
    return np.where(visible, dot * (1.0 / math.sqrt(D)), -np.inf)


def group_scores(x: np.ndarray, x_norm: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Step 3. x: logits over Kc1 [Hkv, G, T, n], x_norm: logits over the normalising keys [Hkv, G, T, n_norm]
    (Kc2 for upstream, Kc1 itself for exact), visible: [T, n] -> sum_h exp(x - LSE(x_norm)) [Hkv, T, n].

    LSE = m + log(l) with m = max x_norm, l = sum exp(x_norm - m), so exp(x - LSE) = exp(x - m) * (1 / l). A query
    that sees no normalising key has LSE = -inf: every kernel it sees scores +inf."""
    m = x_norm.max(axis=-1, initial=-np.inf)  # [Hkv, G, T]
    seen = m > -np.inf
    m = np.where(seen, m, 0.0)[..., None]
    e = exp_fixed(x_norm - m)  # 0 where not visible
    total = np.zeros(e.shape[:-1])
    for j in range(e.shape[-1]):  # in key order
        total = total + e[..., j]
    p = exp_fixed(x - m) * (1.0 / np.where(seen, total, 1.0))[..., None]
    p = np.where(seen[..., None], p, np.inf)
    group = p[:, 0]
    for g in range(1, p.shape[1]):  # in head order
        group = group + p[:, g]
    return np.where(visible, group, -np.inf)


def kernel_scores(q: np.ndarray, k: np.ndarray, positions: np.ndarray, sparse: SparseSpec) -> np.ndarray:
    """Steps 2-3. q: [T, Hq, D], k: [L, Hkv, D], positions: [T] -> group scores [Hkv, T, n_kernels] float64, -inf
    for kernels a query cannot see (they end after it)."""
    kc = compressed_keys(k, sparse.kernel_size, sparse.kernel_stride)
    visible = visible_keys(kc.shape[0], sparse.kernel_size, sparse.kernel_stride, positions)
    x = logits(q, kc, visible)
    if sparse.score_rule == "exact":
        return group_scores(x, x, visible)
    size, stride = sparse.coarse_kernel_size, sparse.coarse_kernel_stride
    kc2 = compressed_keys(k, size, stride)
    return group_scores(x, logits(q, kc2, visible_keys(kc2.shape[0], size, stride, positions)), visible)


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
    scores = np.full((Hkv, T, n_blocks), -np.inf)
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

    candidate = valid & ~forced & (scores > -np.inf)  # [Hkv, T, n_blocks]
    ranked = np.where(candidate, scores, -np.inf)
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

    group = kernel_scores(q, k, positions, sparse)  # [Hkv, T, n]
    scores = block_scores(group, n_blocks, sparse)  # [Hkv, T, n_blocks]
    selected = select_blocks(scores, positions, sparse)  # [Hkv, T, n_blocks]
    token_mask = selected[:, :, np.arange(L) // B] & causal[None]  # [Hkv, T, L]
    return masked_attention(q, k, v, token_mask), selected
