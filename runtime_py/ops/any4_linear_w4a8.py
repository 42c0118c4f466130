"""numpy twin of pocketllm::any4_linear_w4a8 (any4 weights, dynamic int8 activations), from its definition in
docs/quantization.md ("W4A8"); independent of export/ops/any4_linear_w4a8.py.

    lut_to_int8(lut)            -> lut_i8 int8 [N, 16], lut_scale float32 [N]   (ls = max|lut| / 127)
    quantize_tokens(x)          -> xq int8 [M, K], sx float32 [M], finite bool [M]
    any4_linear_w4a8(x, qweight, lut_i8, lut_scale, scales, zeros, group_size) -> y float32 [..., N]
        (scales, zeros: float16 in blocks of 8 rows, [ceil(N / 8), G, 8]; element [b, g, r] is row 8b + r)

Integer dot products per (token, row, group) are exact (float64 BLAS over integer values: every partial sum is an
integer below 2^53); the float part runs in float32 in the definition's order, so the result equals the C++ kernel's
bit for bit.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def _rint_clip(v: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v), -127, 127).astype(np.int8)  # np.rint: round half to even


def lut_to_int8(lut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(lut, dtype=F32)
    ls = (np.abs(f).max(axis=1) / F32(127)).astype(F32)
    lq = np.zeros(f.shape, dtype=np.int8)
    ok = ls > 0
    lq[ok] = _rint_clip(f[ok] / ls[ok, None])
    return lq, ls


def quantize_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=F32)
    finite = np.isfinite(x).all(axis=1)
    sx = np.zeros(x.shape[0], dtype=F32)
    sx[finite] = np.abs(x[finite]).max(axis=1) / F32(127)
    xq = np.zeros(x.shape, dtype=np.int8)
    ok = sx > 0
    xq[ok] = _rint_clip(x[ok] / sx[ok, None])
    return xq, sx, finite


def unpack_codes(qweight: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> [N, K] codes: byte b holds column 2b in bits 0-3 and column 2b+1 in bits 4-7."""
    return np.stack([qweight & 15, qweight >> 4], axis=-1).reshape(qweight.shape[0], -1)


def any4_linear_w4a8(x, qweight, lut_i8, lut_scale, scales, zeros, group_size: int) -> np.ndarray:
    x = np.asarray(x, dtype=F32)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    g = group_size
    G = K // g
    lead = x.shape[:-1]
    xq, sx, finite = quantize_tokens(x.reshape(-1, K))
    M = xq.shape[0]
    wq = np.take_along_axis(np.asarray(lut_i8, dtype=np.int64), unpack_codes(qweight).astype(np.intp), axis=1)
    xg = xq.astype(np.float64).reshape(M, G, g)
    wg = wq.astype(np.float64).reshape(N, G, g)
    rows = lambda t: np.asarray(t).transpose(0, 2, 1).reshape(-1, G)[:N].astype(F32)  # [N, G]
    d = (np.asarray(lut_scale, dtype=F32)[:, None] * rows(scales)).astype(F32)
    z = rows(zeros)
    acc = np.zeros((M, N), dtype=F32)
    for gi in range(G):
        A = (xg[:, gi] @ wg[:, gi].T).astype(np.int64)  # [M, N], exact integers
        B = xq.reshape(M, G, g)[:, gi].astype(np.int64).sum(axis=1)  # [M]
        acc = acc + (A.astype(F32) * d[None, :, gi] + B.astype(F32)[:, None] * z[None, :, gi])
    y = acc * sx[:, None]
    y[~finite] = np.nan
    return y.reshape(*lead, N)
