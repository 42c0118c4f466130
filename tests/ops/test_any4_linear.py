"""pocketllm::any4_linear: the torch op (hand-checked, .out, fake, bad arguments), and the C++ kernel against it
(decode and prefill shapes, the dequantised values bit for bit, every ISA path of the decode loop)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.any4_linear import any4_dequantize, any4_linear_reference
from pocketllm.export.quant.pack import pack_nibbles
from pocketllm.runtime_py.runners.executorch import REPO
from tests.kernels import I, ptr


def hand_any4():
    """One row, K = 4, group size 2: codes 0,1,15,2; LUT -8..7 scaled by 0.5; groups (s, z) = (1, 10), (2, -4)."""
    qweight = pack_nibbles(torch.tensor([[0, 1, 15, 2]]))
    lut = (torch.arange(16, dtype=torch.float16) - 8)[None] * 0.5
    scales = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    zeros = torch.tensor([[10.0, -4.0]], dtype=torch.float16)
    # lut[code]: -4, -3.5, 3.5, -3  -> * s + z:  6, 6.5, 3, -10
    return qweight, lut, scales, zeros, torch.tensor([[6.0, 6.5, 3.0, -10.0]])


def test_any4_linear_hand_checked_and_out_variant():
    qweight, lut, scales, zeros, expected = hand_any4()
    assert torch.equal(any4_dequantize(qweight, lut, scales, zeros, 2), expected)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    y = torch.ops.pocketllm.any4_linear(x, qweight, lut, scales, zeros, 2)
    assert torch.equal(y, torch.tensor([[6.0], [5.5]]))
    out = torch.empty(0)
    torch.ops.pocketllm.any4_linear.out(x, qweight, lut, scales, zeros, 2, out=out)
    assert torch.equal(out, y)
    assert torch.ops.pocketllm.any4_linear(x.bfloat16(), qweight, lut, scales, zeros, 2).dtype == torch.bfloat16


def test_any4_linear_fake_and_bad_args():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qweight, lut, scales, zeros, _ = hand_any4()
    x = torch.randn(3, 5, 4)
    with FakeTensorMode() as mode:
        fake = torch.ops.pocketllm.any4_linear(*(mode.from_tensor(t) for t in (x, qweight, lut, scales, zeros)), 2)
        assert fake.shape == (3, 5, 1) and fake.dtype == torch.float32
    with pytest.raises(PocketllmError, match="group_size 3"):
        torch.ops.pocketllm.any4_linear(x, qweight, lut, scales, zeros, 3)
    with pytest.raises(PocketllmError, match="lut has shape"):
        torch.ops.pocketllm.any4_linear(x, qweight, lut[:, :8], scales, zeros, 2)


# ----------------------------------------------------------------- the C++ kernel (ctypes)
@pytest.mark.parametrize("M,N,K,g", [(1, 64, 128, 128), (1, 96, 256, 32), (5, 64, 256, 64), (1, 33, 48, 16),
                                     (3, 17, 20, 2), (13, 37, 256, 64), (6, 16, 128, 128), (128, 48, 512, 128)])
def test_any4_linear_matches_reference(kernels, M, N, K, g):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(M, K, generator=gen)
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    lut = (torch.randn(N, 16, generator=gen) * 4).half()
    scales = (torch.rand(N, K // g, generator=gen) * 0.1).half()
    zeros = torch.randn(N, K // g, generator=gen).half()
    ref = any4_linear_reference(x, qweight, lut, scales, zeros, g)
    y = torch.zeros(M, N)
    lf, sf, zf = (t.float().contiguous() for t in (lut, scales, zeros))
    kernels.pocketllm_any4_linear(ptr(x), ptr(qweight), ptr(lf), ptr(sf), ptr(zf), I(M), I(N), I(K), I(g), ptr(y))
    torch.testing.assert_close(y, ref, atol=2e-6 * ref.abs().max().item(), rtol=1e-5)


def test_any4_dequantized_values_are_exact(kernels):
    """A one-hot x picks a single dequantized weight: it must equal the reference's bit for bit (no FMA)."""
    N, K, g = 8, 64, 32
    gen = torch.Generator().manual_seed(7)
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    lut = (torch.randn(N, 16, generator=gen) * 4).half().float()
    scales = (torch.rand(N, K // g, generator=gen) * 0.1 + 0.01).half().float()
    zeros = torch.randn(N, K // g, generator=gen).half().float()
    x = torch.eye(K)
    y = torch.zeros(K, N)
    kernels.pocketllm_any4_linear(ptr(x), ptr(qweight), ptr(lut), ptr(scales), ptr(zeros), I(K), I(N), I(K), I(g),
                                  ptr(y))
    from pocketllm.export.ops.any4_linear import any4_dequantize

    assert torch.equal(y.T, any4_dequantize(qweight, lut, scales, zeros, g))


DECODE_TEST = REPO / "kernels" / "tests" / "any4_decode_test.cpp"
FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Werror"]


@pytest.mark.parametrize("isa", ["native", "scalar", "neon"])
def test_any4_decode_simd_paths(tmp_path, isa):
    """The decode hot loop (kernels/any4_decode.h) on each ISA path against dequantise-then-dot in double, plus
    one-hot columns bit-exact and every fp16 value through the conversions. NEON runs the arm64 phone path under
    qemu-aarch64 (`make cross-tools` installs both; CI does)."""
    import shutil

    exe = tmp_path / f"any4_decode_{isa}"
    if isa == "neon":
        cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
        if not (cxx and qemu):
            pytest.skip("aarch64-linux-gnu-g++ / qemu-aarch64 not installed (make cross-tools)")
        cmd, run = [cxx, *FLAGS, "-static"], [qemu, str(exe)]
    else:
        cmd, run = ["c++", *FLAGS, "-march=native" if isa == "native" else "-mno-avx"], [str(exe)]
    subprocess.run([*cmd, str(DECODE_TEST), "-o", str(exe)], check=True, capture_output=True)
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    import platform

    host = "neon" if platform.machine() in ("aarch64", "arm64") else (
        "avx2" if "avx2" in open("/proc/cpuinfo").read() else "scalar")
    expected = {"native": host, "scalar": "scalar" if host != "neon" else "neon", "neon": "neon"}[isa]
    assert f"({expected}): ok" in proc.stdout, proc.stdout
