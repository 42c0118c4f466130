"""int8 baseline: per output channel symmetric round-to-nearest.

Per row: s = max |w| / 127 (fp16); q = round(w / s) clamped to -127 .. 127 (int8); W = q s.
"""

from __future__ import annotations

import torch

from pocketllm.export.quant.common import FP16_TINY, to_fp16


def quantize(w: torch.Tensor, group_size: int = 0) -> dict[str, torch.Tensor]:
    """w: fp32 [N, K] -> {qweight int8 [N, K], scales fp16 [N, 1]}. group_size is unused (per channel)."""
    s16 = to_fp16(torch.clamp(w.abs().amax(dim=1, keepdim=True) / 127, min=FP16_TINY), "a channel scale")
    q = torch.clamp(torch.round(w / s16.float()), -127, 127).to(torch.int8)
    return {"qweight": q, "scales": s16}
