"""pocketllm::infllm_attention — InfLLM v2 block-sparse attention over a static KV cache.

Schema (layout [B=1, S, H, D] like ExecuTorch's llama::custom_sdpa):
    infllm_attention(Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, int kernel_size,
                     int kernel_stride, int block_size, int init_blocks, int window_size, int topk,
                     int dense_len) -> Tensor
    infllm_attention.out(..., *, Tensor(a!) out) -> Tensor(a!)

q: [1, T, Hq, D] post-RoPE queries at positions start_pos .. start_pos+T-1.
k_cache, v_cache: [1, S_max, Hkv, D], already holding this call's keys; the valid prefix is L = start_pos + T.
Returns [1, T, Hq, D] in q's dtype. Selection rule: docs/infllm_v2.md (compressed keys, exact-softmax kernel
scores summed over the GQA group, max over the kernels touching each block, forced init + local blocks, top-k with
ties to the lower index, dense below dense_len).
"""

from __future__ import annotations

import math

import torch

from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = ("Tensor q, Tensor k_cache, Tensor v_cache, SymInt start_pos, int kernel_size, int kernel_stride, "
               "int block_size, int init_blocks, int window_size, int topk, int dense_len")
LIB.define(f"infllm_attention({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"infllm_attention.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def kernel_touch_range(n_blocks: int, kernel_size: int, kernel_stride: int, block_size: int):
    """For each block b, the first kernel index touching it and how many (a contiguous run)."""
    b = torch.arange(n_blocks)
    lo = torch.clamp(torch.div(block_size * b - kernel_size + 1 + kernel_stride - 1, kernel_stride,
                               rounding_mode="floor"), min=0)
    hi = torch.div(block_size * b + block_size - 1, kernel_stride, rounding_mode="floor")
    return lo, hi - lo + 1


def infllm_block_mask(q: torch.Tensor, k: torch.Tensor, start_pos: int, kernel_size: int, kernel_stride: int,
                      block_size: int, init_blocks: int, window_size: int, topk: int) -> torch.Tensor:
    """Selected blocks per KV head and query: bool [Hkv, T, n_blocks], n_blocks = ceil(L / block_size).

    q: [T, Hq, D]; k: [L, Hkv, D] (the valid cache prefix). Always sparse (the caller applies dense_len).
    """
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    n_blocks = (L + block_size - 1) // block_size
    pos = start_pos + torch.arange(T)  # [T]
    neg_inf = torch.tensor(float("-inf"))

    # Stage 0: compressed keys, mean of each complete window of kernel_size keys.
    n_kernels = (L - kernel_size) // kernel_stride + 1 if L >= kernel_size else 0
    if n_kernels > 0:
        idx = kernel_stride * torch.arange(n_kernels)[:, None] + torch.arange(kernel_size)[None, :]
        kc = k.float()[idx].mean(dim=1)  # [n_kernels, Hkv, D]
        # Stage 1: exact softmax over the kernels each query sees, summed over the GQA group.
        qg = q.float().reshape(T, Hkv, G, D)
        logits = torch.einsum("thgd,nhd->htgn", qg, kc) / math.sqrt(D)  # [Hkv, T, G, n_kernels]
        visible = (kernel_stride * torch.arange(n_kernels) + kernel_size - 1)[None, :] <= pos[:, None]  # [T, nk]
        logits = logits.masked_fill(~visible[None, :, None, :], float("-inf"))
        has_any = visible.any(dim=1)  # [T]
        p = torch.softmax(torch.where(has_any[None, :, None, None], logits, torch.zeros_like(logits)), dim=-1)
        score = p.sum(dim=2).masked_fill(~visible[None], float("-inf"))  # [Hkv, T, nk]
        # Block score: max over the (contiguous) kernels touching the block.
        lo, count = kernel_touch_range(n_blocks, kernel_size, kernel_stride, block_size)
        r = torch.arange(int(count.max()))
        j = lo[:, None] + r[None, :]  # [nb, R]
        ok = (r[None, :] < count[:, None]) & (j < n_kernels)
        gathered = score[:, :, j.clamp(max=n_kernels - 1)]  # [Hkv, T, nb, R]
        block_score = gathered.masked_fill(~ok[None, None], float("-inf")).amax(dim=-1)  # [Hkv, T, nb]
    else:
        block_score = neg_inf.expand(Hkv, T, n_blocks).clone()

    blocks = torch.arange(n_blocks)
    b_q = torch.div(pos, block_size, rounding_mode="floor")[:, None]  # [T, 1]
    valid = blocks[None, :] <= b_q
    local = window_size // block_size
    forced = valid & ((blocks[None, :] < init_blocks) | (blocks[None, :] >= b_q - local))  # [T, nb]
    candidate = valid[None] & ~forced[None] & torch.isfinite(block_score)  # [Hkv, T, nb]
    slots = torch.clamp(topk + local - forced.sum(dim=1), min=0)  # [T]
    key = block_score.masked_fill(~candidate, float("-inf"))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices  # ties keep the lower index first
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, blocks.expand_as(order).contiguous())
    chosen = candidate & (rank < slots[None, :, None])
    return forced[None] | chosen


def infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                               init_blocks, window_size, topk, dense_len):
    """Readable reference: build the token mask from the block selection, then masked softmax attention."""
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
                                   window_size, topk)
        mask = blocks.repeat_interleave(block_size, dim=-1)[..., :L] & causal[None]  # [Hkv, T, L]
    G = Hq // Hkv
    qf = q[0].float().reshape(T, Hkv, G, D)
    scores = torch.einsum("thgd,lhd->hgtl", qf, k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = torch.einsum("hgtl,lhd->thgd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(1, T, Hq, D).to(q.dtype)


@torch.library.impl(LIB, "infllm_attention", "CompositeExplicitAutograd")
def _infllm_attention(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                      window_size, topk, dense_len):
    return infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                                      init_blocks, window_size, topk, dense_len)


@torch.library.impl(LIB, "infllm_attention.out", "CompositeExplicitAutograd")
def _infllm_attention_out(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                          window_size, topk, dense_len, *, out):
    result = infllm_attention_reference(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                                        init_blocks, window_size, topk, dense_len)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::infllm_attention")
def _infllm_attention_fake(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size, init_blocks,
                           window_size, topk, dense_len):
    return torch.empty_like(q)


@torch.library.register_fake("pocketllm::infllm_attention.out")
def _infllm_attention_out_fake(q, k_cache, v_cache, start_pos, kernel_size, kernel_stride, block_size,
                               init_blocks, window_size, topk, dense_len, *, out):
    return out
