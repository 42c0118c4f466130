"""pocketllm::any4_linear_w4a8 — any4 weights, dynamic int8 activations, integer dot products (W4A8).

A faster, approximate sibling of pocketllm::any4_linear (export/ops/any4_linear.py, exact fp32 activations). Same
packed weights (qweight, scales, zeros as the checkpoint stores them); the per-row LUT is replaced by an int8 LUT and
one fp32 LUT scale per row, which `w4a8_pack` derives deterministically from the checkpoint's LUT.

Schema:
    any4_linear_w4a8(Tensor x, Tensor qweight, Tensor lut_i8, Tensor lut_scale, Tensor scales, Tensor zeros,
                     int group_size) -> Tensor
    any4_linear_w4a8.out(..., *, Tensor(a!) out) -> Tensor(a!)

x: [..., K] float32. qweight: uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high nibble), as the any4
checkpoint stores it. lut_i8: int8 [N, 16]. lut_scale: float32 [N]. scales, zeros: the checkpoint's float16 [N, G]
values (G = K / g) in blocks of 8 rows, [ceil(N / 8), G, 8] (element [b, g, r] belongs to row 8b + r; rows past N
are 0), so that the kernel reads 8 rows' values for one group as one vector. group_size: g (K for one group per
row), 1 <= g <= 65536. Returns float32 [..., N].

Numerics (docs/quantization.md, "W4A8"); every float operation is IEEE fp32, round to nearest even, no fused
multiply-add; rint = round half to even:

  weights, per row i (w4a8_pack, once at export):
      m_i = max_c |lut[i, c]|                       (lut widened to fp32, exact)
      ls_i = m_i / 127                              lut_scale
      lq[i, c] = clamp(rint(lut[i, c] / ls_i), -127, 127)       lut_i8 (all 0 when ls_i == 0)
  activations, per token (row of x) t, at run time:
      a_t = max_j |x[t, j]|;  sx_t = a_t / 127
      xq[t, j] = clamp(rint(x[t, j] / sx_t), -127, 127)        (all 0 when sx_t == 0, e.g. an all-zero row)
      if x[t] holds a NaN or an infinity, every output of token t is NaN
  integer part, exact (int32; |A| <= 127 * 127 * g < 2^31):
      A[t, i, g] = sum_{j in group g} xq[t, j] * lq[i, code[i, j]]
      B[t, g]    = sum_{j in group g} xq[t, j]
  float part, in this order:
      d[i, g] = ls_i * scales[i, g]
      acc = 0
      for g = 0 .. G-1:  acc = acc + (float(A[t, i, g]) * d[i, g] + float(B[t, g]) * zeros[i, g])
      y[t, i] = acc * sx_t

so y[t, i] ~= sum_j x[t, j] * (lut[i, code] * s + z): the exact any4 weight with the LUT rounded to 8 bits and x
rounded to 8 bits per token. float(int32) is exact below 2^24 (always for g <= 1040). The numpy twin
(runtime_py/ops/any4_linear_w4a8.py) and the C++ kernel (kernels/any4_linear_w4a8.cpp, every ISA path) compute
exactly this and agree bit for bit. The reference below does the integer part in float64 (exact: integers below
2^53).
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.any4_linear import unpack_codes
from pocketllm.export.ops.library import LIB

MAX_GROUP = 65536  # keeps every int32 partial sum of the kernels (at most 255 * 127 * g) in range
ROW_BLOCK = 8  # scales and zeros are stored in blocks of 8 rows
SCHEMA_ARGS = "Tensor x, Tensor qweight, Tensor lut_i8, Tensor lut_scale, Tensor scales, Tensor zeros, int group_size"
LIB.define(f"any4_linear_w4a8({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"any4_linear_w4a8.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_w4a8_args(x, qweight, lut_i8, lut_scale, scales, zeros, group_size) -> None:
    """One-line PocketllmError for any shape/dtype mismatch (also runs under fake tensors at export time)."""
    op = "any4_linear_w4a8"
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise PocketllmError(f"{op}: qweight must be uint8 [N, K/2] (got {qweight.dtype} {list(qweight.shape)})")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if x.dtype != torch.float32 or x.shape[-1] != K:
        raise PocketllmError(f"{op}: x must be float32 [..., {K}] (got {x.dtype} {list(x.shape)})")
    if lut_i8.dtype != torch.int8 or tuple(lut_i8.shape) != (N, 16):
        raise PocketllmError(f"{op}: lut_i8 must be int8 [{N}, 16] (got {lut_i8.dtype} {list(lut_i8.shape)})")
    if lut_scale.dtype != torch.float32 or tuple(lut_scale.shape) != (N,):
        raise PocketllmError(f"{op}: lut_scale must be float32 [{N}] (got {lut_scale.dtype} {list(lut_scale.shape)})")
    if not 0 < group_size <= MAX_GROUP or K % group_size:
        raise PocketllmError(f"{op}: group_size {group_size} must divide K = {K} and be at most {MAX_GROUP}")
    G = K // group_size
    blocks = -(-N // ROW_BLOCK)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.dtype != torch.float16 or tuple(t.shape) != (blocks, G, ROW_BLOCK):
            raise PocketllmError(f"{op}: {name} must be float16 [{blocks}, {G}, {ROW_BLOCK}] (8-row blocks of [N, K / "
                                 f"group_size] = [{N}, {K} / {group_size}]), got {t.dtype} {list(t.shape)}")


def to_row_blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, G] -> [ceil(N / 8), G, 8], rows past N zero."""
    N, G = t.shape
    blocks = -(-N // ROW_BLOCK)
    padded = torch.zeros(blocks * ROW_BLOCK, G, dtype=t.dtype)
    padded[:N] = t
    return padded.reshape(blocks, ROW_BLOCK, G).transpose(1, 2).contiguous()


def from_row_blocks(t: torch.Tensor, N: int) -> torch.Tensor:
    """[ceil(N / 8), G, 8] -> [N, G]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:N]


def w4a8_lut(lut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 LUT and its fp32 scale from an any4 LUT [N, 16] (fp16, bf16 or fp32 values):
    ls = max|lut| / 127, lut_i8 = clamp(rint(lut / ls), -127, 127); a row of zeros gives ls = 0, lut_i8 = 0."""
    f = lut.to(torch.float32)
    ls = f.abs().amax(dim=1) / 127.0
    safe = torch.where(ls > 0, ls, torch.ones_like(ls))
    q = torch.round(f / safe[:, None]).clamp(-127, 127)  # torch.round: half to even
    q = torch.where(ls[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.int8), ls


def w4a8_pack(qweight, lut, scales, zeros, group_size: int) -> dict[str, torch.Tensor]:
    """The op's weight inputs from an any4 module's packed tensors (export time, deterministic): qweight as stored,
    lut_i8 / lut_scale from `w4a8_lut`, the fp16 scales and zeros in 8-row blocks."""
    lut_i8, lut_scale = w4a8_lut(lut)
    packed = {}
    for name, t in (("scales", scales), ("zeros", zeros)):
        t16 = t.to(torch.float16)
        if not torch.equal(t16.to(torch.float32), t.to(torch.float32)):
            raise PocketllmError(f"w4a8_pack: {name} are not float16 values (any4 checkpoints store them as fp16)")
        packed[name] = to_row_blocks(t16)
    out = {"qweight": qweight.contiguous(), "lut_i8": lut_i8, "lut_scale": lut_scale, **packed}
    check_w4a8_args(torch.empty(0, 2 * qweight.shape[1]), group_size=group_size, **out)
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [M, K] -> (xq int8 [M, K], sx float32 [M], finite bool [M]): symmetric per token, see above."""
    finite = torch.isfinite(x).all(dim=1)
    xf = torch.where(finite[:, None], x, torch.zeros_like(x))
    sx = xf.abs().amax(dim=1) / 127.0
    nonzero = sx > 0
    safe = torch.where(nonzero, sx, torch.ones_like(sx))
    xq = torch.round(xf / safe[:, None]).clamp(-127, 127)
    xq = torch.where(nonzero[:, None], xq, torch.zeros_like(xq))
    return xq.to(torch.int8), sx, finite


def any4_linear_w4a8_reference(x, qweight, lut_i8, lut_scale, scales, zeros, group_size):
    check_w4a8_args(x, qweight, lut_i8, lut_scale, scales, zeros, group_size)
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    g = group_size
    G = K // g
    lead = x.shape[:-1]
    xq, sx, finite = quantize_activations(x.reshape(-1, K))
    M = xq.shape[0]
    wq = torch.gather(lut_i8.to(torch.int64), 1, unpack_codes(qweight))  # [N, K] int8 values
    # Integer dot products in float64 (BLAS): every product and partial sum is an integer below 2^53, so exact.
    xg = xq.to(torch.float64).reshape(M, G, g)
    A = torch.einsum("mgk,ngk->mng", xg, wq.to(torch.float64).reshape(N, G, g))  # [M, N, G], exact integers
    B = xg.sum(dim=2)  # [M, G], exact
    d = lut_scale[:, None] * from_row_blocks(scales, N).to(torch.float32)  # [N, G]
    z = from_row_blocks(zeros, N).to(torch.float32)
    acc = torch.zeros(M, N, dtype=torch.float32)
    for gi in range(G):
        p = A[:, :, gi].to(torch.float32) * d[None, :, gi]
        q = B[:, gi, None].to(torch.float32) * z[None, :, gi]
        acc = acc + (p + q)
    y = acc * sx[:, None]
    y = torch.where(finite[:, None], y, torch.full_like(y, float("nan")))
    return y.reshape(*lead, N)


@torch.library.impl(LIB, "any4_linear_w4a8", "CompositeExplicitAutograd")
def _any4_linear_w4a8(x, qweight, lut_i8, lut_scale, scales, zeros, group_size):
    return any4_linear_w4a8_reference(x, qweight, lut_i8, lut_scale, scales, zeros, group_size)


@torch.library.impl(LIB, "any4_linear_w4a8.out", "CompositeExplicitAutograd")
def _any4_linear_w4a8_out(x, qweight, lut_i8, lut_scale, scales, zeros, group_size, *, out):
    result = any4_linear_w4a8_reference(x, qweight, lut_i8, lut_scale, scales, zeros, group_size)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::any4_linear_w4a8")
def _any4_linear_w4a8_fake(x, qweight, lut_i8, lut_scale, scales, zeros, group_size):
    check_w4a8_args(x, qweight, lut_i8, lut_scale, scales, zeros, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("pocketllm::any4_linear_w4a8.out")
def _any4_linear_w4a8_out_fake(x, qweight, lut_i8, lut_scale, scales, zeros, group_size, *, out):
    return out
