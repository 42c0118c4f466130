"""int8_linear in numpy: y = x @ W.T with W = qweight * scale per output channel (docs/quantization.md, int8).

Written from the format's definition, independently of export/ops/int8_linear.py. For a weight [N, K] stored as
qweight int8 [N, K] and scales fp16 [N, 1]: W[i, j] = float32(qweight[i, j]) * float32(scales[i]), one rounding.
"""

from __future__ import annotations

import numpy as np


def int8_dequantize(qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [N, K]."""
    return qweight.astype(np.float32) * np.asarray(scales, dtype=np.float32).reshape(-1, 1)


def int8_linear(x: np.ndarray, qweight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """x [..., K] float32 -> [..., N] float32."""
    return np.asarray(x, dtype=np.float32) @ int8_dequantize(qweight, scales).T
