"""any4_linear in numpy: y = x @ W.T with W dequantized from 4-bit codes and a per-row 16-entry table.

Written from docs/quantization.md, independently of export/ops/any4_linear.py (the reference must not share the
arithmetic it checks). For a weight [N, K] stored as

    codes  [N, K] from qweight uint8 [N, K/2]: byte b of a row holds column 2b in bits 0-3, 2b+1 in bits 4-7
    W[i, j] = lut[i, code] * scale[i, j / g] + zero[i, j / g]        lut [N, 16], scale/zero [N, K/g] (fp16)

All arithmetic is float32 after exact fp16 -> fp32 widening: one multiply, then one add, each rounded (no fused
multiply-add), which is what makes the torch model and this reference agree bit for bit on the dequantized values.
The same table lookup dequantizes int4 (a fixed table c - 8) and nf4 (the NF4 codebook, no zero): runtime_py/quant.py.
"""

from __future__ import annotations

import numpy as np


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> uint8 [N, K], low nibble first."""
    n, half = packed.shape
    codes = np.empty((n, 2 * half), dtype=np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    return codes


def dequantize_lut(codes: np.ndarray, lut: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None) -> np.ndarray:
    """codes [N, K] (0..15), lut [N, 16] or [16], scales/zeros [N, G] -> float32 [N, K] = lut[code] * s (+ z)."""
    n, k = codes.shape
    groups = scales.shape[1]
    lut = np.broadcast_to(np.asarray(lut, dtype=np.float32), (n, 16))
    values = np.take_along_axis(lut, codes.astype(np.intp), axis=1)  # [N, K]
    w = values.reshape(n, groups, k // groups) * scales.astype(np.float32)[:, :, None]
    if zeros is not None:
        w = w + zeros.astype(np.float32)[:, :, None]
    return w.reshape(n, k)


def any4_dequantize(qweight: np.ndarray, lut: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """The any4 weight [N, K] float32 of one module's packed tensors."""
    return dequantize_lut(unpack_codes(qweight), lut.astype(np.float32), scales, zeros)


def any4_linear(x: np.ndarray, qweight: np.ndarray, lut: np.ndarray, scales: np.ndarray,
                zeros: np.ndarray) -> np.ndarray:
    """x [..., K] float32 -> [..., N] float32."""
    return np.asarray(x, dtype=np.float32) @ any4_dequantize(qweight, lut, scales, zeros).T
