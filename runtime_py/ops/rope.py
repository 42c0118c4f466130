"""rope in numpy: rotary position embedding, rotate-half layout (the twin of export/ops/rope.py; runtime_py/rope.py
builds the cos/sin tables).

    rope(x) = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]   on the first `dim` channels
"""

from __future__ import annotations

import numpy as np


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[..., d] -> [..., d]: concat(-x2, x1) where x1, x2 are the two halves of the last axis."""
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate the first `dim` channels of every head.

    x: [T, heads, head_dim] float32; cos, sin: [T, dim] (rows for the T tokens' positions), dim <= head_dim.
    Channels past `dim` (partial RoPE) pass through unrotated.
    """
    dim = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]  # [T, 1, dim], broadcast over heads
    rotated = x[..., :dim] * c + rotate_half(x[..., :dim]) * s
    if dim == x.shape[-1]:
        return rotated
    return np.concatenate([rotated, x[..., dim:]], axis=-1)
