"""pocketllm::rms_norm — RMSNorm over the last dimension in fp32, one op instead of six.

Schema:
    rms_norm(Tensor x, Tensor weight, float eps) -> Tensor
    rms_norm.out(..., *, Tensor(a!) out) -> Tensor(a!)

x: [..., H] float; weight: [H] float. Returns, in x's dtype, computed in fp32 exactly as export/nn/norm.py's RMSNorm:

    y = (x * rsqrt(mean(x^2) + eps)) * weight

The ExecuTorch lowering swaps the decoder's norms for this op (targets/executorch/swaps.py, use_fused_elementwise):
a decode step's norm is ~1K multiply-adds, and the six elementwise kernels (or the XNNPACK partition) it otherwise
costs are tens of microseconds of dispatch per call. The C++ kernel (kernels/rms_norm.cpp) sums the squares in its
own order (parity <= 1e-5 relative, not bit equality).
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor x, Tensor weight, float eps"
LIB.define(f"rms_norm({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"rms_norm.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_rms_norm_args(x, weight) -> None:
    if x.dim() < 1 or not x.dtype.is_floating_point:
        raise PocketllmError(f"rms_norm: x must be a float tensor [..., H] (got {x.dtype} {list(x.shape)})")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or not weight.dtype.is_floating_point:
        raise PocketllmError(f"rms_norm: weight must be float [{x.shape[-1]}] (got {weight.dtype} "
                             f"{list(weight.shape)})")


def rms_norm_reference(x, weight, eps):
    """The model's own norm (export/nn/norm.py), so the op and the module it replaces cannot drift apart."""
    from pocketllm.export.nn.norm import rms_norm

    check_rms_norm_args(x, weight)
    return rms_norm(x, weight, eps)


@torch.library.impl(LIB, "rms_norm", "CompositeExplicitAutograd")
def _rms_norm(x, weight, eps):
    return rms_norm_reference(x, weight, eps)


@torch.library.impl(LIB, "rms_norm.out", "CompositeExplicitAutograd")
def _rms_norm_out(x, weight, eps, *, out):
    result = rms_norm_reference(x, weight, eps)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::rms_norm")
def _rms_norm_fake(x, weight, eps):
    check_rms_norm_args(x, weight)
    return torch.empty_like(x)


@torch.library.register_fake("pocketllm::rms_norm.out")
def _rms_norm_out_fake(x, weight, eps, *, out):
    return out
