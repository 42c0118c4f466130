"""pocketllm::moe_ffn / moe_ffn_any4: torch reference (export/ops/moe_ffn.py) vs numpy twin (runtime_py/ops/moe_ffn.py)
vs the C++ kernel (kernels/moe_ffn.cpp, through its C entry points) vs a `.pte` that calls the op.

Routing is random but controlled: some experts are never chosen, several tokens share experts, and the prefill cases
mix experts with many tokens (the kernel's tiled path) and with few (its per-token path).

Tolerances. Every implementation computes in fp32 on the same stored weights (bf16 and any4 values widen exactly), so
one tolerance serves fp32, bf16 and any4 experts: max |difference| <= 1e-5 x max |reference| (summation order inside
the dot products is the only difference). Exact (torch.equal): the op vs the eager fp32 MoE modules it replaces,
ReGLU neuron sparsity on vs off, and poisoned vs clean unrouted experts.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

import pocketllm.export.ops  # noqa: F401  (registers the pocketllm ops)
from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.any4_linear import any4_dequantize
from pocketllm.export.ops.moe_ffn import moe_ffn_any4_reference, moe_ffn_reference
from pocketllm.runtime_py.ops import moe_ffn as np_moe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

I = ctypes.c_int64
ACTIVATION_CODE = {"reglu": 0, "swiglu": 1}
SPARSITY_CODE = {"off": 0, "auto": 1, "always": 2}  # kernels/moe_ffn.h NeuronSparsity
OPS = ["pocketllm::moe_ffn.out", "pocketllm::moe_ffn_any4.out"]


@pytest.fixture(scope="module")
def kernels() -> ctypes.CDLL:
    from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY, load_kernel_library
    from tests.kernels import build_kernels

    build_kernels()
    load_kernel_library(needed=OPS)
    return ctypes.CDLL(str(DEFAULT_KERNEL_LIBRARY))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


# ------------------------------------------------------------------------------------------ inputs
def routing(T: int, k: int, E: int, used: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids int64 [T, k] (distinct per token) over the first `used` experts, with skewed popularity so that a prefill
    has both crowded and rare experts; weights fp32 [T, k] summing to 1."""
    popularity = torch.zeros(E)
    popularity[:used] = 0.6 ** torch.arange(used, dtype=torch.float32)
    ids = torch.multinomial(popularity.expand(T, E), k, replacement=False, generator=gen)
    weights = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return ids, weights


def float_experts(E: int, F: int, H: int, dtype: torch.dtype, gen: torch.Generator):
    """gate, up, down_t [E, F, H] with unit-scale outputs."""
    def w(scale):
        return (torch.randn(E, F, H, generator=gen) * scale).to(dtype)
    return w(H ** -0.5), w(H ** -0.5), w(F ** -0.5)


def any4_stack(E: int, N: int, K: int, g: int, gen: torch.Generator, lut_dtype: torch.dtype,
               scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One projection's packed any4 tensors [E, N, ...]; dequantized weights ~ N(0, 1/K)."""
    G = K // g
    return {"qweight": torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=gen),
            "lut": (torch.randn(E, N, 16, generator=gen) * 4).to(lut_dtype),
            "scales": ((torch.rand(E, N, G, generator=gen) + 0.5) * 0.25 * K ** -0.5).to(scale_dtype),
            "zeros": (torch.randn(E, N, G, generator=gen) * 0.1 * K ** -0.5).to(scale_dtype)}


def any4_experts(E, F, H, g_in, g_ffn, gen, lut_dtype=torch.bfloat16, scale_dtype=torch.float16):
    """gate/up [E, F, H] (groups of g_in along H), down [E, H, F] (groups of g_ffn along F), as the op's 12 args."""
    stacks = [any4_stack(E, F, H, g_in, gen, lut_dtype, scale_dtype), any4_stack(E, F, H, g_in, gen, lut_dtype,
                                                                                  scale_dtype),
              any4_stack(E, H, F, g_ffn, gen, lut_dtype, scale_dtype)]
    return [s[name] for s in stacks for name in ("qweight", "lut", "scales", "zeros")]


# ------------------------------------------------------------------------------------------ kernel calls
def kernel_float(lib, x, ids, w, gate, up, down_t, activation, sparsity="auto") -> torch.Tensor:
    T, H = x.shape
    E, F, _ = gate.shape
    out = torch.full((T, H), float("nan"))
    ok = lib.pocketllm_moe_ffn(ptr(x), ptr(ids), ptr(w), I(T), I(ids.shape[1]), I(H), ptr(gate), ptr(up), ptr(down_t),
                               I(gate.dtype == torch.bfloat16), I(E), I(F), I(ACTIVATION_CODE[activation]),
                               I(SPARSITY_CODE[sparsity]), ptr(out))
    assert ok == 1
    return out


def kernel_any4(lib, x, ids, w, packed, activation, sparsity="auto") -> torch.Tensor:
    T, H = x.shape
    gq, gl, gs, gz, uq, ul, us, uz, dq, dl, ds, dz = packed
    E, F = gq.shape[:2]
    out = torch.full((T, H), float("nan"))
    ok = lib.pocketllm_moe_ffn_any4(
        ptr(x), ptr(ids), ptr(w), I(T), I(ids.shape[1]), I(H),
        ptr(gq), ptr(gl), ptr(gs), ptr(gz), I(gs.shape[2]), ptr(uq), ptr(ul), ptr(us), ptr(uz), I(us.shape[2]),
        ptr(dq), ptr(dl), ptr(ds), ptr(dz), I(ds.shape[2]), I(gl.dtype == torch.bfloat16),
        I(gs.dtype == torch.float16), I(E), I(F), I(ACTIVATION_CODE[activation]), I(SPARSITY_CODE[sparsity]), ptr(out))
    assert ok == 1
    return out


def numpy_any4(x, ids, w, packed, activation) -> torch.Tensor:
    arrays = [t.float().numpy() if t.dtype != torch.uint8 else t.numpy() for t in packed]
    return torch.from_numpy(np_moe.moe_ffn_any4(x.numpy(), ids.numpy(), w.numpy(), *arrays, activation))


def tokens_per_expert(ids: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(ids.flatten(), minlength=E)


# ------------------------------------------------------------------------------------------ float experts
# T, k, E, used experts, F, H. Decode (T = 1, k = 1..4), odd widths (H % 16 != 0: column tails), prefill with
# rare and crowded experts, and experts no token chose.
FLOAT_CASES = [(1, 1, 8, 8, 32, 64), (1, 2, 8, 8, 24, 40), (1, 3, 16, 16, 48, 128), (1, 4, 32, 32, 64, 96),
               (5, 3, 8, 6, 32, 64), (37, 4, 12, 9, 40, 72), (64, 2, 4, 4, 64, 136)]


@pytest.mark.parametrize("activation", ["reglu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", FLOAT_CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-E{c[2]}-F{c[4]}-H{c[5]}")
def test_float_experts_kernel_and_numpy_match_reference(kernels, case, dtype, activation):
    T, k, E, used, F, H = case
    gen = torch.Generator().manual_seed(T * 100 + k * 10 + H)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, k, E, used, gen)
    gate, up, down_t = float_experts(E, F, H, dtype, gen)

    ref = moe_ffn_reference(x, ids, w, gate, up, down_t, activation)
    close(kernel_float(kernels, x, ids, w, gate, up, down_t, activation), ref)
    as_np = [t.float().numpy() for t in (gate, up, down_t)]
    close(torch.from_numpy(np_moe.moe_ffn(x.numpy(), ids.numpy(), w.numpy(), *as_np, activation)), ref)


def test_prefill_case_mixes_crowded_and_rare_experts():
    """The routing of the T=37 case sends >= 4 tokens to some experts (tiles) and 1..3 to others (row path)."""
    T, k, E, used, F, H = FLOAT_CASES[5]
    gen = torch.Generator().manual_seed(T * 100 + k * 10 + H)
    torch.randn(T, H, generator=gen)
    counts = tokens_per_expert(routing(T, k, E, used, gen)[0], E)
    assert (counts >= 4).any() and ((counts > 0) & (counts < 4)).any() and (counts[used:] == 0).all()


def test_repeated_expert_in_one_token_counts_twice(kernels):
    """expert_ids is taken literally: a token listing one expert twice gets it twice (weights add), in the torch op,
    the C++ kernel and the numpy twin."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 32, generator=gen)
    gate, up, down_t = float_experts(4, 16, 32, torch.float32, gen)
    ids = torch.tensor([[2, 2], [1, 3]])
    w = torch.tensor([[0.25, 0.5], [0.5, 0.5]])
    once = moe_ffn_reference(x, torch.tensor([[2], [1]]), torch.tensor([[0.75], [0.5]]), gate, up, down_t, "reglu")
    ref = moe_ffn_reference(x, ids, w, gate, up, down_t, "reglu")
    close(ref[0], once[0])
    close(kernel_float(kernels, x, ids, w, gate, up, down_t, "reglu"), ref)
    as_np = [t.numpy() for t in (gate, up, down_t)]  # numpy fancy-index `out[rows] +=` would count it once
    close(torch.from_numpy(np_moe.moe_ffn(x.numpy(), ids.numpy(), w.numpy(), *as_np, "reglu")), ref)


# ------------------------------------------------------------------------------------------ any4 experts
# T, k, E, used, F, H, group along H, group along F. Groups of 32/64/128 take any4_decode.h's SIMD row dot;
# 16 (not a multiple of 32) and odd group counts the kernel's portable per-group table path; G = 1: one group per row.
ANY4_CASES = [(1, 4, 8, 8, 64, 128, 32, 32), (1, 2, 8, 8, 128, 256, 128, 128), (1, 1, 4, 4, 32, 64, 64, 32),
              (1, 3, 6, 6, 48, 80, 16, 16), (3, 2, 6, 5, 64, 96, 96, 64), (29, 4, 10, 7, 64, 128, 32, 64),
              (40, 2, 6, 4, 48, 112, 16, 48)]


@pytest.mark.parametrize("activation", ["reglu", "swiglu"])
@pytest.mark.parametrize("tables", [(torch.bfloat16, torch.float16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32)], ids=["lut-bf16", "lut-fp16", "scales-fp32"])
@pytest.mark.parametrize("case", ANY4_CASES, ids=lambda c: f"T{c[0]}-k{c[1]}-F{c[4]}-H{c[5]}-g{c[6]}/{c[7]}")
def test_any4_experts_kernel_and_numpy_match_reference(kernels, case, tables, activation):
    T, k, E, used, F, H, g_in, g_ffn = case
    gen = torch.Generator().manual_seed(T * 100 + H + g_in)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, k, E, used, gen)
    packed = any4_experts(E, F, H, g_in, g_ffn, gen, *tables)

    ref = moe_ffn_any4_reference(x, ids, w, *packed, activation)
    close(kernel_any4(kernels, x, ids, w, packed, activation), ref)
    close(numpy_any4(x, ids, w, packed, activation), ref)


def test_any4_reference_is_the_dense_op_on_dequantized_experts():
    """moe_ffn_any4 = moe_ffn on the dequantized weights (down transposed), exactly (same torch calls)."""
    gen = torch.Generator().manual_seed(11)
    E, F, H = 5, 32, 64
    x = torch.randn(6, H, generator=gen)
    ids, w = routing(6, 2, E, E, gen)
    packed = any4_experts(E, F, H, 32, 16, gen)

    def dequant(i, g):
        q, lut, s, z = packed[4 * i:4 * i + 4]
        return torch.stack([any4_dequantize(q[e], lut[e], s[e], z[e], g) for e in range(E)])

    gate, up, down = dequant(0, 32), dequant(1, 32), dequant(2, 16)
    expected = moe_ffn_reference(x, ids, w, gate, up, down.transpose(1, 2).contiguous(), "swiglu")
    assert torch.equal(moe_ffn_any4_reference(x, ids, w, *packed, "swiglu"), expected)


# ------------------------------------------------------------------------------------------ sparsity, isolation
@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "any4"])
def test_reglu_neuron_sparsity_is_exact(kernels, weights, T):
    """Not reading the up (and float down) rows of neurons with relu(gate) = 0 changes nothing, bit for bit: kernel
    sparsity always / auto vs off. Random weights leave about half of the gates non-positive; T = 40 runs the tiled
    path (no skipping) for its crowded experts."""
    E, F, H, k = 8, 64, 128, 4
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, k, E, E, gen)
    if weights == "any4":
        packed = any4_experts(E, F, H, 32, 32, gen)
        run = lambda sparsity: kernel_any4(kernels, x, ids, w, packed, "reglu", sparsity)  # noqa: E731
        gate = torch.stack([any4_dequantize(*(t[e] for t in packed[:4]), 32) for e in range(E)])
    else:
        gate, up, down_t = float_experts(E, F, H, torch.float32 if weights == "fp32" else torch.bfloat16, gen)
        run = lambda sparsity: kernel_float(kernels, x, ids, w, gate, up, down_t, "reglu", sparsity)  # noqa: E731
    pre = torch.einsum("th,tkfh->tkf", x, gate.float()[ids])  # gate pre-activations of the routed experts
    inactive = (pre <= 0).float().mean().item()
    assert 0.3 < inactive < 0.7  # the sparse path really skips neurons
    dense = run("off")
    assert torch.isfinite(dense).all()
    assert torch.equal(run("always"), dense)
    assert torch.equal(run("auto"), dense)


@pytest.mark.parametrize("T", [1, 2, 33])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "any4"])
def test_unrouted_experts_are_never_read(kernels, weights, T):
    """Experts no token chose hold NaN: the output stays finite and equal to the run on clean weights."""
    E, used, F, H, k = 8, 5, 32, 64, 2
    gen = torch.Generator().manual_seed(T + 7)
    x = torch.randn(T, H, generator=gen)
    ids, w = routing(T, k, E, used, gen)
    unrouted = torch.tensor([e for e in range(E) if e not in set(ids.flatten().tolist())])
    assert len(unrouted) >= E - used
    if weights == "any4":
        packed = any4_experts(E, F, H, 32, 32, gen)
        clean = kernel_any4(kernels, x, ids, w, packed, "swiglu")
        poisoned = [t.clone() for t in packed]
        for t in poisoned:
            if t.dtype != torch.uint8:
                t[unrouted] = float("nan")
        out = kernel_any4(kernels, x, ids, w, poisoned, "swiglu")
    else:
        dtype = torch.float32 if weights == "fp32" else torch.bfloat16
        mats = float_experts(E, F, H, dtype, gen)
        clean = kernel_float(kernels, x, ids, w, *mats, "swiglu")
        poisoned = [m.clone() for m in mats]
        for m in poisoned:
            m[unrouted] = float("nan")
        out = kernel_float(kernels, x, ids, w, *poisoned, "swiglu")
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


def test_expert_id_out_of_range_is_refused(kernels):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, generator=gen)
    gate, up, down_t = float_experts(4, 16, 32, torch.float32, gen)
    w = torch.full((2, 2), 0.5)
    for bad in ([[0, 4], [1, 2]], [[0, 1], [-1, 2]]):
        ids = torch.tensor(bad)
        out = torch.full((2, 32), 7.0)
        ok = kernels.pocketllm_moe_ffn(ptr(x), ptr(ids), ptr(w), I(2), I(2), I(32), ptr(gate), ptr(up), ptr(down_t),
                                       I(0), I(4), I(16), I(0), I(SPARSITY_CODE["auto"]), ptr(out))
        assert ok == 0 and (out == 7.0).all()  # refused, nothing written
        with pytest.raises(PocketllmError, match=r"expert_ids must lie in \[0, 4\)"):
            moe_ffn_reference(x, ids, w, gate, up, down_t, "reglu")


# ------------------------------------------------------------------------------------------ the op itself
def test_op_reproduces_the_eager_moe_modules_exactly():
    """fp32: the op gives the eager SmallThinker MoE (ReGLU, pre-attention router) and MiniMax SoftmaxTopKMoE
    (SwiGLU) outputs bit for bit: same per-expert fp32 products, same ascending-expert accumulation."""
    from pocketllm.export.families import get_family
    from pocketllm.export.nn.moe import MoE
    from pocketllm.export.spec import MoESpec

    torch.manual_seed(0)
    st = MoE(64, MoESpec(8, 3, 32, router_softmax=False, router="pre_attention", activation="relu"),
             get_family("smallthinker").moe_names)
    mm = MoE(64, MoESpec(8, 2, 32, router_softmax=True, router="post_attention", activation="silu"),
             get_family("minimax").moe_names)
    layer_input, u = torch.randn(9, 64), torch.randn(9, 64)
    with torch.no_grad():
        for moe, activation, router_input in ((st, "reglu", layer_input), (mm, "swiglu", u)):
            w, ids = moe.router.route(router_input)
            gate, up, down = zip(*(e.projections() for e in moe.experts))
            gate, up = torch.stack([m.weight for m in gate]), torch.stack([m.weight for m in up])
            down_t = torch.stack([m.weight.T for m in down]).contiguous()
            assert torch.equal(torch.ops.pocketllm.moe_ffn(u, ids, w, gate, up, down_t, activation),
                               moe(u, layer_input))


def test_out_variant_and_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=gen)
    ids, w = routing(3, 2, 4, 4, gen)
    gate, up, down_t = float_experts(4, 16, 32, torch.float32, gen)
    out = torch.empty(0)
    torch.ops.pocketllm.moe_ffn.out(x, ids, w, gate, up, down_t, "swiglu", out=out)
    assert torch.equal(out, moe_ffn_reference(x, ids, w, gate, up, down_t, "swiglu"))
    with FakeTensorMode() as mode:
        fx, fids, fw, fg, fu, fd = (mode.from_tensor(t) for t in (x, ids, w, gate, up, down_t))
        assert torch.ops.pocketllm.moe_ffn(fx, fids, fw, fg, fu, fd, "reglu").shape == (3, 32)
        packed = [mode.from_tensor(t) for t in any4_experts(4, 16, 32, 16, 16, gen)]
        assert torch.ops.pocketllm.moe_ffn_any4(fx, fids, fw, *packed, "reglu").shape == (3, 32)


@pytest.mark.parametrize("change,message", [
    (lambda a: {**a, "down_t": a["down_t"].transpose(1, 2)}, "down_t has shape"),
    (lambda a: {**a, "up": a["up"].to(torch.bfloat16)}, "must all be float32 or all bfloat16"),
    (lambda a: {**a, "expert_ids": a["expert_ids"].int()}, "expert_ids must be int64"),
    (lambda a: {**a, "expert_weights": a["expert_weights"][:, :1]}, "expert_weights must be float32"),
    (lambda a: {**a, "activation": "gelu"}, "activation 'gelu'"),
])
def test_bad_arguments_are_one_line_errors(change, message):
    gen = torch.Generator().manual_seed(2)
    ids, w = routing(3, 2, 4, 4, gen)
    gate, up, down_t = float_experts(4, 16, 32, torch.float32, gen)
    args = dict(x=torch.randn(3, 32), expert_ids=ids, expert_weights=w, gate=gate, up=up, down_t=down_t,
                activation="reglu")
    with pytest.raises(PocketllmError, match=message):
        torch.ops.pocketllm.moe_ffn(**change(args))


def test_any4_bad_group_count_is_a_one_line_error():
    gen = torch.Generator().manual_seed(4)
    packed = any4_experts(4, 16, 32, 16, 16, gen)
    packed[2] = packed[2][:, :, :1].expand(4, 16, 3).contiguous()  # 3 groups do not divide 32 inputs
    packed[3] = packed[2].clone()
    ids, w = routing(2, 2, 4, 4, gen)
    with pytest.raises(PocketllmError, match="gate_scales has 3 groups per row"):
        torch.ops.pocketllm.moe_ffn_any4(torch.randn(2, 32), ids, w, *packed, "reglu")


# ------------------------------------------------------------------------------------------ .pte
class FloatMoE(torch.nn.Module):
    def __init__(self, gate, up, down_t, activation):
        super().__init__()
        self.register_buffer("gate", gate)
        self.register_buffer("up", up)
        self.register_buffer("down_t", down_t)
        self.activation = activation

    def forward(self, x, expert_ids, expert_weights):
        return torch.ops.pocketllm.moe_ffn(x, expert_ids, expert_weights, self.gate, self.up, self.down_t,
                                           self.activation)


class Any4MoE(torch.nn.Module):
    def __init__(self, packed, activation):
        super().__init__()
        self.names = [f"{p}_{s}" for p in ("gate", "up", "down") for s in ("qweight", "lut", "scales", "zeros")]
        for name, t in zip(self.names, packed):
            self.register_buffer(name, t)
        self.activation = activation

    def forward(self, x, expert_ids, expert_weights):
        return torch.ops.pocketllm.moe_ffn_any4(x, expert_ids, expert_weights,
                                                *(getattr(self, n) for n in self.names), self.activation)


def few_active_neurons(gate: torch.Tensor) -> torch.Tensor:
    """gate rows made positive for the first F/8 neurons and negative for the rest: with inputs x >= 0, exactly
    F/8 neurons per expert are active, so the kernel's automatic ReGLU skipping engages (kernels/moe_ffn.h)."""
    F = gate.shape[1]
    sign = torch.ones(F)
    sign[F // 8:] = -1
    return gate.abs() * sign[None, :, None]


@pytest.mark.parametrize("weights", ["bf16-reglu", "fp32-reglu-few-active", "any4-swiglu"])
def test_pte_runs_the_kernel_and_matches_the_reference(kernels, tmp_path, weights):
    """A tiny module calling the op, exported with a dynamic token count and lowered as the ExecuTorch target lowers
    (XNNPACK partitioner; the op stays whole), run by ExecuTorch's runtime with our kernel library: decode and
    prefill calls equal the torch reference."""
    from executorch.runtime import Runtime
    from torch.export import Dim

    from pocketllm.export.targets.executorch.lower import lower, program_operators

    E, F, H, k = 6, 64, 96, 2
    gen = torch.Generator().manual_seed(5)
    inputs = lambda T: torch.randn(T, H, generator=gen)  # noqa: E731
    if weights == "bf16-reglu":
        model = FloatMoE(*float_experts(E, F, H, torch.bfloat16, gen), "reglu")
        op = "pocketllm::moe_ffn.out"
    elif weights == "fp32-reglu-few-active":
        gate, up, down_t = float_experts(E, F, H, torch.float32, gen)
        model = FloatMoE(few_active_neurons(gate), up, down_t, "reglu")
        op = "pocketllm::moe_ffn.out"
        inputs = lambda T: torch.randn(T, H, generator=gen).abs()  # noqa: E731
    else:
        model = Any4MoE(any4_experts(E, F, H, 32, 32, gen), "swiglu")
        op = "pocketllm::moe_ffn_any4.out"
    model.eval()
    x, (ids, w) = inputs(2), routing(2, k, E, E, gen)
    T = Dim("T", min=1, max=32)
    ep = torch.export.export(model, (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}), strict=False)
    program = lower(ep, {}).to_executorch()
    assert op in program_operators(program)
    path = tmp_path / "moe.pte"
    path.write_bytes(program.buffer)

    method = Runtime.get().load_program(str(path)).load_method("forward")
    for n_tokens in (1, 17):
        x = inputs(n_tokens)
        ids, w = routing(n_tokens, k, E, E - 1, gen)
        (out,) = method.execute([x, ids, w])
        close(out, model(x, ids, w))
