"""MiniMax's lightning layers inside the model: constant decode memory, chunked prefill, restarts, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.init_checkpoint import init_checkpoint
from pocketllm.export.nn import load_model
from pocketllm.export.nn.lightning import LightningAttention
from pocketllm.runtime_py import ReferenceModel


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
