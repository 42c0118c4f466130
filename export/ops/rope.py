"""pocketllm::rope — rotary position embedding (rotate-half layout) of q or k with the tables' rows of its positions.

Schema:
    rope(Tensor x, Tensor cos, Tensor sin) -> Tensor
    rope.out(..., *, Tensor(a!) out) -> Tensor(a!)

x: [1, T, heads, D] float; cos, sin: [1, T, 1, d] float (export/nn/rope.py's RotaryAt: the rows of the T positions,
attention scaling folded in), d even and d <= D. Returns, in x's dtype, computed in fp32:

    y[..., :d] = x[..., :d] * cos + rotate_half(x[..., :d]) * sin      rotate_half(v) = cat(-v[d/2:], v[:d/2])
    y[..., d:] = x[..., d:]                                             (partial RoPE, MiniMax)

The C++ kernel (kernels/rope.cpp) rounds the two products and their sum one by one, as torch does: bit for bit the
reference below. The ExecuTorch lowering uses it for every rotated q and k (swaps.use_fused_elementwise).
"""

from __future__ import annotations

import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.library import LIB

SCHEMA_ARGS = "Tensor x, Tensor cos, Tensor sin"
LIB.define(f"rope({SCHEMA_ARGS}) -> Tensor")
LIB.define(f"rope.out({SCHEMA_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def check_rope_args(x, cos, sin) -> None:
    if x.dim() != 4 or x.shape[0] != 1 or not x.dtype.is_floating_point:
        raise PocketllmError(f"rope: x must be float [1, T, heads, D] (got {x.dtype} {list(x.shape)})")
    T, D = x.shape[1], x.shape[3]
    if cos.shape != sin.shape or cos.dim() != 4 or tuple(cos.shape[:3]) != (1, T, 1):
        raise PocketllmError(f"rope: cos and sin must be [1, {T}, 1, d] (got {list(cos.shape)} and "
                             f"{list(sin.shape)})")
    d = cos.shape[-1]
    if d % 2 or d > D:
        raise PocketllmError(f"rope: the rotated width d = {d} must be even and at most the head dim {D}")


def rope_reference(x, cos, sin):
    """The model's own rotation (export/nn/rope.py RotaryAt), so the op and the code it replaces cannot drift apart."""
    from pocketllm.export.nn.rope import RotaryAt

    check_rope_args(x, cos, sin)
    return RotaryAt(cos.float(), sin.float(), cos.shape[-1])(x)


@torch.library.impl(LIB, "rope", "CompositeExplicitAutograd")
def _rope(x, cos, sin):
    return rope_reference(x, cos, sin)


@torch.library.impl(LIB, "rope.out", "CompositeExplicitAutograd")
def _rope_out(x, cos, sin, *, out):
    result = rope_reference(x, cos, sin)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::rope")
def _rope_fake(x, cos, sin):
    check_rope_args(x, cos, sin)
    return torch.empty_like(x)


@torch.library.register_fake("pocketllm::rope.out")
def _rope_out_fake(x, cos, sin, *, out):
    return out
