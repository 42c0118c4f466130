"""int4 baseline: asymmetric groupwise round-to-nearest (the INT4 of the any4 paper, tinygemm's layout).

Per (row, group of g columns): s = (max - min) / 15, z = min + 8 s (fp16 each); code c = round((w - z) / s) + 8
clamped to 0..15; W = (c - 8) s + z. The same tensors as any4 without a LUT: int4 is any4 with the fixed table
-8 .. 7, which is how the readers dequantize it.
"""

from __future__ import annotations

import torch

from pocketllm.export.quant.common import grouped, minmax_scale_zero
from pocketllm.export.quant.pack import pack_nibbles


def quantize(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w: fp32 [N, K]; group_size: g (K for one group per row) -> {qweight, scales, zeros}."""
    N, K = w.shape
    s16, z16 = minmax_scale_zero(w, group_size)
    s, z = s16.float()[..., None], z16.float()[..., None]
    codes = torch.clamp(torch.round((grouped(w, group_size) - z) / s) + 8, 0, 15).reshape(N, K)
    return {"qweight": pack_nibbles(codes), "scales": s16, "zeros": z16}
