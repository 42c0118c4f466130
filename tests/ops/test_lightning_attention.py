"""Lightning attention: the `pocketllm::lightning_attention` op, the numpy reference, and the models' state.

Chunked prefill (intra-block decay + inter-block state) must equal the one-token decode recurrence for every block
edge case; the state a lightning layer keeps must not grow with the position; bad shapes fail on one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pocketllm.export.ops  # noqa: F401  (registers the ops)
from pocketllm.export.errors import PocketllmError
from pocketllm.export.ops.lightning_attention import lightning_decay_rates
from pocketllm.export.ops.lightning_attention import lightning_attention_reference
from pocketllm.runtime_py.ops.lightning_attention import decay_rates, lightning_attention, lightning_recurrent
from tests.kernels import I, ptr

OP = torch.ops.pocketllm.lightning_attention
H, D = 3, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def qkv(T: int, seed: int = 0, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """SiLU-activated q, k, v [batch, T, H, D] at a scale where outputs stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.nn.functional.silu(torch.randn(batch, T, H, D, generator=g)) * 0.3 for _ in range(3))


def step_by_step(q, k, v, state, decay, block_size):
    outs = []
    for t in range(q.shape[1]):
        o, state = OP(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, decay, block_size)
        outs.append(o)
    return torch.cat(outs, dim=1), state


# ------------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("T,block", [(5, 16), (16, 16), (41, 16), (48, 16), (1, 16), (37, 1)],
                         ids=["T<B", "T=B", "T>B-ragged", "T=3B", "T=1", "B=1"])
def test_chunked_prefill_equals_recurrent_decode(T, block):
    q, k, v = qkv(T)
    decay = lightning_decay_rates(H, 1, 4)
    zero = torch.zeros(1, H, D, D)
    out, state = OP(q, k, v, zero, decay, block)
    ref_out, ref_state = step_by_step(q, k, v, zero, decay, block)
    assert out.shape == (1, T, H, D) and state.shape == (1, H, D, D) and state.dtype == torch.float32
    assert (out - ref_out).abs().max() <= 1e-5
    assert (state - ref_state).abs().max() <= 1e-5
    assert out.abs().max() > 0.05  # not trivially small


def test_prefill_in_chunks_then_decode_equals_one_token_at_a_time():
    T, block = 70, 16
    q, k, v = qkv(T, seed=1)
    decay = lightning_decay_rates(H, 0, 4)  # layer 0: the slowest decay, the longest memory
    zero = torch.zeros(1, H, D, D)
    a, s = OP(q[:, :23], k[:, :23], v[:, :23], zero, decay, block)  # a ragged first chunk
    b, s = OP(q[:, 23:60], k[:, 23:60], v[:, 23:60], s, decay, block)  # a chunk starting mid-"block"
    c, s = step_by_step(q[:, 60:], k[:, 60:], v[:, 60:], s, decay, block)  # then decode
    ref, ref_state = step_by_step(q, k, v, zero, decay, block)
    assert (torch.cat([a, b, c], dim=1) - ref).abs().max() <= 1e-5
    assert (s - ref_state).abs().max() <= 1e-5


def test_out_variant_and_batch():
    q, k, v = qkv(20, seed=2, batch=2)
    decay = lightning_decay_rates(H, 2, 4)
    state = torch.randn(2, H, D, D) * 0.1
    out, new_state = OP(q, k, v, state, decay, 8)
    o, s = torch.empty(0), torch.empty(0)
    r = torch.ops.pocketllm.lightning_attention.out(q, k, v, state, decay, 8, out=o, new_state=s)
    assert r[0] is o and r[1] is s
    assert torch.equal(o, out) and torch.equal(s, new_state)
    for b in range(2):  # batch rows are independent
        ob, sb = OP(q[b:b + 1], k[b:b + 1], v[b:b + 1], state[b:b + 1], decay, 8)
        assert torch.allclose(ob, out[b:b + 1], atol=1e-6) and torch.allclose(sb, new_state[b:b + 1], atol=1e-6)


def test_fake_impl_gives_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 50, H, D, dtype=torch.bfloat16)
        out, state = OP(q, q, q, torch.empty(1, H, D, D), torch.empty(H), 16)
    assert out.shape == (1, 50, H, D) and out.dtype == torch.bfloat16
    assert state.shape == (1, H, D, D) and state.dtype == torch.float32


def test_decay_rates_torch_and_numpy_agree_with_the_formula():
    for layer, n_layers in [(0, 4), (3, 4), (0, 1), (5, 80)]:
        expected = [2 ** (-8 * (h + 1) / H) * (1 - layer / (n_layers - 1 + 1e-5) + 1e-5) for h in range(H)]
        assert np.allclose(lightning_decay_rates(H, layer, n_layers).numpy(), expected, rtol=1e-6)
        assert np.allclose(decay_rates(H, layer, n_layers), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- numpy side
@pytest.mark.parametrize("T,block", [(5, 16), (16, 16), (41, 16)])
def test_numpy_block_form_equals_recurrence_and_the_torch_op(T, block):
    q, k, v = (x[0].numpy() for x in qkv(T, seed=3))
    state = (np.random.default_rng(0).standard_normal((H, D, D)) * 0.1).astype(np.float32)
    rates = decay_rates(H, 1, 3)
    out, new_state = lightning_attention(q, k, v, state, rates, block)
    rec_out, rec_state = lightning_recurrent(q, k, v, state, rates)
    assert np.abs(out - rec_out).max() <= 1e-6 and np.abs(new_state - rec_state).max() <= 1e-6
    t_out, t_state = OP(*(torch.from_numpy(x)[None] for x in (q, k, v, state)), torch.from_numpy(rates).float(), block)
    assert np.abs(t_out[0].numpy() - out).max() <= 1e-5 and np.abs(t_state[0].numpy() - new_state).max() <= 1e-5


# ----------------------------------------------------------------------------------------------- bad input
def test_state_shape_mismatch_is_one_line():
    q, k, v = qkv(4)
    with pytest.raises(PocketllmError) as e:
        OP(q, k, v, torch.zeros(1, H, D, D + 1), lightning_decay_rates(H, 0, 2), 16)
    msg = str(e.value)
    assert "\n" not in msg and "state has shape [1, 3, 8, 9], expected [1, 3, 8, 8]" in msg
    with pytest.raises(PocketllmError, match="decay has shape"):
        OP(q, k, v, torch.zeros(1, H, D, D), torch.zeros(H + 1), 16)
    with pytest.raises(PocketllmError, match="must be float32"):
        OP(q, k, v, torch.zeros(1, H, D, D, dtype=torch.bfloat16), lightning_decay_rates(H, 0, 2), 16)
    with pytest.raises(PocketllmError) as e:
        lightning_attention(q[0].numpy(), k[0].numpy(), v[0].numpy(), np.zeros((H, D + 1, D), np.float32),
                            decay_rates(H, 0, 2), 16)
    assert "\n" not in str(e.value) and "expected [3, 8, 8]" in str(e.value)


# ------------------------------------------------------------------------------------------- the models


# ----------------------------------------------------------------- the C++ kernel (ctypes)
@pytest.mark.parametrize("B,T,H,D,block", [(1, 1, 4, 16, 256), (1, 37, 4, 16, 8), (2, 300, 3, 8, 256)])
def test_lightning_matches_reference(kernels, B, T, H, D, block):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g)) for _ in range(3))
    state = torch.randn(B, H, D, D, generator=g) * 0.1
    decay = lightning_decay_rates(H, 1, 4)
    ref_out, ref_state = lightning_attention_reference(q, k, v, state, decay, block)
    out, new_state = torch.zeros_like(q), torch.zeros_like(state)
    kernels.pocketllm_lightning_attention(ptr(q), ptr(k), ptr(v), ptr(state), ptr(decay), I(B), I(T), I(H), I(D),
                                          I(block), ptr(out), ptr(new_state))
    scale = ref_out.abs().max().item()
    torch.testing.assert_close(out, ref_out, atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(new_state, ref_state, atol=1e-6 * ref_state.abs().max().item(), rtol=1e-5)
