"""pocketllm::silu_mul: silu(gate) * up as the gated MLP computes it, its numpy twin, one-line errors, and the C++
kernel against the reference (its own exp: within a few ulps), including gates far into both tails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.mlp import GatedMLP
from pocketllm.export.ops.silu_mul import silu_mul_reference
from pocketllm.runtime_py.ops import silu_mul as twin
from tests.kernels import I, ptr


def test_hand_checked_and_out_variant():
    g = torch.tensor([0.0, 1.0, -1.0, 50.0])
    u = torch.tensor([5.0, 2.0, 2.0, 0.5])
    expected = torch.tensor([0.0, 2.0 / (1 + np.exp(-1.0)), -2.0 / (1 + np.exp(1.0)), 25.0], dtype=torch.float32)
    torch.testing.assert_close(torch.ops.pocketllm.silu_mul(g, u), expected, rtol=1e-6, atol=0)
    out = torch.empty(0)
    torch.ops.pocketllm.silu_mul.out(g, u, out=out)
    assert torch.equal(out, torch.ops.pocketllm.silu_mul(g, u))


def test_is_the_gated_mlps_product():
    mlp = GatedMLP(16, 24)
    g, u = torch.randn(3, 24), torch.randn(3, 24)
    assert torch.equal(torch.ops.pocketllm.silu_mul(g, u), mlp.glu(g, u))


def test_fake_and_bad_args():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert torch.ops.pocketllm.silu_mul(mode.from_tensor(torch.randn(2, 5)),
                                            mode.from_tensor(torch.randn(2, 5))).shape == (2, 5)
    with pytest.raises(PocketllmError, match="gate and up must be float tensors of one shape"):
        torch.ops.pocketllm.silu_mul(torch.randn(2, 5), torch.randn(2, 4))


def test_numpy_twin():
    gen = torch.Generator().manual_seed(4)
    g, u = torch.randn(4, 100, generator=gen) * 5, torch.randn(4, 100, generator=gen)
    np.testing.assert_allclose(twin.silu_mul(g.numpy(), u.numpy()), silu_mul_reference(g, u).numpy(),
                               rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("n", [1, 7, 4096, 4096 * 300 + 5])
def test_kernel_matches_reference(kernels, n):
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen) * 6
    g[: min(n, 3)] = torch.tensor([-100.0, 100.0, -30.0])[: min(n, 3)]  # exp(-g) overflows / underflows
    u = torch.randn(n, generator=gen)
    y = torch.full_like(g, float("nan"))
    kernels.pocketllm_silu_mul(ptr(g), ptr(u), I(n), ptr(y))
    torch.testing.assert_close(y, silu_mul_reference(g, u), rtol=2e-6, atol=1e-30)
