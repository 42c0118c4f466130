"""pocketllm::any4_linear_w4a8: the torch reference, the numpy twin and the C++ kernel (every ISA path) compute the
numerics of export/ops/any4_linear_w4a8.py bit for bit (tolerance 0), and W4A8 stays close to exact any4."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.any4_linear import any4_linear_reference
from pocketllm.export.ops.any4_linear_w4a8 import (any4_linear_w4a8_reference, from_row_blocks, quantize_activations,
                                         to_row_blocks, w4a8_lut, w4a8_pack)
from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY, REPO
from pocketllm.runtime_py.ops import any4_linear_w4a8 as twin

pytestmark = pytest.mark.usefixtures("one_torch_thread")
I = ctypes.c_int64


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def any4_layer(N: int, K: int, g: int, seed: int) -> dict[str, torch.Tensor]:
    """Random any4 packed tensors as a checkpoint stores them (LUT on the bf16 grid, fp16 scales and zeros)."""
    gen = torch.Generator().manual_seed(seed)
    lut = (torch.randn(N, 16, generator=gen) * 4).sort(dim=1).values.to(torch.bfloat16).to(torch.float16)
    return {"qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen), "lut": lut,
            "scales": (torch.rand(N, K // g, generator=gen) * 0.05 + 0.001).half(),
            "zeros": (torch.randn(N, K // g, generator=gen) * 0.05).half()}


def activations(M: int, K: int, seed: int) -> torch.Tensor:
    """Gaussian tokens; token 1 all zeros, the last one with an outlier 50x the typical value."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed))
    if M > 1:
        x[1] = 0
        x[-1, K // 3] = 50.0
    return x


def run_twin(x, p, g):
    return twin.any4_linear_w4a8(x.numpy(), p["qweight"].numpy(), p["lut_i8"].numpy(), p["lut_scale"].numpy(),
                                 p["scales"].numpy(), p["zeros"].numpy(), g)


# ------------------------------------------------------------------------------------------------ definition
def test_hand_checked_values():
    """K = 4, one row, two groups of 2, every number by hand:
    x = [127, -63.5, 0, 1]: max 127, sx = 1, xq = [127, -64, 0, 1] (-63.5 rounds half to even).
    lut[c] = (c - 8) / 2: max |lut| = 4 (c = 0), ls = 4 / 127, lut_i8 = rint(lut * 127 / 4) = rint((c - 8) * 15.875).
    codes [8, 10 | 0, 15] -> lut_i8 [0, 32 | -127, 111] (2 * 15.875 = 31.75 -> 32; 7 * 15.875 = 111.125 -> 111).
    A = [127*0 + (-64)*32, 0*(-127) + 1*111] = [-2048, 111]; B = [63, 1].
    scales s = [1, 0.5], zeros z = [0.25, -1]: y = ls * (-2048 * 1 + 111 * 0.5) + 63 * 0.25 + 1 * (-1)."""
    qweight = torch.tensor([[8 | 10 << 4, 0 | 15 << 4]], dtype=torch.uint8)
    lut = ((torch.arange(16, dtype=torch.float32) - 8) / 2).half()[None]
    p = w4a8_pack(qweight, lut, torch.tensor([[1.0, 0.5]]).half(), torch.tensor([[0.25, -1.0]]).half(), 2)
    assert p["lut_i8"][0, [8, 10, 0, 15]].tolist() == [0, 32, -127, 111]
    ls = np.float32(4) / np.float32(127)
    assert p["lut_scale"].item() == ls
    x = torch.tensor([[127.0, -63.5, 0.0, 1.0]])
    xq, sx, finite = quantize_activations(x)
    assert xq.tolist() == [[127, -64, 0, 1]] and sx.item() == 1.0 and finite.item()
    f = np.float32
    d0, d1 = ls * f(1.0), ls * f(0.5)
    acc = f(0) + (f(-2048) * d0 + f(63) * f(0.25))
    acc = acc + (f(111) * d1 + f(1) * f(-1.0))
    want = acc * f(1.0)
    assert any4_linear_w4a8_reference(x, group_size=2, **p).item() == want
    assert run_twin(x, p, 2).item() == want


def test_lut_to_int8_matches_twin_and_bounds():
    lut = torch.cat([any4_layer(64, 64, 64, 0)["lut"], torch.zeros(1, 16, dtype=torch.float16)])
    lut_i8, ls = w4a8_lut(lut)
    want_i8, want_ls = twin.lut_to_int8(lut.numpy())
    assert np.array_equal(lut_i8.numpy(), want_i8) and np.array_equal(ls.numpy(), want_ls)
    assert lut_i8[:-1].abs().amax(dim=1).eq(127).all()  # the largest entry of each row maps to +-127
    assert ls[-1] == 0 and lut_i8[-1].eq(0).all()  # an all-zero LUT row
    err = (lut_i8[:-1].float() * ls[:-1, None] - lut[:-1].float()).abs()
    assert (err <= ls[:-1, None] / 2 * (1 + 1e-5)).all()  # nearest (after an fp32 division)


def test_scales_in_8_row_blocks():
    """Element [b, g, r] of the blocked layout is row 8b + r, group g; rows past N are zero."""
    t = torch.arange(13 * 3, dtype=torch.float32).reshape(13, 3).half()
    blocked = to_row_blocks(t)
    assert blocked.shape == (2, 3, 8)
    assert blocked[1, 2, 4].item() == t[12, 2].item() and blocked[0, 1, 7].item() == t[7, 1].item()
    assert blocked[1, :, 5:].eq(0).all()
    assert torch.equal(from_row_blocks(blocked, 13), t)


@pytest.mark.parametrize("M,N,K,g", [(1, 16, 128, 128), (3, 13, 96, 32), (5, 8, 256, 64), (2, 7, 384, 384),
                                     (4, 9, 160, 32), (6, 5, 20, 2)])
def test_reference_matches_twin_bit_for_bit(M, N, K, g):
    p = w4a8_pack(group_size=g, **any4_layer(N, K, g, seed=N * K))
    x = activations(M, K, seed=M)
    y = any4_linear_w4a8_reference(x, group_size=g, **p)
    assert np.array_equal(y.numpy(), run_twin(x, p, g))


def test_nonfinite_token_gives_nan_row_and_zero_token_gives_zero():
    K, g = 64, 32
    p = w4a8_pack(group_size=g, **any4_layer(4, K, g, seed=1))
    x = activations(4, K, seed=2)
    x[2, 5] = float("nan")
    x[3, 0] = float("inf")
    y = any4_linear_w4a8_reference(x, group_size=g, **p)
    assert y[2:].isnan().all() and not y[:2].isnan().any()
    assert y[1].eq(0).all()  # the all-zero token
    assert np.array_equal(y.numpy(), run_twin(x, p, g), equal_nan=True)


def test_leading_dims_and_torch_op():
    p = w4a8_pack(group_size=64, **any4_layer(8, 128, 64, seed=3))
    x = torch.randn(2, 3, 128)
    y = torch.ops.pocketllm.any4_linear_w4a8(x, p["qweight"], p["lut_i8"], p["lut_scale"], p["scales"],
                                             p["zeros"], 64)
    assert y.shape == (2, 3, 8)
    assert torch.equal(y.reshape(6, 8), any4_linear_w4a8_reference(x.reshape(6, 128), group_size=64, **p))


@pytest.mark.parametrize("change,message", [
    (dict(lut_i8=torch.zeros(8, 16, dtype=torch.int16)), "lut_i8 must be int8"),
    (dict(lut_scale=torch.zeros(8, dtype=torch.float16)), "lut_scale must be float32"),
    (dict(scales=torch.zeros(8, 2, dtype=torch.float32)), "scales must be float16"),
    (dict(zeros=torch.zeros(8, 2, dtype=torch.float16)), "zeros must be float16 [1, 2, 8]"),
    (dict(group_size=48), "group_size 48 must divide K = 128"),
    (dict(x=torch.zeros(1, 128, dtype=torch.float16)), "x must be float32"),
])
def test_bad_arguments(change, message):
    args = dict(x=torch.zeros(1, 128), group_size=64, **w4a8_pack(group_size=64, **any4_layer(8, 128, 64, 0)))
    args.update(change)
    with pytest.raises(PocketllmError, match=message.replace("[", r"\[").replace("]", r"\]")):
        any4_linear_w4a8_reference(**args)


def test_pack_rejects_scales_that_are_not_fp16_values():
    layer = any4_layer(4, 64, 32, 0)
    layer["scales"] = layer["scales"].float() + 1e-5
    with pytest.raises(PocketllmError, match="scales are not float16 values"):
        w4a8_pack(group_size=32, **layer)


# ------------------------------------------------------------------------------------------------ kernel
@pytest.fixture(scope="module")
def kernels() -> ctypes.CDLL:
    if not DEFAULT_KERNEL_LIBRARY.is_file():
        subprocess.run(["make", "-s", "kernels"], cwd=REPO, check=True)
    from pocketllm.runtime_py.runners.executorch import load_kernel_library, set_threads

    load_kernel_library(needed=["pocketllm::any4_linear_w4a8.out"])
    set_threads(2)  # rows split across threads, as in an app
    lib = ctypes.CDLL(str(DEFAULT_KERNEL_LIBRARY))
    lib.pocketllm_any4_linear_w4a8_isa.restype = ctypes.c_char_p
    return lib


def run_kernel(kernels, x, p, g):
    M, K = x.shape
    N = p["qweight"].shape[0]
    y = torch.full((M, N), -1.0)
    kernels.pocketllm_any4_linear_w4a8(ptr(x), ptr(p["qweight"]), ptr(p["lut_i8"]), ptr(p["lut_scale"]),
                                       ptr(p["scales"]), ptr(p["zeros"]), I(M), I(N), I(K), I(g), ptr(y))
    return y


KERNEL_CASES = [(1, 64, 128, 128), (1, 96, 256, 32), (1, 33, 96, 32), (1, 20, 1024, 1024), (1, 7, 20, 2),
                (2, 64, 256, 64), (5, 37, 224, 32), (13, 41, 512, 128), (128, 48, 512, 128), (3, 17, 48, 16)]


@pytest.mark.parametrize("M,N,K,g", KERNEL_CASES, ids=lambda v: str(v))
def test_kernel_matches_twin_bit_for_bit(kernels, M, N, K, g):
    """Decode (M = 1) and prefill (M > 1) paths, group sizes 2..1024 and one group per row, K not a multiple of 64,
    rows not a multiple of 4, all-zero and outlier tokens."""
    p = w4a8_pack(group_size=g, **any4_layer(N, K, g, seed=N + K))
    x = activations(M, K, seed=K)
    assert np.array_equal(run_kernel(kernels, x, p, g).numpy(), run_twin(x, p, g))


def test_kernel_integer_parts(kernels):
    """The kernel's int8 activations, per-group sums B and scales equal the twin's."""
    M, K, g = 4, 192, 64
    x = activations(M, K, seed=5)
    x[2, 7] = float("nan")
    xq = torch.zeros(M, K, dtype=torch.int8)
    B = torch.zeros(M, K // g, dtype=torch.int32)
    sx = torch.zeros(M)
    finite = torch.zeros(M, dtype=torch.uint8)
    kernels.pocketllm_any4_linear_w4a8_quantize(ptr(x), I(M), I(K), I(g), ptr(xq), ptr(B), ptr(sx), ptr(finite))
    want_xq, want_sx, want_finite = twin.quantize_tokens(x.numpy())
    assert np.array_equal(xq.numpy(), want_xq) and np.array_equal(sx.numpy(), want_sx)
    assert np.array_equal(finite.numpy().astype(bool), want_finite)
    assert np.array_equal(B.numpy(), want_xq.astype(np.int32).reshape(M, -1, g).sum(axis=2))


def test_kernel_extremes_do_not_saturate(kernels):
    """|xq| = 127 and |lut_i8| = 127 everywhere: the largest int16 pair sums (vpmaddubsw) and int32 group sums."""
    N, K, g = 8, 4096, 4096
    gen = torch.Generator().manual_seed(0)
    lut = torch.where(torch.rand(N, 16, generator=gen) < 0.5, 4.0, -4.0).half()
    layer = {"qweight": torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen), "lut": lut,
             "scales": torch.ones(N, 1).half(), "zeros": torch.zeros(N, 1).half()}
    p = w4a8_pack(group_size=g, **layer)
    assert p["lut_i8"].abs().eq(127).all()
    x = torch.where(torch.rand(2, K, generator=gen) < 0.5, 1.0, -1.0)
    x[1] = 1.0  # every product 127 * +-127 with the same sign where the LUT sign agrees
    for xs in (x[:1], x):
        assert np.array_equal(run_kernel(kernels, xs.contiguous(), p, g).numpy(), run_twin(xs, p, g))


def test_kernel_nonfinite_rows(kernels):
    p = w4a8_pack(group_size=32, **any4_layer(10, 64, 32, seed=4))
    x = activations(3, 64, seed=4)
    x[0, 1] = float("inf")
    for xs in (x[:1], x):
        y = run_kernel(kernels, xs.contiguous(), p, 32)
        assert y[0].isnan().all()
        assert np.array_equal(y.numpy(), run_twin(xs, p, 32), equal_nan=True)


def test_close_to_exact_any4_on_smooth_inputs(kernels):
    """Not a parity contract, a sanity bound: 8-bit activations and LUT cost about 0.9% relative error here (Gaussian
    tokens, random any4 layer); on tiny-austen's real layers 0.3-1.4% (benchmarks/w4a8_quality.py)."""
    N, K, g = 256, 1024, 128
    layer = any4_layer(N, K, g, seed=11)
    x = torch.randn(8, K, generator=torch.Generator().manual_seed(12))
    exact = any4_linear_reference(x, group_size=g, **layer)
    y = run_kernel(kernels, x, w4a8_pack(group_size=g, **layer), g)
    rel = ((y - exact).norm() / exact.norm()).item()
    assert rel < 0.02, rel


# ------------------------------------------------------------------------------------------------ ISA paths
CORE_TEST = REPO / "kernels" / "tests" / "any4_w4a8_test.cpp"
FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
HOST_FLAGS = set(open("/proc/cpuinfo").read().split()) if platform.machine() == "x86_64" else set()
X86_NEEDS = {"avx2": {"avx2", "fma", "f16c"}, "avx2-vnni": {"avx2", "fma", "f16c", "avx_vnni"},
             "avx512-vnni": {"avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "f16c", "fma"}, "portable": set()}
ISA_BUILDS = {  # name: (compiler flags, the path the binary must report; None = the best the host has)
    "native": (["-march=native"], None),
    "avx512-vnni": (["-march=icelake-server"], "avx512-vnni"),
    "avx2-vnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], "avx2-vnni"),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], "avx2"),  # the baseline x86 path: no VNNI
    "portable": (["-mno-avx"], "portable"),
    "neon": (["-march=armv8-a"], "neon"),
    "neon-dotprod": (["-march=armv8.2-a+dotprod"], "neon-dotprod"),
}


@pytest.mark.parametrize("isa", list(ISA_BUILDS))
def test_core_isa_paths(tmp_path, isa):
    """kernels/any4_linear_w4a8_core.h on each ISA path against a scalar reference of the definition, bit for bit
    (decode and prefill, group sizes 2..2048, saturation extremes, NaN tokens). arm64 runs under qemu-aarch64
    (`make cross-tools`)."""
    flags, expected = ISA_BUILDS[isa]
    exe = tmp_path / f"w4a8_{isa}"
    if isa.startswith("neon"):
        cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
        if not (cxx and qemu):
            pytest.skip("aarch64-linux-gnu-g++ / qemu-aarch64 not installed (make cross-tools)")
        cmd, run = [cxx, *FLAGS, "-static", *flags], [qemu, str(exe)]
    else:
        if platform.machine() != "x86_64" or not X86_NEEDS.get(isa, set()) <= HOST_FLAGS:
            pytest.skip(f"{isa}: needs an x86-64 host with {sorted(X86_NEEDS.get(isa, set()))}")
        cmd, run = ["c++", *FLAGS, *flags], [str(exe)]
    subprocess.run([*cmd, str(CORE_TEST), "-o", str(exe)], check=True, capture_output=True)
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    if expected is None:
        expected = next((name for name in ("avx512-vnni", "avx2-vnni", "avx2") if X86_NEEDS[name] <= HOST_FLAGS),
                        "neon-dotprod" if platform.machine() == "aarch64" else "portable")
    assert f"({expected}):" in proc.stdout and proc.stdout.strip().endswith("ok"), proc.stdout


# ------------------------------------------------------------------------------------------------ .pte
def test_pte_runs_the_kernel(kernels, tmp_path):
    """A single-linear program: torch.export -> ExecuTorch with the op left to our kernel; bit-exact to the twin."""
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    N, K, g = 24, 256, 64
    p = w4a8_pack(group_size=g, **any4_layer(N, K, g, seed=9))

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in p.items():
                self.register_buffer(name, t)

        def forward(self, x):
            return torch.ops.pocketllm.any4_linear_w4a8(x, self.qweight, self.lut_i8, self.lut_scale, self.scales,
                                                        self.zeros, g)

    for M in (1, 3):  # decode and prefill
        x = activations(M, K, seed=M)
        ep = torch.export.export(One(), (x,), strict=False)
        path = tmp_path / f"one_{M}.pte"
        path.write_bytes(to_edge(ep).to_executorch().buffer)
        method = Runtime.get().load_program(str(path)).load_method("forward")
        assert np.array_equal(method.execute([x])[0].numpy(), run_twin(x, p, g))
