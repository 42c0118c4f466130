"""rms_norm in numpy: x / sqrt(mean(x^2) + eps) * weight over the last axis (the decoder's norm; the twin of
export/ops/rms_norm.py, written from the model's definition in docs/MODELS.md)."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x: [..., H] float32, weight: [H]. Returns float32 [..., H]."""
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + np.float32(eps)) * weight
