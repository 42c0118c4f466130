"""Rotary position embedding (rotate-half form), with MiniCPM4's LongRoPE factors.

Written from shared/docs/MODELS.md section 1, item 4, straight from the raw `RopeSpec` fields:
    inv_freq[i] = 1 / theta^(2i / dim)                       i = 0 .. dim/2 - 1
    inv_freq[i] /= factor[i]        LongRoPE only: the long list when max_position_embeddings exceeds
                                    original_max_position_embeddings, else the short list (config only)
    angle[p, i] = p * inv_freq[i]   for i < dim/2, repeated for the second half (concat(freqs, freqs))
    cos, sin    = cos(angle) * m, sin(angle) * m
                  m = sqrt(1 + ln(max_pos / orig) / ln(orig)) with LongRoPE (unclamped), else 1
    rope(x)     = x * cos + rotate_half(x) * sin     (runtime_py/ops/rope.py, the op's numpy twin)

Precision: inv_freq is computed in float64 and rounded once to float32; the angles p * inv_freq are then formed in
float32, as upstream does (it multiplies fp32 positions by an fp32 inv_freq). cos/sin of those fp32 angles are
evaluated in float64 and rounded, so the tables are the correctly rounded values of upstream's angles.
Both choices depend on the config only (upstream builds its table once at max_position_embeddings), so keys already
in the cache never change rotation, whatever the cache size.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the spec's RopeSpec fields are read, no code is shared
    from pocketllm.export.spec import RopeSpec


def rope_tables(rope: RopeSpec, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each float32 [max_context, rope.dim], for positions 0 .. max_context - 1."""
    half = rope.dim // 2
    inv_freq = 1.0 / rope.theta ** (2.0 * np.arange(half, dtype=np.float64) / rope.dim)  # [dim/2]
    magnitude = 1.0
    if rope.short_factor is not None:  # LongRoPE: MODELS.md section 1 item 4
        orig, max_pos = rope.original_max_position_embeddings, rope.max_position_embeddings
        factors = rope.long_factor if max_pos > orig else rope.short_factor
        inv_freq = inv_freq / np.asarray(factors, dtype=np.float64)
        magnitude = math.sqrt(1.0 + math.log(max_pos / orig) / math.log(orig))  # no clamp: < 1 when max_pos < orig
    positions = np.arange(max_context, dtype=np.float32)
    angles = np.outer(positions, inv_freq.astype(np.float32))  # [max_context, dim/2], fp32 products
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)  # [max_context, dim]
    cos = (np.cos(angles) * magnitude).astype(np.float32)
    sin = (np.sin(angles) * magnitude).astype(np.float32)
    return cos, sin
