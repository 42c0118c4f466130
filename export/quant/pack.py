"""Nibble packing of 4-bit codes (the inverse lives with the readers: export/ops/any4_linear.py, runtime_py/quant.py).

Layout (docs/quantization.md): codes [N, K] in 0..15 -> uint8 [N, K/2]; byte j of a row holds column 2j in its low
nibble (bits 0-3) and column 2j+1 in its high nibble (bits 4-7), the order ONNX MatMulNBits uses.
"""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes: integer [N, K] (K even) with values 0..15 -> uint8 [N, K/2]."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 [N, K] codes (for tests and error reports; readers have their own)."""
    p = packed.to(torch.int64)
    return torch.stack([p & 15, torch.div(p, 16, rounding_mode="floor")], dim=-1).reshape(p.shape[0], -1)
