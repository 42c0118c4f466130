"""pocketllm::int8_linear: the torch op (hand-checked, .out, fake, bad arguments), its numpy twin (dequantization bit
for bit), and the C++ kernel against the reference (decode and prefill shapes; a one-hot input returns the
dequantized weight bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.int8_linear import int8_dequantize, int8_linear_reference
from pocketllm.runtime_py.ops import int8_linear as twin
from pocketllm.runtime_py.runners.executorch import REPO
from tests.kernels import I, ptr


def test_int8_linear_hand_checked_and_out_variant():
    q = torch.tensor([[1, -2, 127], [0, 3, -127]], dtype=torch.int8)
    s = torch.tensor([[0.5], [2.0]], dtype=torch.float16)
    assert torch.equal(int8_dequantize(q, s), torch.tensor([[0.5, -1.0, 63.5], [0.0, 6.0, -254.0]]))
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.ops.pocketllm.int8_linear(x, q, s)
    assert torch.equal(y, torch.tensor([[-0.5, 6.0], [63.5, -254.0]]))
    out = torch.empty(0)
    torch.ops.pocketllm.int8_linear.out(x, q, s, out=out)
    assert torch.equal(out, y)
    assert torch.ops.pocketllm.int8_linear(x.bfloat16(), q, s).dtype == torch.bfloat16


def test_int8_linear_fake_and_bad_args():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.zeros(5, 4, dtype=torch.int8)
    s = torch.ones(5, 1, dtype=torch.float16)
    x = torch.randn(2, 3, 4)
    with FakeTensorMode() as mode:
        fake = torch.ops.pocketllm.int8_linear(*(mode.from_tensor(t) for t in (x, q, s)))
        assert fake.shape == (2, 3, 5)
    with pytest.raises(PocketllmError, match="qweight must be int8"):
        torch.ops.pocketllm.int8_linear(x, q.to(torch.uint8), s)
    with pytest.raises(PocketllmError, match="x has 3 input features"):
        torch.ops.pocketllm.int8_linear(x[..., :3], q, s)
    with pytest.raises(PocketllmError, match=r"scales must be float \[5, 1\]"):
        torch.ops.pocketllm.int8_linear(x, q, s[:4])


def test_numpy_twin_dequantizes_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (33, 70), dtype=torch.int8, generator=gen)
    s = (torch.rand(33, 1, generator=gen) * 0.03).half()
    ours = int8_dequantize(q, s).numpy()
    theirs = twin.int8_dequantize(q.numpy(), s.numpy())
    assert ours.dtype == theirs.dtype == np.float32 and np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
    x = torch.randn(4, 70, generator=gen)
    np.testing.assert_allclose(twin.int8_linear(x.numpy(), q.numpy(), s.numpy()),
                               int8_linear_reference(x, q, s).numpy(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- the C++ kernel (ctypes)
@pytest.mark.parametrize("M,N,K", [(1, 64, 128), (1, 37, 100), (1, 5, 7), (3, 17, 20), (13, 70, 256),
                                   (128, 40, 512), (9, 33, 1030)])
def test_int8_linear_kernel_matches_reference(kernels, M, N, K):
    gen = torch.Generator().manual_seed(N * K)
    x = torch.randn(M, K, generator=gen)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = (torch.rand(N, 1, generator=gen) * 0.02).half()
    ref = int8_linear_reference(x, q, s)
    y = torch.zeros(M, N)
    sf = s.float().reshape(-1).contiguous()
    kernels.pocketllm_int8_linear(ptr(x), ptr(q), ptr(sf), I(M), I(N), I(K), ptr(y))
    torch.testing.assert_close(y, ref, atol=2e-6 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("M", [1, 64])
def test_int8_kernel_one_hot_returns_the_dequantized_weight(kernels, M):
    """x = rows of the identity: decode (one row at a time) and prefill (all at once) return W bit for bit."""
    N, K = 40, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = (torch.rand(N, 1, generator=gen) * 0.02 + 1e-3).half()
    w = int8_dequantize(q, s)
    sf = s.float().reshape(-1).contiguous()
    eye = torch.eye(K)
    y = torch.zeros(K, N)
    for r0 in range(0, K, M):
        x = eye[r0:r0 + M].contiguous()
        out = torch.zeros(M, N)
        kernels.pocketllm_int8_linear(ptr(x), ptr(q), ptr(sf), I(M), I(N), I(K), ptr(out))
        y[r0:r0 + M] = out
    assert torch.equal(y.T, w)


def test_kernel_calls_from_several_threads_at_once(kernels):
    """kernels/common.h's WorkShare runs one job at a time; concurrent callers (ctypes releases the GIL) run inline
    and every result is still right."""
    from concurrent.futures import ThreadPoolExecutor

    N, K = 3000, 256
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    s = (torch.rand(N, generator=gen) * 0.02).contiguous()
    xs = [torch.randn(1 if i % 2 else 5, K, generator=gen) for i in range(8)]

    def run(x):
        y = torch.zeros(x.shape[0], N)
        for _ in range(20):
            kernels.pocketllm_int8_linear(ptr(x), ptr(q), ptr(s), I(x.shape[0]), I(N), I(K), ptr(y))
        return y

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, xs))
    for x, y in zip(xs, results):
        ref = int8_linear_reference(x, q, s[:, None].half().float())
        torch.testing.assert_close(y, x @ (q.float() * s[:, None]).T, atol=2e-6 * ref.abs().max().item(), rtol=1e-5)


PANEL_TEST = REPO / "kernels" / "tests" / "panel_gemm_test.cpp"


@pytest.mark.parametrize("isa", ["native", "avx2", "scalar", "neon"])
def test_panel_gemm_simd_paths(tmp_path, isa):
    """kernels/panel_gemm.h (the prefill tiles of int8_linear and any4_linear) on each ISA path against a double
    reference, one-hot rows bit for bit. NEON runs the arm64 phone path under qemu-aarch64 (`make cross-tools`)."""
    import shutil
    import subprocess

    flags = ["-O2", "-std=c++17", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-psabi",
             f"-I{REPO / 'kernels' / 'tests' / 'stub'}"]
    exe = tmp_path / f"panel_gemm_{isa}"
    if isa == "neon":
        cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
        if not (cxx and qemu):
            pytest.skip("aarch64-linux-gnu-g++ / qemu-aarch64 not installed (make cross-tools)")
        cmd, run = [cxx, *flags, "-static"], [qemu, str(exe)]
    else:
        cpu = open("/proc/cpuinfo").read()
        if isa == "avx2" and "avx2" not in cpu:
            pytest.skip("no AVX2 on this machine")
        extra = {"native": ["-march=native"], "avx2": ["-march=native", "-mno-avx512f"], "scalar": ["-mno-avx"]}[isa]
        cmd, run = ["c++", *flags, *extra], [str(exe)]
    subprocess.run([*cmd, str(PANEL_TEST), "-o", str(exe)], check=True, capture_output=True)
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0 and "checks, ok" in proc.stdout, proc.stdout
