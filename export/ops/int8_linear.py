"""pocketllm::int8_linear — a linear layer whose weight is int8 per output channel, fp32 activations (exact).

The LM head's op (and every `int8` layer's): the head of a 4-bit bundle is stored in 8 bits by default, and for a
tied model the same packed table is the embedding the model gathers rows from (export/nn/quant_linear.py,
QuantEmbedding). XNNPACK's int8 linears quantize the activations too (not exact); this op keeps them in fp32.

Schema:
    int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor
    int8_linear.out(..., *, Tensor(a!) out) -> Tensor(a!)

x: [..., K] float (fp32, bf16 or fp16). qweight: int8 [N, K]. scales: [N, 1] float (stored fp16; fp32 accepted).
Returns y = x @ W.T in x's dtype, [..., N], with W dequantized in fp32 as

    W[i, j] = qweight[i, j] * scales[i]          (one fp32 multiply: the reference's dequantization)

The C++ kernel (kernels/int8_linear.cpp) computes y[t, i] = scales[i] * sum_j x[t, j] * qweight[i, j] in fp32:
the same value up to summation order and where the one rounding of the scale happens (parity <= 1e-3 against the
numpy reference, which multiplies by the dequantized weight); a one-hot x gives qweight * scale exactly, i.e. the
reference's dequantized weight bit for bit. The reference below uses core ATen ops only (the decomposition a
backend without the kernel gets).
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor x, Tensor qweight, Tensor scales"
LIB.define(f"int8_linear({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"int8_linear.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_int8_args(x, qweight, scales) -> None:
    """One-line PocketllmError for any shape/dtype mismatch (also runs under fake tensors at export time)."""
    if qweight.dim() != 2 or qweight.dtype != torch.int8:
        raise PocketllmError(f"int8_linear: qweight must be int8 [N, K] (got {qweight.dtype} {list(qweight.shape)})")
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise PocketllmError(f"int8_linear: x has {x.shape[-1]} input features, qweight holds {K}")
    if tuple(scales.shape) != (N, 1) or not scales.dtype.is_floating_point:
        raise PocketllmError(f"int8_linear: scales must be float [{N}, 1] (got {scales.dtype} {list(scales.shape)})")


def int8_dequantize(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [N, K] = qweight * scale per row (one rounding)."""
    return qweight.to(torch.float32) * scales.to(torch.float32)


def int8_linear_reference(x, qweight, scales):
    check_int8_args(x, qweight, scales)
    return torch.nn.functional.linear(x, int8_dequantize(qweight, scales).to(x.dtype))


@torch.library.impl(LIB, "int8_linear", "CompositeExplicitAutograd")
def _int8_linear(x, qweight, scales):
    return int8_linear_reference(x, qweight, scales)


@torch.library.impl(LIB, "int8_linear.out", "CompositeExplicitAutograd")
def _int8_linear_out(x, qweight, scales, *, out):
    result = int8_linear_reference(x, qweight, scales)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::int8_linear")
def _int8_linear_fake(x, qweight, scales):
    check_int8_args(x, qweight, scales)
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("pocketllm::int8_linear.out")
def _int8_linear_out_fake(x, qweight, scales, *, out):
    return out
