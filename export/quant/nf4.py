"""nf4 baseline: groupwise absmax scaling onto the NormalFloat-4 codebook (QLoRA).

Per (row, group of g columns): s = max |w| (fp16); code c = the NF4 value nearest to w / s; W = NF4[c] * s.
NF4 holds the 16 values of QLoRA's codebook (quantiles of a standard normal, rescaled to [-1, 1], exact 0); the
readers keep their own copy of this table (docs/quantization.md lists it).
"""

from __future__ import annotations

import torch

from pocketllm.export.quant.common import FP16_TINY, grouped, nearest_code, to_fp16
from pocketllm.export.quant.pack import pack_nibbles

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def quantize(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w: fp32 [N, K]; group_size: g (K for one group per row) -> {qweight, scales}."""
    N, K = w.shape
    wg = grouped(w, group_size)
    s16 = to_fp16(torch.clamp(wg.abs().amax(dim=-1), min=FP16_TINY), "a group absmax")
    x = (wg / s16.float()[..., None]).reshape(N, K)
    codes = nearest_code(torch.tensor(NF4, dtype=torch.float32), x)
    return {"qweight": pack_nibbles(codes), "scales": s16}
