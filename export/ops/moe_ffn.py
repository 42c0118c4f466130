"""pocketllm::moe_ffn, pocketllm::moe_ffn_any4: the routed experts of a mixture-of-experts layer, as one op.

The caller routes (SmallThinker's pre-attention router, MiniMax's softmax top-k router); the op runs only the experts
each token chose and sums their outputs. Kernels read only the routed experts' weights.

Schemas:
    moe_ffn(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor gate, Tensor up, Tensor down_t,
            str activation) -> Tensor
    moe_ffn_any4(Tensor x, Tensor expert_ids, Tensor expert_weights,
                 Tensor gate_qweight, Tensor gate_lut, Tensor gate_scales, Tensor gate_zeros,
                 Tensor up_qweight, Tensor up_lut, Tensor up_scales, Tensor up_zeros,
                 Tensor down_qweight, Tensor down_lut, Tensor down_scales, Tensor down_zeros,
                 str activation) -> Tensor
    and each `.out(..., *, Tensor(a!) out) -> Tensor(a!)`.

x:              [T, H] float: the experts' input (SmallThinker: the post-attention norm output).
expert_ids:     int64 [T, k], each in [0, E): the experts token t runs (usually distinct within a row).
expert_weights: float32 [T, k]: their mixing weights.
activation:     "reglu" (SmallThinker) or "swiglu" (MiniMax), as MoESpec.activation.
Returns [T, H] in x's dtype:

    out[t] = sum_j expert_weights[t, j] * down_e(act(gate_e x[t]) * up_e x[t]),   e = expert_ids[t, j]
    act = relu (reglu) or silu (swiglu)

Weights, stacked over the E experts (one constant per projection: expert e is a contiguous block, which is what lets
a kernel or an expert store read, map or page one expert at a time):
- moe_ffn: gate [E, F, H], up [E, F, H], down_t [E, F, H], all float32 or all bfloat16. down_t[e] is the transpose
  of the checkpoint's down weight [H, F]: row f is what neuron f adds to the output, so the neurons ReGLU leaves at
  zero are whole rows a kernel skips (exact: relu = 0 contributes nothing).
- moe_ffn_any4: each projection as any4 (docs/quantization.md) with an expert dimension in front:
  qweight uint8 [E, N, K/2], lut [E, N, 16], scales and zeros [E, N, G] (16-bit floats, or float32), in the
  checkpoint's orientation: gate and up N = F, K = H; down N = H, K = F. The group size of each projection is K / G
  (G = 1: one group per row), so it is not an argument. any4 rows are quantized along K, so down cannot be
  transposed without requantizing: a kernel skips inactive neurons' up rows, but not their down columns.
Math in float32 whatever the storage (bf16 weights and fp16 any4 tables widen exactly).

Why two op names and not one op over tensor lists: each schema states exactly what it takes (3 float stacks, or 12
packed stacks), the fake impl and the argument checks need no optional-argument logic, a target lists and lowers
each kernel separately (a bundle built without any4 requires only `moe_ffn.out`), and stacked tensors rather than
E-long lists keep a layer at 3 (12) constants instead of 3E (12E) and give each expert a fixed offset in one buffer.

Numerics (those of the eager model in export/nn/mlp.py): each expert's output is computed in float32, multiplied by
the token's weight, and added into a float32 accumulator that starts at zero, experts in ascending id order; the
result is rounded to x's dtype once. Kernels follow the same accumulation order; only summation order inside the
matrix products differs.

The references below are readable loops over the experts some token chose (torch.unique / torch.where): they run
eagerly; under torch.export the op is opaque (fake impl) and lowers to our kernels (kernels/moe_ffn.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.any4_linear import any4_dequantize
from pocketllm.export.ops.library import LIB

ACTIVATIONS = ("reglu", "swiglu")
ANY4_PROJECTIONS = ("gate", "up", "down")
ANY4_SUFFIXES = ("qweight", "lut", "scales", "zeros")

ROUTING_ARGS = "Tensor x, Tensor expert_ids, Tensor expert_weights"
DENSE_ARGS = f"{ROUTING_ARGS}, Tensor gate, Tensor up, Tensor down_t, str activation"
ANY4_ARGS = (f"{ROUTING_ARGS}, "
             + ", ".join(f"Tensor {p}_{s}" for p in ANY4_PROJECTIONS for s in ANY4_SUFFIXES)
             + ", str activation")
LIB.define(f"moe_ffn({DENSE_ARGS}) -> Tensor")
LIB.define(f"moe_ffn.out({DENSE_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")
LIB.define(f"moe_ffn_any4({ANY4_ARGS}) -> Tensor")
LIB.define(f"moe_ffn_any4.out({ANY4_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


# ------------------------------------------------------------------------------------------ argument checks
def check_routing_args(op: str, x, expert_ids, expert_weights, activation) -> tuple[int, int, int]:
    """One-line PocketllmError for a bad x / routing / activation (also runs under fake tensors). -> (T, H, k)."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise PocketllmError(f"{op}: x must be a float [tokens, hidden] tensor (got {x.dtype} {list(x.shape)})")
    T, H = x.shape
    if expert_ids.dim() != 2 or expert_ids.dtype != torch.int64 or expert_ids.shape[0] != T:
        raise PocketllmError(f"{op}: expert_ids must be int64 [{T}, k] (got {expert_ids.dtype} "
                             f"{list(expert_ids.shape)})")
    k = expert_ids.shape[1]
    if tuple(expert_weights.shape) != (T, k) or expert_weights.dtype != torch.float32:
        raise PocketllmError(f"{op}: expert_weights must be float32 [{T}, {k}] like expert_ids (got "
                             f"{expert_weights.dtype} {list(expert_weights.shape)})")
    if k < 1:
        raise PocketllmError(f"{op}: each token needs at least one expert (expert_ids has shape {list(expert_ids.shape)})")
    if activation not in ACTIVATIONS:
        raise PocketllmError(f"{op}: activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return T, H, k


def check_dense_args(x, expert_ids, expert_weights, gate, up, down_t, activation) -> None:
    _, H, _ = check_routing_args("moe_ffn", x, expert_ids, expert_weights, activation)
    if gate.dim() != 3 or gate.shape[2] != H:
        raise PocketllmError(f"moe_ffn: gate must be [experts, ffn, {H}] (got {list(gate.shape)})")
    for name, t in (("up", up), ("down_t", down_t)):
        if tuple(t.shape) != tuple(gate.shape):
            raise PocketllmError(f"moe_ffn: {name} has shape {list(t.shape)}, expected {list(gate.shape)} like gate "
                                 "(down_t is the down weight transposed: [experts, ffn, hidden])")
    for name, t in (("gate", gate), ("up", up), ("down_t", down_t)):
        if t.dtype not in (torch.float32, torch.bfloat16) or t.dtype != gate.dtype:
            raise PocketllmError(f"moe_ffn: gate, up and down_t must all be float32 or all bfloat16 (got {name} "
                                 f"{t.dtype}, gate {gate.dtype})")


def check_any4_stack(proj: str, qweight, lut, scales, zeros, E: int | None, N: int, K: int) -> int:
    """Checks one stacked any4 projection [E, N, ...] against [N out, K in]; returns its group size K / G."""
    op = "moe_ffn_any4"
    if qweight.dim() != 3 or qweight.dtype != torch.uint8 or qweight.shape[1:] != (N, K // 2) or K % 2:
        raise PocketllmError(f"{op}: {proj}_qweight must be uint8 [experts, {N}, {K // 2}] (got {qweight.dtype} "
                             f"{list(qweight.shape)})")
    E = qweight.shape[0] if E is None else E
    if qweight.shape[0] != E:
        raise PocketllmError(f"{op}: {proj}_qweight holds {qweight.shape[0]} experts, gate_qweight {E}")
    if tuple(lut.shape) != (E, N, 16) or not lut.dtype.is_floating_point:
        raise PocketllmError(f"{op}: {proj}_lut must be float [{E}, {N}, 16] (got {lut.dtype} {list(lut.shape)})")
    if scales.dim() != 3 or tuple(scales.shape[:2]) != (E, N) or not scales.dtype.is_floating_point:
        raise PocketllmError(f"{op}: {proj}_scales must be float [{E}, {N}, groups] (got {scales.dtype} "
                             f"{list(scales.shape)})")
    G = scales.shape[2]
    if G < 1 or K % G or (K // G) % 2:
        raise PocketllmError(f"{op}: {proj}_scales has {G} groups per row, which must divide {K} inputs into "
                             "groups of even size")
    if tuple(zeros.shape) != tuple(scales.shape) or zeros.dtype != scales.dtype:
        raise PocketllmError(f"{op}: {proj}_zeros must match {proj}_scales ({scales.dtype} {list(scales.shape)}), "
                             f"got {zeros.dtype} {list(zeros.shape)}")
    return K // G


def check_any4_args(x, expert_ids, expert_weights, gate_qweight, gate_lut, gate_scales, gate_zeros, up_qweight,
                    up_lut, up_scales, up_zeros, down_qweight, down_lut, down_scales, down_zeros, activation) -> None:
    _, H, _ = check_routing_args("moe_ffn_any4", x, expert_ids, expert_weights, activation)
    if gate_qweight.dim() != 3:
        raise PocketllmError(f"moe_ffn_any4: gate_qweight must be uint8 [experts, ffn, {H // 2}] (got "
                             f"{list(gate_qweight.shape)})")
    E, F = gate_qweight.shape[0], gate_qweight.shape[1]
    check_any4_stack("gate", gate_qweight, gate_lut, gate_scales, gate_zeros, E, F, H)
    check_any4_stack("up", up_qweight, up_lut, up_scales, up_zeros, E, F, H)
    check_any4_stack("down", down_qweight, down_lut, down_scales, down_zeros, E, H, F)


def check_expert_ids(op: str, expert_ids: torch.Tensor, num_experts: int) -> None:
    """Values, not shapes: eager only (fake tensors have no values; the kernels check again)."""
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise PocketllmError(f"{op}: expert_ids must lie in [0, {num_experts}) (got {int(expert_ids.min())}.."
                             f"{int(expert_ids.max())})")


# ------------------------------------------------------------------------------------------ reference
def routed_sum(x, expert_ids, expert_weights, activation, expert_matrices) -> torch.Tensor:
    """The op's math, given expert_matrices(e) -> (gate [F, H], up [F, H], down [H, F]) as float32."""
    act = F.relu if activation == "reglu" else F.silu
    xf = x.to(torch.float32)
    out = torch.zeros(x.shape, dtype=torch.float32)
    for e in torch.unique(expert_ids).tolist():  # ascending expert ids: the accumulation order
        rows, slot = torch.where(expert_ids == e)
        gate, up, down = expert_matrices(e)
        u = xf[rows]
        y = F.linear(act(F.linear(u, gate)) * F.linear(u, up), down)  # [n, H]
        out.index_put_((rows,), y * expert_weights[rows, slot, None], accumulate=True)
    return out.to(x.dtype)


def moe_ffn_reference(x, expert_ids, expert_weights, gate, up, down_t, activation):
    check_dense_args(x, expert_ids, expert_weights, gate, up, down_t, activation)
    check_expert_ids("moe_ffn", expert_ids, gate.shape[0])
    # down as a contiguous [H, F] matrix: F.linear then runs the same BLAS call as the eager model's nn.Linear, and
    # an fp32 model's MoE output is reproduced bit for bit
    return routed_sum(x, expert_ids, expert_weights, activation,
                      lambda e: (gate[e].float(), up[e].float(), down_t[e].float().T.contiguous()))


def moe_ffn_any4_reference(x, expert_ids, expert_weights, gate_qweight, gate_lut, gate_scales, gate_zeros,
                           up_qweight, up_lut, up_scales, up_zeros, down_qweight, down_lut, down_scales, down_zeros,
                           activation):
    args = (gate_qweight, gate_lut, gate_scales, gate_zeros, up_qweight, up_lut, up_scales, up_zeros,
            down_qweight, down_lut, down_scales, down_zeros)
    check_any4_args(x, expert_ids, expert_weights, *args, activation)
    check_expert_ids("moe_ffn_any4", expert_ids, gate_qweight.shape[0])
    H, F_ = x.shape[1], gate_qweight.shape[1]

    def dequant(q, lut, scales, zeros, e, K):
        return any4_dequantize(q[e], lut[e], scales[e], zeros[e], K // scales.shape[2])

    def matrices(e):
        return (dequant(gate_qweight, gate_lut, gate_scales, gate_zeros, e, H),
                dequant(up_qweight, up_lut, up_scales, up_zeros, e, H),
                dequant(down_qweight, down_lut, down_scales, down_zeros, e, F_))

    return routed_sum(x, expert_ids, expert_weights, activation, matrices)


# ------------------------------------------------------------------------------------------ registrations
@torch.library.impl(LIB, "moe_ffn", "CompositeExplicitAutograd")
def _moe_ffn(x, expert_ids, expert_weights, gate, up, down_t, activation):
    return moe_ffn_reference(x, expert_ids, expert_weights, gate, up, down_t, activation)


@torch.library.impl(LIB, "moe_ffn.out", "CompositeExplicitAutograd")
def _moe_ffn_out(x, expert_ids, expert_weights, gate, up, down_t, activation, *, out):
    result = moe_ffn_reference(x, expert_ids, expert_weights, gate, up, down_t, activation)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::moe_ffn")
def _moe_ffn_fake(x, expert_ids, expert_weights, gate, up, down_t, activation):
    check_dense_args(x, expert_ids, expert_weights, gate, up, down_t, activation)
    return x.new_empty(x.shape)


@torch.library.register_fake("pocketllm::moe_ffn.out")
def _moe_ffn_out_fake(x, expert_ids, expert_weights, gate, up, down_t, activation, *, out):
    return out


@torch.library.impl(LIB, "moe_ffn_any4", "CompositeExplicitAutograd")
def _moe_ffn_any4(x, expert_ids, expert_weights, *packed_and_activation):
    return moe_ffn_any4_reference(x, expert_ids, expert_weights, *packed_and_activation)


@torch.library.impl(LIB, "moe_ffn_any4.out", "CompositeExplicitAutograd")
def _moe_ffn_any4_out(x, expert_ids, expert_weights, *packed_and_activation, out):
    result = moe_ffn_any4_reference(x, expert_ids, expert_weights, *packed_and_activation)
    out.resize_(result.shape)
    out.copy_(result)
    return out


@torch.library.register_fake("pocketllm::moe_ffn_any4")
def _moe_ffn_any4_fake(x, expert_ids, expert_weights, *packed_and_activation):
    check_any4_args(x, expert_ids, expert_weights, *packed_and_activation)
    return x.new_empty(x.shape)


@torch.library.register_fake("pocketllm::moe_ffn_any4.out")
def _moe_ffn_any4_out_fake(x, expert_ids, expert_weights, *packed_and_activation, out):
    return out
