"""Lightning attention block (MiniMax `linear_attention` layers), calling `pocketllm::lightning_attention`.

Differences from transformers' MiniMaxLightningAttention:
- the recurrent state lives in its own module, `state_cache` (RecurrentState: a fixed-size, non-persistent fp32
  buffer [1, heads, head_dim, head_dim], reset with the KV caches), instead of an entry in a dynamic cache object;
  targets swap that module (ONNX: state in, state out), never this forward;
- one op serves prefill and decode: a call of T tokens runs in blocks of `block_size` from the incoming state, so
  a prompt can be prefilled in chunks (upstream runs the block form on the first call only, then one token at a
  time);
- a call at position 0 starts a new sequence (the state is ignored, as the KV cache rows get overwritten);
- the per-head decay rates are a non-persistent buffer computed from the spec; the decay tables upstream saves
  (`slope_rate`, `query_decay`, ...) are never loaded.
Module names mirror upstream: qkv_proj, output_gate, norm, out_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pocketllm.export.ops  # noqa: F401  (registers pocketllm custom ops)
from pocketllm.export.nn.norm import RMSNorm
from pocketllm.export.ops.lightning_attention import lightning_decay_rates
from pocketllm.export.spec import ModelSpec


class RecurrentState(nn.Module):
    """The state S of one lightning layer between calls. A call at position 0 starts a new sequence (reads zeros),
    as KV-cache rows get overwritten by a new sequence."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("state", torch.zeros(1, heads, head_dim, head_dim, dtype=torch.float32),
                             persistent=False)

    def read(self, positions: torch.Tensor) -> torch.Tensor:
        # tensor form (not a Python branch) so that export keeps one graph for every start position
        return torch.where(positions[:1].view(1, 1, 1, 1) == 0, torch.zeros_like(self.state), self.state)

    def write(self, new_state: torch.Tensor) -> None:
        self.state.copy_(new_state)

    @torch.no_grad()
    def reset(self) -> None:
        self.state = torch.zeros(self.state.shape, dtype=torch.float32)


class LightningAttention(nn.Module):
    def __init__(self, spec: ModelSpec, index: int):
        super().__init__()
        H, D, hidden = spec.num_heads, spec.head_dim, spec.hidden_size
        self.num_heads, self.head_dim = H, D
        self.layer_index, self.num_layers = index, spec.num_layers
        self.block_size = spec.lightning.block_size
        self.qkv_proj = nn.Linear(hidden, 3 * H * D, bias=False)  # per head [q | k | v]
        self.output_gate = nn.Linear(hidden, H * D, bias=False)
        self.norm = RMSNorm(H * D, spec.lightning.norm_eps)
        self.out_proj = nn.Linear(H * D, hidden, bias=False)
        self.state_cache = RecurrentState(H, D)
        self.register_buffer("decay", torch.empty(H, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)build the decay rates from the spec and zero the state (also after meta-device construction)."""
        self.decay = lightning_decay_rates(self.num_heads, self.layer_index, self.num_layers)
        self.state_cache.reset()

    def forward(self, x: torch.Tensor, rotary, positions: torch.Tensor, start_pos) -> torch.Tensor:
        """x: [B, T, hidden] (normed layer input); positions: [T]; start_pos None = cache-free, state from zero.

        `rotary` is unused (lightning layers have no RoPE); the signature matches the softmax Attention block.
        """
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D).split(D, dim=-1)
        state = torch.zeros(B, H, D, D, dtype=torch.float32) if start_pos is None else self.state_cache.read(positions)
        out, new_state = torch.ops.pocketllm.lightning_attention(q, k, v, state, self.decay, self.block_size)
        if start_pos is not None:
            self.state_cache.write(new_state)
        o = self.norm(out.reshape(B, T, H * D))
        o = torch.sigmoid(self.output_gate(x)) * o
        return self.out_proj(o)
