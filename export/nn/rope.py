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
        return self.at(positions)(x)

    def at(self, positions: torch.Tensor) -> "RotaryAt":
        """The tables' rows for these positions, gathered once: the decoder does this once per forward and hands
        the result to every layer (one gather per call instead of two per rotated tensor per layer)."""
        return RotaryAt(self.cos[positions][None, :, None, :], self.sin[positions][None, :, None, :], self.rope.dim)

    @staticmethod
    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class RotaryAt:
    """cos/sin [1, T, 1, dim] of T positions; `rope(x)` (or `rope(x, positions)`, the RotaryTable signature, the
    positions being those already gathered) rotates x [1, T, H, D]. Targets may override `rotate_half`."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dim: int, rotate_half=None):
        self.cos, self.sin, self.dim = cos, sin, dim
        self.rotate_half = rotate_half or RotaryTable.rotate_half

    def __call__(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        if self.dim < x.shape[-1]:
            return torch.cat([self(x[..., :self.dim]), x[..., self.dim:]], dim=-1)
        xf = x.float()
        return (xf * self.cos + self.rotate_half(xf) * self.sin).to(x.dtype)
