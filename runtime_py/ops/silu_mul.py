"""silu_mul in numpy: silu(gate) * up, the SwiGLU product (the twin of export/ops/silu_mul.py)."""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow for large |x| (each branch only exponentiates a non-positive number)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate, up: float32 of one shape."""
    return silu(gate) * up
