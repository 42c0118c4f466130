"""MoE layers in the ExecuTorch export: the dispatch swaps (export/nn/moe.py StackedExperts / StoredExperts, installed
by export/targets/executorch/swaps.py) against the eager model, the graph they export, and the export options.

Bit for bit. The swapped model must give the eager model's logits exactly: the ops' references compute each expert
with the same torch calls as the eager GatedMLP and accumulate in the same order. One caveat: on x86, torch's BLAS
(MKL) may round a single-row product differently depending on the weight's address modulo 64, and tensors read from
safetensors sit at arbitrary addresses, while the stacks are freshly allocated (64-byte aligned). The eager model is
therefore given 64-byte aligned copies of its weights first (`aligned`), which changes no value.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.load import load_model
from pocketllm.export.nn.moe import ANY4_STACKS, FLOAT_STACKS, StackedExperts, StoredExperts
from pocketllm.export.targets.executorch.swaps import moe_blocks, use_expert_store, use_stacked_experts
from tests.test_executorch_export import configs, make_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The export tests' SmallThinker (bf16-valued weights, 2 layers, NoPE global + SWA) and MiniMax (fp32 weights,
    lightning + softmax layers) configs."""
    root = tmp_path_factory.mktemp("moe")
    cfg = configs()
    return {"smallthinker": make_checkpoint(root / "st", cfg["smallthinker"], seed=21, bf16_values=True),
            "minimax": make_checkpoint(root / "mm", cfg["minimax"], seed=22)}


@pytest.fixture(scope="module")
def any4_checkpoint(checkpoints, tmp_path_factory) -> Path:
    from pocketllm.export.quant.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("moe-any4") / "st-any4"
    quantize_checkpoint(checkpoints["smallthinker"], out, "any4", group_size=16)
    return out


def aligned(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer replaced by a 64-byte aligned copy (see the module docstring)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.clone()
    return model


def run(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Logits of a cache-free pass, then a prefill + two decode steps through the KV cache."""
    with torch.no_grad():
        model.reset_cache()
        out = [model(tokens, None), model(tokens[:, :7], torch.tensor([0]))]
        out += [model(tokens[:, t:t + 1], torch.tensor([t])) for t in (7, 8)]
    return out


def swap(model, mode: str, out_dir: Path):
    if mode == "inline":
        return use_stacked_experts(model), None
    from pocketllm.export.ops.expert_store import register_store

    info, store = use_expert_store(model, out_dir, None)
    register_store(out_dir / store["file"])  # the eager references read the file
    return info, store


def swap_and_check_logits(checkpoint, mode: str, out_dir, seed: int):
    """Load `checkpoint` (fp32, aligned), swap its experts (`mode`), and check that the logits of 9 random tokens
    are bit for bit the eager model's. Returns (model, swap info, store info)."""
    model = aligned(load_model(checkpoint, max_context=64, dtype="fp32")[0])
    tokens = torch.randint(3, 500, (1, 9), generator=torch.Generator().manual_seed(seed))
    expected = run(model, tokens)
    info, store = swap(model, mode, out_dir)
    for got, want in zip(run(model, tokens), expected):
        assert torch.equal(got, want)
    return model, info, store


@pytest.mark.parametrize("mode", ["inline", "file"])
@pytest.mark.parametrize("family", ["smallthinker", "minimax"])
def test_swapped_model_equals_the_eager_model_bit_for_bit(checkpoints, tmp_path, family, mode):
    model, info, store = swap_and_check_logits(checkpoints[family], mode, tmp_path, seed=1)
    dtype = "bf16" if family == "smallthinker" else "fp32"  # bf16 storage only when every value is a bf16 number
    assert info["expert_dtype"] == [dtype] and info["all_experts_layers"] == []
    for _, moe in moe_blocks(model):
        assert len(moe.experts) == 0  # the per-expert modules (and their tensors) are gone
        if mode == "inline":
            assert isinstance(moe.dispatch, StackedExperts) and moe.dispatch.names == FLOAT_STACKS
            assert moe.dispatch.gate.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
            assert moe.dispatch.activation == ("reglu" if family == "smallthinker" else "swiglu")
        else:
            assert isinstance(moe.dispatch, StoredExperts)
            assert moe.dispatch.prefetch == (family == "smallthinker")  # only a pre-attention router prefetches
    if mode == "file":
        assert store["prefetch"] == ("pre_attention_router" if family == "smallthinker" else "none")
        assert (tmp_path / "experts.bin").stat().st_size == store["bytes"]


@pytest.mark.parametrize("mode", ["inline", "file"])
def test_any4_experts_keep_their_packed_tensors(any4_checkpoint, tmp_path, mode):
    """any4 experts: the checkpoint's packed tensors, stacked (LUTs carried as bf16: exact for `pocketllm quantize`'s
    grids) or written to the file; the model's logits are unchanged, exactly."""
    model, info, store = swap_and_check_logits(any4_checkpoint, mode, tmp_path, seed=2)
    assert info["expert_dtype"] == ["any4"]
    if mode == "inline":
        stacked = moe_blocks(model)[0][1].dispatch
        assert stacked.names == ANY4_STACKS and stacked.gate_lut.dtype == torch.bfloat16
        assert stacked.gate_qweight.shape == (4, 48, 32) and stacked.down_qweight.shape == (4, 64, 24)


def test_pre_attention_router_and_prefetch_precede_attention_in_the_graph(checkpoints, tmp_path):
    """SmallThinker's router and expert_store_prefetch come before the layer's attention in the exported program (the
    order ExecuTorch runs it), so the store loads experts while attention computes; MiniMax's router follows its
    attention and gets no prefetch."""
    from pocketllm.export.targets.executorch.lower import export_program
    from pocketllm.export.targets.executorch.swaps import use_llama_ops

    for family in ("smallthinker", "minimax"):
        model, _ = load_model(checkpoints[family], max_context=64, dtype="fp32")
        use_llama_ops(model)
        (tmp_path / family).mkdir()
        swap(model, "file", tmp_path / family)
        ops = [str(n.target) for n in export_program(model, 8).graph.nodes if n.op == "call_function"]
        attention = [i for i, op in enumerate(ops) if "update_cache" in op or "lightning_attention" in op]
        stored = [i for i, op in enumerate(ops) if "expert_store_moe_ffn" in op]
        prefetch = [i for i, op in enumerate(ops) if "expert_store_prefetch" in op]
        assert len(stored) == 2
        if family == "smallthinker":
            assert len(prefetch) == 2
            for layer in range(2):
                first_attention = min(i for i in attention if i > (stored[layer - 1] if layer else -1))
                assert prefetch[layer] < first_attention < stored[layer]
        else:
            assert prefetch == []


def test_moe_export_options_are_checked(tiny_dirs, checkpoints, tmp_path):
    from pocketllm.export.pipeline import ExportRequest, plan

    def request(ckpt, **kw):
        return plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "b", max_context=64, **kw))

    assert request(checkpoints["smallthinker"], expert_cache_mb=64).targets[0][1].experts == "file"
    assert request(checkpoints["smallthinker"]).targets[0][1].experts == "inline"
    for kw, message in ((dict(experts="file"), "--experts file: minicpm4_dense has no mixture-of-experts layers"),
                        (dict(expert_cache_mb=16), "--expert-cache-mb: minicpm4_dense has no mixture-of-experts")):
        with pytest.raises(PocketllmError, match=message):
            request(tiny_dirs["minicpm4_dense"], **kw)
    for kw, message in ((dict(experts="inline", expert_cache_mb=64), "use it with --experts file"),
                        (dict(expert_cache_mb=0), "--expert-cache-mb must be a positive number of MiB"),
                        (dict(experts="sparse"), "unknown --experts 'sparse'")):
        with pytest.raises(PocketllmError, match=message):
            request(checkpoints["smallthinker"], **kw)
