"""Helpers the scheme files share: group views, fp16 scale/zero rounding, nearest-code lookup."""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError

FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal): scales never round to zero


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, K/g, g] view."""
    N, K = w.shape
    return w.reshape(N, K // g, g)


def to_fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    out = t.to(torch.float16)
    if not bool(torch.isfinite(out).all()):
        raise PocketllmError(f"{what} overflows fp16 (|value| > 65504): this weight cannot be stored in the packed "
                             "format")
    return out


def minmax_scale_zero(w: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) asymmetric range: s = max(max - min, 1e-6) / 15, z = min + 8 s, both rounded to fp16.

    w: fp32 [N, K] -> (scales fp16 [N, G], zeros fp16 [N, G]). The zero is rounded after the scale, from the
    fp16 scale, so that z - 8 s is as close to the group minimum as fp16 allows.
    """
    wg = grouped(w, g)
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    s16 = to_fp16(torch.clamp(mx - mn, min=1e-6) / 15, "a group scale")
    z16 = to_fp16(mn + 8 * s16.float(), "a group zero")
    return s16, z16


def nearest_code(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a row-wise ascending table. table: [N, 16] (or [16]); x: [N, M] -> int64.

    Ties go to the lower index. Uses the 15 midpoints and a binary search per value.
    """
    if table.dim() == 1:
        table = table.expand(x.shape[0], -1)
    table = table.to(torch.float32)
    mid = ((table[:, 1:] + table[:, :-1]) * 0.5).contiguous()
    return torch.searchsorted(mid, x.contiguous())
