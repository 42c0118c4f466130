"""The KV cache of one softmax-attention layer: a swappable part of `Attention` (export/nn/attention.py).

KVCache keeps keys and values in two fixed-size buffers [1, max_context, kv_heads, head_dim], non-persistent (never
in a state dict), written in place by slice assignment: what torch.export turns into a mutable buffer (ExecuTorch)
or a state (Core ML). A target swaps in its own cache (ExecuTorch: `llama::update_cache`; ONNX: past/present
tensors as graph inputs and outputs) with the same `update` contract.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, max_context: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        shape = (1, max_context, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    @classmethod
    def sharing(cls, cache: "KVCache") -> "KVCache":
        """A cache of this class over `cache`'s buffers (a target's swap: same storage, another `update`)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.register_buffer("k_cache", cache.k_cache, persistent=False)
        new.register_buffer("v_cache", cache.v_cache, persistent=False)
        return new

    @property
    def max_context(self) -> int:
        return self.k_cache.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, T, kv_heads, head_dim] at positions start_pos.. and return (keys, values): tensors whose
        first start_pos + T rows are the sequence's keys and values (here the whole buffers; rows past that are
        stale and must be masked by the attention core)."""
        T = k.shape[1]
        self.k_cache[:, start_pos:start_pos + T] = k
        self.v_cache[:, start_pos:start_pos + T] = v
        return self.k_cache, self.v_cache

    @torch.no_grad()
    def reset(self, dtype: torch.dtype | None = None) -> None:
        """Zero the buffers (optionally re-allocating them in another dtype)."""
        dtype = dtype or self.k_cache.dtype
        self.k_cache = torch.zeros(self.k_cache.shape, dtype=dtype)
        self.v_cache = torch.zeros(self.v_cache.shape, dtype=dtype)
