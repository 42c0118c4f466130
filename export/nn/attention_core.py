"""Attention cores: given queries and the cache's keys and values, compute the attention output. The swappable
"how tokens attend" part of `Attention` (export/nn/attention.py).

Every core: forward(q [B, T, Hq, D], keys, values [B, >= L, Hkv, D], start_pos, positions [T]) -> [B, T, Hq, D],
where L = start_pos + T and rows of keys/values past L are stale. start_pos None means the cache-free path (training
and scoring): keys/values are exactly the T tokens' own, causal over them. GQA: query head h reads KV head
h // (Hq / Hkv). Scale 1/sqrt(D), softmax in the dtype SDPA uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pocketllm.export.ops  # noqa: F401  (registers pocketllm custom ops)
from pocketllm.export.ops.infllm_attention import infllm_op_args
from pocketllm.export.spec import SparseSpec


def _sdpa(q, keys, values, mask=None, causal=False):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


class DenseCore(nn.Module):
    """Causal softmax attention over every earlier position."""

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return _sdpa(q, keys, values, causal=True)
        L = start_pos + q.shape[1]
        mask = torch.arange(L)[None, :] <= positions[:, None]  # [T, L]
        return _sdpa(q, keys[:, :L], values[:, :L], mask=mask)


class SlidingWindowCore(nn.Module):
    """Causal attention over the last `window` positions: query i sees key j iff 0 <= i - j < window."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, q, keys, values, start_pos, positions):
        L = q.shape[1] if start_pos is None else start_pos + q.shape[1]
        key_pos = torch.arange(L) if start_pos is not None else positions
        mask = (key_pos[None, :] <= positions[:, None]) & (positions[:, None] - key_pos[None, :] < self.window)
        return _sdpa(q, keys[:, :L], values[:, :L], mask=mask)


class InfLLMCore(nn.Module):
    """InfLLM v2 block-sparse attention (`pocketllm::infllm_attention`, docs/infllm_v2.md) over the cache. The
    cache-free path is dense causal attention, as upstream trains."""

    def __init__(self, sparse: SparseSpec):
        super().__init__()
        self.sparse = sparse

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return _sdpa(q, keys, values, causal=True)
        return torch.ops.pocketllm.infllm_attention(q, keys, values, start_pos, *infllm_op_args(self.sparse))


def attention_core(layer, sparse: SparseSpec | None) -> nn.Module:
    """The core a LayerSpec asks for ("dense", "sliding" or "infllm")."""
    if layer.attention == "infllm":
        return InfLLMCore(sparse)
    if layer.sliding_window is not None:
        return SlidingWindowCore(layer.sliding_window)
    return DenseCore()
