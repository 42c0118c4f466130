"""pocketllm::infllm_attention — InfLLM v2 block-sparse attention over a static KV cache.

Schema (layout [B=1, S, H, D] like ExecuTorch's llama::custom_sdpa):
    infllm_attention(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, int kernel_size,
                     int kernel_stride, int block_size, int init_blocks, int window_size, int topk,
                     int dense_len, int score_rule=0) -> Tensor
    infllm_attention.out(..., *, Tensor(a!) out) -> Tensor(a!)

q: [1, T, Hq, D] post-RoPE queries at positions start_pos .. start_pos+T-1.
k_cache, v_cache: [1, S_max, Hkv, D], already holding this call's keys; the valid prefix is L = start_pos + T.
score_rule: 0 = upstream (exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))), coarse keys Kc2 of 4x kernel and stride),
            1 = exact (softmax over Kc1); SCORE_RULE_CODES maps SparseSpec.score_rule to it.
Returns [1, T, Hq, D] in q's dtype. Selection rule: docs/infllm_v2.md (compressed keys, kernel scores summed over
the GQA group in float64 with a fixed order of operations, max over the kernels touching each block, forced init +
local blocks, top-k with ties to the lower index, dense below dense_len).
"""

from __future__ import annotations

import math

import torch

from pocketllm.export.ops.library import LIB
from pocketllm.export.spec import SparseSpec

SCORE_RULE_CODES = {"upstream": 0, "exact": 1}

SCHEMA_ARGS = ("Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, int kernel_size, int kernel_stride, "
               "int block_size, int init_blocks, int window_size, int topk, int dense_len, int score_rule=0")
LIB.define(f"infllm_attention({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"infllm_attention.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def infllm_op_args(s: SparseSpec) -> tuple[int, ...]:
    """The op's arguments after start_pos, from the spec."""
    return (s.kernel_size, s.kernel_stride, s.block_size, s.init_blocks, s.window_size, s.topk, s.dense_len,
            SCORE_RULE_CODES[s.score_rule])


# exp_fixed: exp from IEEE +, -, * in a fixed order (docs/infllm_v2.md step 3a), bit-identical to runtime_py's and
# the C++ kernel's. x = k ln2 + r, Taylor polynomial of degree 11 for exp(r), times 2^k built from bits.
LOG2E = 1.4426950408889634
LN2_HI = 0.6931471803691238
LN2_LO = 1.9082149292705877e-10
EXP_TAYLOR = tuple(1.0 / math.factorial(n) for n in range(12))
EXP_ZERO_BELOW, EXP_INF_ABOVE = -600.0, 700.0


def exp_fixed(x: torch.Tensor) -> torch.Tensor:
    xc = x.clamp(EXP_ZERO_BELOW, EXP_INF_ABOVE)
    k = torch.round(xc * LOG2E)  # ties to even
    r = (xc - k * LN2_HI) - k * LN2_LO
    p = torch.full_like(r, EXP_TAYLOR[11])
    for c in reversed(EXP_TAYLOR[:11]):
        p = p * r + c
    two_k = ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    y = torch.where(x > EXP_INF_ABOVE, torch.full_like(x, math.inf), p * two_k)
    return torch.where(x < EXP_ZERO_BELOW, torch.zeros_like(x), y)


def compressed_keys(k: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """k: [L, Hkv, D] -> [n, Hkv, D] fp32 means of the complete windows, summed in float64 in window order."""
    L = k.shape[0]
    n = (L - size) // stride + 1 if L >= size else 0
    starts = stride * torch.arange(n)
    total = torch.zeros((n,) + tuple(k.shape[1:]), dtype=torch.float64)
    for t in range(size):
        total = total + k[starts + t].double()
    return (total / size).float()


def kernel_logits(q: torch.Tensor, kc: torch.Tensor, pos: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """q: [T, Hq, D], kc: [n, Hkv, D] -> q_h . kc[j] / sqrt(D) in float64 [Hkv, G, T, n], summed over D in order;
    -inf where the window of kc[j] ends after the query."""
    T, Hq, D = q.shape
    n, Hkv, _ = kc.shape
    qg = q.double().reshape(T, Hkv, Hq // Hkv, D).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    kd = kc.double().permute(1, 0, 2)[:, None, None]  # [Hkv, 1, 1, n, D]
    dot = torch.zeros(Hkv, Hq // Hkv, T, n, dtype=torch.float64)
    for d in range(D):
        dot = dot + qg[..., d, None] * kd[..., d]
    visible = (stride * torch.arange(n) + size - 1)[None, :] <= pos[:, None]  # [T, n]
    return (dot * (1.0 / math.sqrt(D))).masked_fill(~visible, -math.inf)


def group_scores(x: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """sum over the group's heads of exp(x - LSE(x_norm)) -> [Hkv, T, n], -inf where x is -inf (not visible).
    exp(x - LSE) = exp(x - m) * (1 / l), m = max x_norm, l = sum exp(x_norm - m) in key order; no visible
    normalising key (LSE = -inf) -> +inf."""
    m = x_norm.amax(dim=-1) if x_norm.shape[-1] else torch.full(x_norm.shape[:-1], -math.inf, dtype=torch.float64)
    seen = m > -math.inf
    m = torch.where(seen, m, torch.zeros_like(m))[..., None]
    e = exp_fixed(x_norm - m)
    total = torch.zeros(e.shape[:-1], dtype=torch.float64)
    for j in range(e.shape[-1]):
        total = total + e[..., j]
    p = exp_fixed(x - m) * (1.0 / torch.where(seen, total, torch.ones_like(total)))[..., None]
    p = torch.where(seen[..., None], p, torch.full_like(p, math.inf))
    group = p[:, 0]
    for g in range(1, p.shape[1]):
        group = group + p[:, g]
    return group.masked_fill(x[:, 0] == -math.inf, -math.inf)


def kernel_touch_range(n_blocks: int, kernel_size: int, kernel_stride: int, block_size: int):
    """For each block b, the first kernel index touching it and how many (a contiguous run)."""
    b = torch.arange(n_blocks)
    lo = torch.clamp(torch.div(block_size * b - kernel_size + 1 + kernel_stride - 1, kernel_stride,
                               rounding_mode="floor"), min=0)
    hi = torch.div(block_size * b + block_size - 1, kernel_stride, rounding_mode="floor")
    return lo, hi - lo + 1


def infllm_block_scores(q: torch.Tensor, k: torch.Tensor, start_pos: int, kernel_size: int, kernel_stride: int,
                        block_size: int, score_rule: int = 0) -> torch.Tensor:
    """Block scores float64 [Hkv, T, n_blocks] (-inf: no visible kernel touches the block).

    q: [T, Hq, D]; k: [L, Hkv, D] (the valid cache prefix)."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    n_blocks = (L + block_size - 1) // block_size
    pos = start_pos + torch.arange(T)  # [T]
    kc = compressed_keys(k, kernel_size, kernel_stride)
    n_kernels = kc.shape[0]
    if n_kernels == 0:
        return torch.full((Hkv, T, n_blocks), -math.inf, dtype=torch.float64)
    x = kernel_logits(q, kc, pos, kernel_size, kernel_stride)  # [Hkv, G, T, nk]
    if score_rule == SCORE_RULE_CODES["exact"]:
        x_norm = x
    else:
        kc2 = compressed_keys(k, 4 * kernel_size, 4 * kernel_stride)
        x_norm = kernel_logits(q, kc2, pos, 4 * kernel_size, 4 * kernel_stride)
    score = group_scores(x, x_norm)  # [Hkv, T, nk]
    # Block score: max over the (contiguous) kernels touching the block.
    lo, count = kernel_touch_range(n_blocks, kernel_size, kernel_stride, block_size)
    r = torch.arange(int(count.max()))
    j = lo[:, None] + r[None, :]  # [nb, R]
    ok = (r[None, :] < count[:, None]) & (j < n_kernels)
    gathered = score[:, :, j.clamp(max=n_kernels - 1)]  # [Hkv, T, nb, R]
    return gathered.masked_fill(~ok[None, None], -math.inf).amax(dim=-1)


def infllm_block_mask(q: torch.Tensor, k: torch.Tensor, start_pos: int, kernel_size: int, kernel_stride: int,
                      block_size: int, init_blocks: int, window_size: int, topk: int,
                      score_rule: int = 0) -> torch.Tensor:
    """Selected blocks per KV head and query: bool [Hkv, T, n_blocks], n_blocks = ceil(L / block_size).

    q: [T, Hq, D]; k: [L, Hkv, D] (the valid cache prefix). Always sparse (the caller applies dense_len).
    """
    T = q.shape[0]
    block_score = infllm_block_scores(q, k, start_pos, kernel_size, kernel_stride, block_size, score_rule)
    n_blocks = block_score.shape[-1]
    pos = start_pos + torch.arange(T)
    blocks = torch.arange(n_blocks)
    b_q = torch.div(pos, block_size, rounding_mode="floor")[:, None]  # [T, 1]
    valid = blocks[None, :] <= b_q
    local = window_size // block_size
    forced = valid & ((blocks[None, :] < init_blocks) | (blocks[None, :] >= b_q - local))  # [T, nb]
    candidate = valid[None] & ~forced[None] & (block_score > -math.inf)  # [Hkv, T, nb]
    slots = torch.clamp(topk + local - forced.sum(dim=1), min=0)  # [T]
    key = block_score.masked_fill(~candidate, -math.inf)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # ties keep the lower index first
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, blocks.expand_as(order).contiguous())
    chosen = candidate & (rank < slots[None, :, None])
    return forced[None] | chosen


def infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                               init_blocks, window_size, topk, dense_len, score_rule=0):
    """Readable reference: build the token mask from the block selection, then masked softmax attention."""
    if score_rule not in SCORE_RULE_CODES.values():
        raise ValueError(f"infllm_attention: score_rule must be one of {sorted(SCORE_RULE_CODES.values())}, "
                         f"got {score_rule}")
    start_pos = int(start_pos)
    _, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    L = start_pos + T
    k = k_cache[0, :L]
    v = v_cache[0, :L]
    pos = start_pos + torch.arange(T)
    causal = torch.arange(L)[None, :] <= pos[:, None]  # [T, L]
    if dense_len != -1 and L < dense_len:
        mask = causal.expand(Hkv, T, L)
    else:
        blocks = infllm_block_mask(q[0], k, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                                   window_size, topk, score_rule)
        mask = blocks.repeat_interleave(block_size, dim=-1)[..., :L] & causal[None]  # [Hkv, T, L]
    G = Hq // Hkv
    qf = q[0].float().reshape(T, Hkv, G, D)
    scores = torch.einsum("thgd,lhd->hgtl", qf, k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("hgtl,lhd->thgd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(1, T, Hq, D).to(q.dtype)


@torch.library.impl(LIB, "infllm_attention", "CompositeExplicitAutograd")
def _infllm_attention(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                      window_size, topk, dense_len, score_rule=0):
    return infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                                      init_blocks, window_size, topk, dense_len, score_rule)


@torch.library.impl(LIB, "infllm_attention.out", "CompositeExplicitAutograd")
def _infllm_attention_out(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                          window_size, topk, dense_len, score_rule=0, *, out):
    result = infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                                        init_blocks, window_size, topk, dense_len, score_rule)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::infllm_attention")
def _infllm_attention_fake(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                           window_size, topk, dense_len, score_rule=0):
    return torch.empty_like(q)


@torch.library.register_fake("pocketllm::infllm_attention.out")
def _infllm_attention_out_fake(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                               init_blocks, window_size, topk, dense_len, score_rule=0, *, out):
    return out
