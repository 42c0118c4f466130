"""pocketllm::silu_mul — the SwiGLU product silu(gate) * up of a gated MLP, one op instead of three.

Schema:
    silu_mul(Tensor gate, Tensor up) -> Tensor
    silu_mul.out(..., *, Tensor(a!) out) -> Tensor(a!)

gate, up: float tensors of one shape. Returns silu(gate) * up in gate's dtype, computed in fp32, silu(g) =
g / (1 + exp(-g)) (torch.nn.functional.silu). The C++ kernel (kernels/silu_mul.cpp) uses its own vectorised exp
(relative error ~1e-7: parity, not bit equality). The ExecuTorch lowering uses it in every SiLU-gated MLP
(swaps.use_fused_elementwise); ReLU-gated experts (SmallThinker) run inside pocketllm::moe_ffn.
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor gate, Tensor up"
LIB.define(f"silu_mul({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"silu_mul.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_silu_mul_args(gate, up) -> None:
    if gate.shape != up.shape or not gate.dtype.is_floating_point or not up.dtype.is_floating_point:
        raise PocketllmError(f"silu_mul: gate and up must be float tensors of one shape (got {gate.dtype} "
                             f"{list(gate.shape)} and {up.dtype} {list(up.shape)})")


def silu_mul_reference(gate, up):
    check_silu_mul_args(gate, up)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(gate.dtype)


@torch.library.impl(LIB, "silu_mul", "CompositeExplicitAutograd")
def _silu_mul(gate, up):
    return silu_mul_reference(gate, up)


@torch.library.impl(LIB, "silu_mul.out", "CompositeExplicitAutograd")
def _silu_mul_out(gate, up, *, out):
    result = silu_mul_reference(gate, up)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::silu_mul")
def _silu_mul_fake(gate, up):
    check_silu_mul_args(gate, up)
    return torch.empty_like(gate)


@torch.library.register_fake("pocketllm::silu_mul.out")
def _silu_mul_out_fake(gate, up, *, out):
    return out
