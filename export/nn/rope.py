"""Rotate-half RoPE with tables precomputed in fp32 for every cache position (LongRoPE folded in by the spec)."""

import torch
from torch import nn

from pocketllm.export.spec import RopeSpec


class RotaryTable(nn.Module):
    """cos/sin tables [max_context, dim] (non-persistent buffers, rebuilt from the spec, never loaded)."""

    def __init__(self, rope: RopeSpec, max_context: int):
        super().__init__()
        self.rope, self.max_context = rope, max_context
        self.register_buffer("cos", torch.empty(max_context, rope.dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_context, rope.dim), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        inv_freq = torch.tensor(self.rope.inv_freq(), dtype=torch.float64).float()
        freqs = torch.outer(torch.arange(self.max_context, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = self.rope.attention_scaling
        self.cos.copy_(emb.cos() * scale)
        self.sin.copy_(emb.sin() * scale)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [1, T, H, D]; positions: [T] int64. Rotation in fp32, result in x's dtype.

        Partial RoPE (rope.dim < D, MiniMax): only the first rope.dim channels rotate; the rest pass through.
        """
        if self.rope.dim < x.shape[-1]:
            return torch.cat([self(x[..., :self.rope.dim], positions), x[..., self.rope.dim:]], dim=-1)
        cos = self.cos[positions][None, :, None, :]
        sin = self.sin[positions][None, :, None, :]
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)
