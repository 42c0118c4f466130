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
from pocketllm.export.init_checkpoint import init_checkpoint
from pocketllm.export.nn import load_model
from pocketllm.export.nn.lightning import LightningAttention
from pocketllm.export.ops.lightning_attention import lightning_decay_rates
from pocketllm.runtime_py import ReferenceModel
from pocketllm.runtime_py.ops.lightning_attention import decay_rates, lightning_attention, lightning_recurrent

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
@pytest.fixture(scope="module")
def tiny_minimax(tmp_path_factory):
    """init-checkpoint's minimax tiny preset (lightning layers 0-2, softmax layer 3, block 32), fp32."""
    return init_checkpoint("minimax", "tiny", tmp_path_factory.mktemp("mm") / "tiny", seed=5, dtype="fp32")


def lightning_states(model) -> list[torch.Tensor]:
    return [m.state_cache.state for m in model.modules() if isinstance(m, LightningAttention)]


def test_decode_memory_is_constant_in_context_length(tiny_minimax):
    """Every buffer of the torch model and every state of the reference keeps its shape while decoding; lightning
    layers hold no KV cache at all, only [heads, D, D]."""
    model, ckpt = load_model(tiny_minimax, max_context=96, dtype="fp32")
    spec = ckpt.spec
    ref = ReferenceModel.from_checkpoint(tiny_minimax, max_context=96)
    states = lightning_states(model)
    assert len(states) == sum(layer.attention == "lightning" for layer in spec.layers) == 3
    for layer in model.model.layers:
        if isinstance(layer.self_attn, LightningAttention):
            assert not hasattr(layer.self_attn, "cache")
    buffers = {name: (tuple(b.shape), b.dtype) for name, b in model.named_buffers()}
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 80)
    seen_state_values = set()
    with torch.no_grad():
        for pos in range(80):
            model(torch.as_tensor(ids[pos:pos + 1])[None], pos)
            ref.forward(ids[pos:pos + 1], pos)
            assert {n: (tuple(b.shape), b.dtype) for n, b in model.named_buffers()} == buffers
            for s in lightning_states(model):
                assert tuple(s.shape) == (1, spec.num_heads, spec.head_dim, spec.head_dim)
            for s in ref.states:
                assert s is None or s.shape == (spec.num_heads, spec.head_dim, spec.head_dim)
            seen_state_values.add(float(states[0].abs().sum()))
    assert len(seen_state_values) == 80  # the state really changes at every step


def test_model_prefill_then_decode_equals_all_decode(tiny_minimax):
    """T = 45 > block 32: chunked prefill of the prompt, then decode, against decoding every token one at a time
    (torch model and numpy reference each)."""
    model, ckpt = load_model(tiny_minimax, max_context=64, dtype="fp32")
    ref = ReferenceModel.from_checkpoint(tiny_minimax, max_context=64)
    ids = np.random.default_rng(1).integers(0, ckpt.spec.vocab_size, 52)
    P = 45

    def torch_run(split):
        model.reset_cache()
        with torch.no_grad():
            rows = [model(torch.as_tensor(ids[:split])[None], 0)[0]] if split else []
            rows += [model(torch.as_tensor(ids[t:t + 1])[None], t)[0] for t in range(split, len(ids))]
        return torch.cat(rows).numpy()

    def ref_run(split):
        ref.reset()
        rows = [ref.forward(ids[:split], 0)] if split else []
        rows += [ref.forward(ids[t:t + 1], t) for t in range(split, len(ids))]
        return np.concatenate(rows)

    for run in (torch_run, ref_run):
        chunked, stepwise = run(P), run(0)
        assert np.abs(chunked).max() > 0.5  # logits are not trivially small
        assert np.abs(chunked - stepwise).max() <= 1e-5, run.__name__


def test_position_zero_starts_a_new_sequence(tiny_minimax):
    """Like the KV cache rows, the lightning state is not carried into a call at position 0 (no reset needed)."""
    model, _ = load_model(tiny_minimax, max_context=32, dtype="fp32")
    ids = torch.arange(10)[None] + 3
    with torch.no_grad():
        first = model(ids, 0)
        model(ids[:, :4], 10)  # more context
        again = model(ids, 0)
    assert torch.equal(first, again)
    ref = ReferenceModel.from_checkpoint(tiny_minimax, max_context=32)
    a = ref.forward(ids[0].numpy(), 0)
    ref.forward(ids[0, :4].numpy(), 10)
    assert np.array_equal(a, ref.forward(ids[0].numpy(), 0))
    with pytest.raises(PocketllmError, match="cannot rewind"):
        ref.forward(ids[0, :2].numpy(), 5)


def test_model_state_of_wrong_shape_is_one_line(tiny_minimax):
    model, _ = load_model(tiny_minimax, max_context=16, dtype="fp32")
    attn = next(m for m in model.modules() if isinstance(m, LightningAttention))
    attn.state_cache.state = torch.zeros(1, 4, 8, 8)  # a state from some other model
    with pytest.raises(PocketllmError) as e, torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), 0)
    assert "\n" not in str(e.value) and "state has shape [1, 4, 8, 8], expected [1, 4, 16, 16]" in str(e.value)


def small_minimax(seed: int = 0):
    """A 2-layer minimax CausalLM (lightning + softmax, 2 experts) with random weights: quick to export."""
    from pocketllm.export.nn import CausalLM
    from pocketllm.export.families import preset_config
    from pocketllm.export.families import spec_from_config

    cfg = preset_config("minimax", "tiny")
    cfg.update(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], num_local_experts=2,
               num_experts_per_tok=1, block_size=16)
    torch.manual_seed(seed)
    model = CausalLM(spec_from_config(cfg), max_context=48)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.dim() > 1 else 0.05) + (p.dim() == 1))
            p.requires_grad_(False)
    return model.eval()


def test_torch_export_keeps_the_state_as_a_mutable_buffer():
    """torch.export (dynamic T) keeps the op opaque and the lightning state as a mutated buffer; the exported
    program reproduces its eager twin over prefill, continued prefill, decode and a restart at position 0."""
    from torch.export import Dim

    eager, twin = small_minimax(), small_minimax()  # same weights, separate buffers (export shares the twin's)
    with torch.no_grad():
        ep = torch.export.export(twin, (torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)),
                                 dynamic_shapes=({1: Dim("tokens", min=1, max=48)}, None), strict=False)
    ep = ep.run_decompositions({})
    mutated = {s.target for s in ep.graph_signature.output_specs if s.kind.name == "BUFFER_MUTATION"}
    assert "model.layers.0.self_attn.state_cache.state" in mutated and "model.layers.1.self_attn.cache.k_cache" in mutated
    assert sum(n.target == torch.ops.pocketllm.lightning_attention.default for n in ep.graph.nodes) == 1
    exported = ep.module()
    ids = torch.as_tensor(np.random.default_rng(2).integers(0, 512, 40))[None]
    calls = [(0, 21), (21, 24), (24, 25), (25, 26), (0, 5)]  # prefill > block, chunk, two decodes, restart
    with torch.no_grad():
        for a, b in calls:
            want = eager(ids[:, a:b], a)
            got = exported(ids[:, a:b], torch.tensor([a]))
            assert want.abs().max() > 0.1 and (want - got).abs().max() <= 1e-5, (a, b)
