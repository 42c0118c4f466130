"""pocketllm::rope: the torch op is export/nn/rope.py's rotation (bit for bit, partial RoPE included), its numpy twin
agrees, bad arguments get one-line errors, and the C++ kernel returns the reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.rope import RotaryAt
from pocketllm.export.ops.rope import rope_reference
from pocketllm.runtime_py.ops import rope as twin
from tests.kernels import I, ptr


def tables(T: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    angles = torch.rand(T, d // 2, generator=gen) * 6
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[None, :, None, :] * 1.1, angles.sin()[None, :, None, :] * 1.1


def test_hand_checked():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 1, 1, 5)  # d = 4 of D = 5: the last channel passes
    cos = torch.tensor([0.0, 1.0, 0.0, 1.0]).reshape(1, 1, 1, 4)
    sin = torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4)
    # [x0 c0 - x2 s0, x1 c1 - x3 s1, x2 c2 + x0 s2, x3 c3 + x1 s3, x4]
    assert torch.equal(torch.ops.pocketllm.rope(x, cos, sin).flatten(), torch.tensor([-3.0, 2.0, 1.0, 4.0, 5.0]))
    out = torch.empty(0)
    torch.ops.pocketllm.rope.out(x, cos, sin, out=out)
    assert torch.equal(out.flatten(), torch.tensor([-3.0, 2.0, 1.0, 4.0, 5.0]))


@pytest.mark.parametrize("d,D", [(64, 64), (32, 64)])
def test_is_the_models_rotation_bit_for_bit(d, D):
    cos, sin = tables(6, d)
    x = torch.randn(1, 6, 3, D, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.ops.pocketllm.rope(x, cos, sin), RotaryAt(cos, sin, d)(x))


def test_fake_and_bad_args():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cos, sin = tables(3, 8)
    with FakeTensorMode() as mode:
        fake = torch.ops.pocketllm.rope(*(mode.from_tensor(t) for t in (torch.randn(1, 3, 2, 8), cos, sin)))
        assert fake.shape == (1, 3, 2, 8)
    with pytest.raises(PocketllmError, match=r"x must be float \[1, T, heads, D\]"):
        torch.ops.pocketllm.rope(torch.randn(3, 2, 8), cos, sin)
    with pytest.raises(PocketllmError, match=r"cos and sin must be \[1, 4, 1, d\]"):
        torch.ops.pocketllm.rope(torch.randn(1, 4, 2, 8), cos, sin)
    with pytest.raises(PocketllmError, match="d = 8 must be even and at most the head dim 6"):
        torch.ops.pocketllm.rope(torch.randn(1, 3, 2, 6), cos, sin)


@pytest.mark.parametrize("d,D", [(64, 64), (32, 64)])
def test_numpy_twin(d, D):
    cos, sin = tables(5, d)
    x = torch.randn(1, 5, 4, D, generator=torch.Generator().manual_seed(3))
    ours = twin.apply_rope(x[0].numpy(), cos[0, :, 0].numpy(), sin[0, :, 0].numpy())
    np.testing.assert_array_equal(ours, rope_reference(x, cos, sin)[0].numpy())


@pytest.mark.parametrize("T,heads,D,d", [(1, 16, 64, 64), (1, 2, 128, 128), (7, 3, 64, 32), (300, 4, 64, 64),
                                         (2, 1, 10, 6)])
def test_kernel_is_the_reference_bit_for_bit(kernels, T, heads, D, d):
    cos, sin = tables(T, d, seed=T)
    x = torch.randn(1, T, heads, D, generator=torch.Generator().manual_seed(heads))
    y = torch.full_like(x, float("nan"))
    c, s = cos.contiguous(), sin.contiguous()
    kernels.pocketllm_rope(ptr(x), ptr(c), ptr(s), I(T), I(heads), I(D), I(d), ptr(y))
    assert torch.equal(y, rope_reference(x, cos, sin))
