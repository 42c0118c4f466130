"""pocketllm::any4_linear — a linear layer whose weight is stored as any4 (learned 4-bit codes, per-row LUT).

Schema:
    any4_linear(Tensor x, Tensor qweight, Tensor lut, Tensor scales, Tensor zeros, int group_size) -> Tensor
    any4_linear.out(..., *, Tensor(a!) out) -> Tensor(a!)

x:       [..., K] float (fp32, bf16 or fp16).
qweight: uint8 [N, K/2], two 4-bit codes per byte: column 2j in the low nibble, column 2j+1 in the high nibble.
lut:     [N, 16] float (stored fp16; `.pte` files carry it as bf16 when that is lossless, which it is for every LUT
         `pocketllm quantize` writes): per-row table of `centroid - 8`.
scales, zeros: [N, K/g] float (stored fp16), per (row, group of g consecutive columns).
group_size: g (K for one group per row).
Returns y = x @ W.T in x's dtype, [..., N], with W dequantized in fp32 as

    W[i, j] = lut[i, code[i, j]] * scales[i, j // g] + zeros[i, j // g]

multiply first, then add, as two roundings (no fused multiply-add): runtime_py/quant.py computes the same
expression and must agree bit for bit. The reference implementation below uses only core ATen ops (int64 `& 15`
and floor division by 16 to unpack, since uint8 right shift is not core ATen; gather; mul; add; linear), so it is
also the decomposition a backend without an any4 kernel gets.
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor x, Tensor qweight, Tensor lut, Tensor scales, Tensor zeros, int group_size"
LIB.define(f"any4_linear({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"any4_linear.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_any4_args(x, qweight, lut, scales, zeros, group_size) -> None:
    """One-line PocketllmError for any shape/dtype mismatch (also runs under fake tensors at export time)."""
    if qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise PocketllmError(f"any4_linear: qweight must be uint8 [N, K/2] (got {qweight.dtype} {list(qweight.shape)})")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if x.shape[-1] != K:
        raise PocketllmError(f"any4_linear: x has {x.shape[-1]} input features, qweight holds {K}")
    if tuple(lut.shape) != (N, 16):
        raise PocketllmError(f"any4_linear: lut has shape {list(lut.shape)}, expected [{N}, 16]")
    if group_size <= 0 or K % group_size:
        raise PocketllmError(f"any4_linear: group_size {group_size} must be positive and divide K = {K}")
    G = K // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if tuple(t.shape) != (N, G):
            raise PocketllmError(f"any4_linear: {name} has shape {list(t.shape)}, expected [{N}, {G}] "
                                 f"(K / group_size = {K} / {group_size})")


def unpack_codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 [N, K] (low nibble = even column)."""
    q = qweight.to(torch.int64)
    low = q & 15
    high = torch.div(q, 16, rounding_mode="floor")
    return torch.stack([low, high], dim=-1).reshape(q.shape[0], -1)


def any4_dequantize(qweight, lut, scales, zeros, group_size: int) -> torch.Tensor:
    """fp32 [N, K]: W = lut[code] * scale + zero, per (row, group). Exact arithmetic, see the module docstring."""
    codes = unpack_codes(qweight)
    values = torch.gather(lut.to(torch.float32), 1, codes)  # [N, K]
    N, K = values.shape
    G = K // group_size
    s = scales.to(torch.float32).reshape(N, G, 1)
    z = zeros.to(torch.float32).reshape(N, G, 1)
    w = values.reshape(N, G, group_size) * s  # rounding 1
    w = w + z  # rounding 2
    return w.reshape(N, K)


def any4_linear_reference(x, qweight, lut, scales, zeros, group_size):
    check_any4_args(x, qweight, lut, scales, zeros, group_size)
    w = any4_dequantize(qweight, lut, scales, zeros, group_size)
    return torch.nn.functional.linear(x, w.to(x.dtype))


@torch.library.impl(LIB, "any4_linear", "CompositeExplicitAutograd")
def _any4_linear(x, qweight, lut, scales, zeros, group_size):
    return any4_linear_reference(x, qweight, lut, scales, zeros, group_size)


@torch.library.impl(LIB, "any4_linear.out", "CompositeExplicitAutograd")
def _any4_linear_out(x, qweight, lut, scales, zeros, group_size, *, out):
    result = any4_linear_reference(x, qweight, lut, scales, zeros, group_size)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::any4_linear")
def _any4_linear_fake(x, qweight, lut, scales, zeros, group_size):
    check_any4_args(x, qweight, lut, scales, zeros, group_size)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("pocketllm::any4_linear.out")
def _any4_linear_out_fake(x, qweight, lut, scales, zeros, group_size, *, out):
    return out
