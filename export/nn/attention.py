"""Grouped-query attention over a static KV cache: dense, sliding window, NoPE, or InfLLM v2 (custom op).

Differences from the upstream eager blocks: the cache is a pair of fixed-size buffers [1, max_context, Hkv, D]
written in place by slice assignment (what ExecuTorch and Core ML both lower), and InfLLM v2 layers call
`pocketllm::infllm_attention` instead of upstream's CUDA kernels. `start_pos=None` runs without the cache
(causal over the given tokens only), which is what training uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import export.ops  # noqa: F401  (registers pocketllm custom ops)
from export.nn.rope import RotaryTable
from export.ops.infllm_attention import infllm_op_args
from export.spec import LayerSpec, ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, max_context: int):
        super().__init__()
        H, D = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, D
        self.layer, self.sparse = layer, spec.sparse if layer.attention == "infllm" else None
        self.q_proj = nn.Linear(H, spec.q_width, bias=False)
        self.k_proj = nn.Linear(H, spec.kv_width, bias=False)
        self.v_proj = nn.Linear(H, spec.kv_width, bias=False)
        self.o_proj = nn.Linear(spec.q_width, H, bias=False)
        cache_shape = (1, max_context, spec.num_kv_heads, D)
        self.register_buffer("k_cache", torch.zeros(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape), persistent=False)

    def forward(self, x: torch.Tensor, rotary: RotaryTable, positions: torch.Tensor, start_pos) -> torch.Tensor:
        """x: [1, T, hidden]; positions: [T] absolute positions; start_pos: int/SymInt or None (no cache)."""
        B, T, _ = x.shape  # B > 1 only on the cache-free (training) path
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.layer.use_rope:
            q, k = rotary(q, positions), rotary(k, positions)

        if start_pos is None:  # training / cache-free: causal over these tokens
            keys, values, key_pos = k, v, positions
        else:
            self.k_cache[:, start_pos:start_pos + T] = k
            self.v_cache[:, start_pos:start_pos + T] = v
            if self.sparse is not None:
                out = torch.ops.pocketllm.infllm_attention(q, self.k_cache, self.v_cache, start_pos,
                                                           *infllm_op_args(self.sparse))
                return self.o_proj(out.reshape(1, T, -1))
            keys, values = self.k_cache[:, :start_pos + T], self.v_cache[:, :start_pos + T]
            key_pos = torch.arange(start_pos + T)

        if start_pos is None and self.layer.sliding_window is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        mask = key_pos[None, :] <= positions[:, None]  # [T, L]
        if self.layer.sliding_window is not None:
            mask = mask & (positions[:, None] - key_pos[None, :] < self.layer.sliding_window)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
