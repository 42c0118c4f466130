"""Grouped-query softmax attention = q/k/v/o projections + RoPE + a KV-cache module + an attention core.

    q, k, v = x Wq, x Wk, x Wv          [1, T, heads, head_dim]
    q, k = rope(q), rope(k)             (not on NoPE layers)
    keys, values = cache.update(k, v, start_pos)       export/nn/kv_cache.py
    out = core(q, keys, values, start_pos, positions)  export/nn/attention_core.py: dense, sliding window, InfLLM v2
    return out Wo

Targets swap `cache` and `core` (e.g. ExecuTorch's llama::update_cache / llama::custom_sdpa), never this forward.
`start_pos=None` runs without the cache (causal over the given tokens only), which is what training uses.
Projection names mirror upstream (`self_attn.q_proj`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketllm.export.nn.attention_core import attention_core
from pocketllm.export.nn.kv_cache import KVCache
from pocketllm.export.nn.rope import RotaryTable
from pocketllm.export.spec import LayerSpec, ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: LayerSpec, max_context: int):
        super().__init__()
        H, D = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, D
        self.use_rope = layer.use_rope
        self.q_proj = nn.Linear(H, spec.q_width, bias=False)
        self.k_proj = nn.Linear(H, spec.kv_width, bias=False)
        self.v_proj = nn.Linear(H, spec.kv_width, bias=False)
        self.o_proj = nn.Linear(spec.q_width, H, bias=False)
        self.cache = KVCache(max_context, spec.num_kv_heads, D)
        self.core = attention_core(layer, spec.sparse)

    def forward(self, x: torch.Tensor, rotary: RotaryTable, positions: torch.Tensor, start_pos) -> torch.Tensor:
        """x: [B, T, hidden]; positions: [T] absolute positions; start_pos: int/SymInt or None (no cache, any B)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = rotary(q, positions), rotary(k, positions)
        keys, values = (k, v) if start_pos is None else self.cache.update(k, v, start_pos)
        out = self.core(q, keys, values, start_pos, positions)
        return self.o_proj(out.reshape(B, T, -1))
