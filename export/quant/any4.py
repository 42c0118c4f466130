"""any4: learned 4-bit weights (Elhoushi & Johnson, 2025), written from shared/docs/MODELS.md section 4.

For a Linear weight W [N, K] and group size g:
1. Per (row, group): s = max(max - min, 1e-6) / 15 and z = min + 8 s, rounded to fp16 (common.minmax_scale_zero).
   Normalised values w' = (w - z) / s + 8 lie in [0, 15] (not rounded).
2. Per row: 1-D weighted k-means of its K values w' into 16 centroids, k-means++ initialisation. The weight of
   column j in row i is a_j * s_{i, G(j)}: a_j the calibration activation statistic (|mean input activation| by
   default, see calibrate.py), s the group scale, so that columns that move the output more are fitted better.
3. LUT (fp16) = centroids - 8, ascending; codes = the nearest LUT entry of each w' - 8.
4. Dequantization: W[i, j] = lut_i[code_ij] * s_{i,G(j)} + z_{i,G(j)} (export/ops/any4_linear.py).

The k-means runs on all rows at once (torch, no Python loop over rows). Each row's values are first summarised in
a fine histogram of [0, 15] (total weight and weight * value per bin). In 1-D every cluster is a contiguous run of
bins, so one Lloyd step is 15 midpoints, a division and two gathers from prefix sums: O(16) per row, however long
the row; centroids are exact weighted means of the values they hold. Seeding is greedy k-means++ on a coarse
histogram, several times per row (the lowest objective wins); empty clusters are re-seeded at the costliest bin.
Rows are processed in chunks to bound memory whatever the tensor size.
"""

from __future__ import annotations

import torch

from pocketllm.export.quant.common import grouped, minmax_scale_zero, nearest_code, to_fp16
from pocketllm.export.quant.pack import pack_nibbles

LUT_SIZE = 16
CHUNK_ELEMENTS = 1 << 18  # rows per k-means batch = max(1, CHUNK_ELEMENTS // K): temporaries stay cache- and
# allocator-friendly (1 << 22 spent as much time in page faults as in arithmetic)
BINS = 1024  # fine histogram over [0, 15] for Lloyd's iterations (bins of 0.015; centroids stay exact means)
INIT_BINS = 128  # coarse histogram the k-means++ seeding samples from
N_INIT = 4  # independent seedings per row; the lowest k-means objective wins
LOCAL_TRIALS = 4  # greedy k-means++: candidates per seed (2 + int(ln 16), as scikit-learn)
MAX_ITER = 300


def _histogram(x: torch.Tensor, weight: torch.Tensor, lo: float, hi: float, bins: int):
    """Per row: total weight and total weight * value of the points in each of `bins` equal bins of [lo, hi]."""
    idx = ((x - lo) * (bins / (hi - lo))).to(torch.int64).clamp_(0, bins - 1)
    hw = torch.zeros(x.shape[0], bins, dtype=torch.float32).scatter_add_(1, idx, weight)
    hwx = torch.zeros(x.shape[0], bins, dtype=torch.float32).scatter_add_(1, idx, weight * x)
    return hw, hwx


def kmeans_pp_init(points: torch.Tensor, mass: torch.Tensor, k: int, generator: torch.Generator,
                   trials: int = LOCAL_TRIALS) -> torch.Tensor:
    """Greedy k-means++ seeds per row over weighted points: [R, P] values and masses (>= 0) -> [R, k] ascending.

    The first seed is drawn with probability proportional to mass; each next one from `trials` candidates drawn
    proportional to mass * squared distance to the nearest seed, keeping the candidate that lowers the k-means
    potential most.
    """
    R = points.shape[0]
    rows = torch.arange(R)

    def draw(m: torch.Tensor, n: int) -> torch.Tensor:  # n indices per row, probability ~ m (inverse CDF)
        m = m + (m.sum(dim=1, keepdim=True) <= 0).to(m.dtype)  # nothing left to cover: uniform
        cum = m.cumsum(dim=1)
        u = torch.rand(R, n, generator=generator, dtype=cum.dtype) * cum[:, -1:]
        return torch.searchsorted(cum, u, right=True).clamp_(max=m.shape[1] - 1)

    first = points.gather(1, draw(mass, 1))  # [R, 1]
    seeds = [first]
    d2 = (points - first) ** 2
    for _ in range(k - 1):
        cand = points.gather(1, draw(mass * d2, trials))  # [R, trials]
        nd2 = torch.minimum(d2[:, None, :], (points[:, None, :] - cand[:, :, None]) ** 2)  # [R, trials, P]
        best = (nd2 * mass[:, None, :]).sum(dim=-1).argmin(dim=1)  # [R]
        d2 = nd2[rows, best]
        seeds.append(cand[rows, best][:, None])
    return torch.sort(torch.cat(seeds, dim=1), dim=1).values


def weighted_kmeans_1d(x: torch.Tensor, weight: torch.Tensor, k: int = LUT_SIZE, lo: float = 0.0, hi: float = 15.0,
                       generator: torch.Generator | None = None, n_init: int = N_INIT, max_iter: int = MAX_ITER,
                       trials: int = LOCAL_TRIALS, init_bins: int = INIT_BINS, bins: int = BINS) -> torch.Tensor:
    """Weighted 1-D k-means of every row of x [N, M] (values in [lo, hi], weights [N, M] >= 0) -> [N, k] fp32, ascending.

    Vectorised over rows. The points of a row are first summarised in a fine histogram (weight and weight * value
    per bin, bins bins); in 1-D every cluster is a contiguous run of bins, so a Lloyd step needs only the 15
    midpoints and prefix sums: O(k) per row. Seeds: greedy k-means++ on a coarse histogram, n_init times; the
    seeding with the lowest objective wins. A row whose weights are all zero is clustered with uniform weights;
    an empty cluster is re-seeded at the costliest bin while the row has more occupied bins than filled clusters.
    Values closer than one fine bin (15 / bins) may share a cluster.
    """
    generator = generator or torch.Generator().manual_seed(0)
    N = x.shape[0]
    x = x.to(torch.float32)
    weight = weight.to(torch.float32)
    weight = torch.where(weight.sum(dim=1, keepdim=True) > 0, weight, torch.ones_like(weight))
    hw, hwx = _histogram(x, weight, lo, hi, bins)

    # seeds from a coarse histogram (bin means as points, bin weights as masses), n_init per row
    fold = bins // init_bins
    cw, cwx = hw.view(N, init_bins, fold).sum(-1), hwx.view(N, init_bins, fold).sum(-1)
    centers = lo + (torch.arange(init_bins, dtype=torch.float32) + 0.5) * ((hi - lo) / init_bins)
    pts = torch.where(cw > 0, cwx / cw.clamp(min=1e-30), centers)
    c = kmeans_pp_init(pts.repeat_interleave(n_init, 0), cw.repeat_interleave(n_init, 0), k, generator, trials)
    c = c.view(N, n_init, k).double()

    # Lloyd on the fine histogram: bin b joins the cluster whose interval holds its centre
    zero = torch.zeros(N, 1, dtype=torch.float64)
    pw = torch.cat([zero, hw.double().cumsum(dim=1)], dim=1)  # [N, bins + 1]
    pwx = torch.cat([zero, hwx.double().cumsum(dim=1)], dim=1)
    means = torch.where(hw > 0, hwx / hw.clamp(min=1e-30), 0.0)  # bin means (for re-seeding empty clusters)
    first = torch.zeros(N, n_init, 1, dtype=torch.int64)
    last = torch.full((N, n_init, 1), bins, dtype=torch.int64)
    scale = bins / (hi - lo)

    def clusters(c):  # -> inner boundaries [N, n_init, k-1], cluster weight and weight * value sums [N, n_init, k]
        mid = (c[..., 1:] + c[..., :-1]) * 0.5
        inner = torch.ceil((mid - lo) * scale - 0.5).clamp_(0, bins).to(torch.int64)  # bins with centre < mid
        bounds = torch.cat([first, inner, last], dim=-1).view(N, -1)  # [N, n_init * (k + 1)]
        wsum = pw.gather(1, bounds).view(N, n_init, k + 1).diff(dim=-1)
        xsum = pwx.gather(1, bounds).view(N, n_init, k + 1).diff(dim=-1)
        return inner, wsum, xsum

    distinct = (hw > 0).sum(dim=1).view(N, 1, 1)  # occupied bins per row: at most that many clusters can be filled
    prev, reseeded = None, False
    for _ in range(max_iter):
        inner, wsum, xsum = clusters(c)
        if prev is not None and not reseeded and torch.equal(inner, prev):
            break
        empty = wsum <= 0
        c = torch.where(empty, c, xsum / wsum.clamp(min=1e-300))
        fixable = empty & (distinct > (~empty).sum(dim=-1, keepdim=True))
        reseeded = bool(fixable.any())
        if reseeded:
            c = _reseed_empty(c, fixable, inner, hw, means)
        c = torch.sort(c, dim=-1).values
        prev = inner
    _, wsum, xsum = clusters(c)
    # k-means objective up to a constant: - sum over clusters of (sum w x)^2 / (sum w); lowest seeding wins
    objective = -torch.where(wsum > 0, xsum * xsum / wsum.clamp(min=1e-300), torch.zeros_like(wsum)).sum(-1)
    best = objective.argmin(dim=1)
    return c[torch.arange(N), best].to(torch.float32)


def _reseed_empty(c: torch.Tensor, fixable: torch.Tensor, inner: torch.Tensor, hw: torch.Tensor,
                  means: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Move one empty centroid per (row, seeding) to the bin that costs the most (weight * squared distance to the
    centroid of its cluster).

    c, fixable: [N, n_init, k] (fixable: empty clusters of rows that have more occupied bins than filled clusters);
    inner: [N, n_init, k - 1] cluster boundaries (in bins); hw, means: [N, bins] bin weights and means.
    """
    c = c.clone()
    n_all, r_all = torch.nonzero(fixable.any(dim=-1), as_tuple=True)
    bins = hw.shape[1]
    for e0 in range(0, n_all.numel(), chunk):
        n, r = n_all[e0:e0 + chunk], r_all[e0:e0 + chunk]
        position = torch.arange(bins).expand(n.numel(), bins).contiguous()
        cluster = torch.searchsorted(inner[n, r].contiguous(), position, right=True)  # [E, bins]
        cost = hw[n].double() * (means[n].double() - c[n, r].gather(1, cluster)) ** 2
        worst = cost.argmax(dim=1)
        slot = fixable[n, r].to(torch.int64).argmax(dim=1)  # the first fixable empty cluster
        c[n, r, slot] = means[n, worst].double()
    return c


def lut_grid(v: torch.Tensor) -> torch.Tensor:
    """LUT entries rounded to 8 significant bits (bf16 precision; entries below 2^-14 in magnitude become 0), so each
    is exactly both an fp16 and a bf16 value. Stored as fp16 as the format says; CPU kernels read them as bf16, which
    widens to fp32 with a shift instead of a conversion instruction (1.4x faster any4 decode on x86, see
    kernels/any4_decode.h). Cost: at most 2^-9 relative per entry, < 0.016 of a group's step for |entry| < 8,
    against 4-bit rounding errors of up to 0.5 step. Codes are assigned against the rounded LUT."""
    r = v.to(torch.bfloat16).to(torch.float32)
    return torch.where(r.abs() < 2.0 ** -14, torch.zeros_like(r), r)


def quantize(w: torch.Tensor, group_size: int, col_weight: torch.Tensor | None = None, seed: int = 0,
             max_iter: int = MAX_ITER) -> dict[str, torch.Tensor]:
    """w: fp32 [N, K]; group_size g (K for one group per row); col_weight: calibration weights >= 0, [K] for the
    whole matrix or [N, K] per row (rows of several matrices quantized in one call), None = uniform
    -> {qweight uint8 [N, K/2], scales fp16 [N, G], zeros fp16 [N, G], lut fp16 [N, 16]}."""
    N, K = w.shape
    g = group_size
    s16, z16 = minmax_scale_zero(w, g)
    generator = torch.Generator().manual_seed(seed)
    a = torch.ones(1, K) if col_weight is None else col_weight.to(torch.float32).abs().reshape(-1, K)
    lut = torch.empty(N, LUT_SIZE, dtype=torch.float16)
    codes = torch.empty(N, K, dtype=torch.int64)
    rows = max(1, CHUNK_ELEMENTS // K)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        s, z = s16[r0:r1].float()[..., None], z16[r0:r1].float()[..., None]
        wn = ((grouped(w[r0:r1], g) - z) / s + 8).reshape(r1 - r0, K)  # normalised, ~[0, 15]
        a_rows = a if a.shape[0] == 1 else a[r0:r1]
        weight = (a_rows.reshape(-1, K // g, g) * s).reshape(r1 - r0, K)
        centroids = weighted_kmeans_1d(wn, weight, LUT_SIZE, 0.0, 15.0, generator, max_iter=max_iter)
        lut16 = to_fp16(lut_grid(centroids - 8), "an any4 LUT entry")
        lut[r0:r1] = lut16
        codes[r0:r1] = nearest_code(lut16, wn - 8)
    return {"qweight": pack_nibbles(codes), "scales": s16, "zeros": z16, "lut": lut}
