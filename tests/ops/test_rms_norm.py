"""pocketllm::rms_norm: the torch op is export/nn/norm.py's RMSNorm (bit for bit), its numpy twin agrees, bad
arguments get one-line errors, and the C++ kernel matches the reference for decode and prefill shapes."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.norm import RMSNorm
from pocketllm.export.ops.rms_norm import rms_norm_reference
from pocketllm.runtime_py.ops import rms_norm as twin
from tests.kernels import I, ptr


def test_hand_checked_and_out_variant():
    x = torch.tensor([[3.0, 4.0], [1.0, -1.0]])
    w = torch.tensor([1.0, 2.0])
    # row 0: mean square 12.5 -> x / sqrt(12.5); row 1: mean square 1 -> x
    expected = torch.tensor([[3.0 / 12.5 ** 0.5, 8.0 / 12.5 ** 0.5], [1.0, -2.0]])
    y = torch.ops.pocketllm.rms_norm(x, w, 0.0)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)
    out = torch.empty(0)
    torch.ops.pocketllm.rms_norm.out(x, w, 0.0, out=out)
    assert torch.equal(out, y)
    assert torch.ops.pocketllm.rms_norm(x.bfloat16(), w, 1e-5).dtype == torch.bfloat16


def test_is_the_models_norm_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-6)
    norm.weight.data = torch.randn(96, generator=gen)
    x = torch.randn(3, 5, 96, generator=gen) * 4
    assert torch.equal(torch.ops.pocketllm.rms_norm(x, norm.weight, norm.eps), norm(x))


def test_fake_and_bad_args():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.pocketllm.rms_norm(mode.from_tensor(torch.randn(2, 7, 8)), mode.from_tensor(torch.ones(8)),
                                            1e-5)
        assert fake.shape == (2, 7, 8)
    with pytest.raises(PocketllmError, match=r"weight must be float \[8\]"):
        torch.ops.pocketllm.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(PocketllmError, match="x must be a float tensor"):
        torch.ops.pocketllm.rms_norm(torch.ones(2, 8, dtype=torch.int32), torch.ones(8), 1e-5)


def test_numpy_twin():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(4, 64, generator=gen), torch.randn(64, generator=gen)
    np.testing.assert_allclose(twin.rms_norm(x.numpy(), w.numpy(), 1e-5), rms_norm_reference(x, w, 1e-5).numpy(),
                               rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("rows,H", [(1, 1024), (1, 7), (1, 4100), (3, 33), (300, 1536)])
def test_kernel_matches_reference(kernels, rows, H):
    gen = torch.Generator().manual_seed(rows * H)
    x = torch.randn(rows, H, generator=gen) * 3
    w = torch.randn(H, generator=gen)
    y = torch.full_like(x, float("nan"))
    kernels.pocketllm_rms_norm(ptr(x), ptr(w), I(rows), I(H), ctypes.c_float(1e-5), ptr(y))
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)
