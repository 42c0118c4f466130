"""Every registered family passes the same checks: its tiny preset is written in the upstream layout and read back,
our torch model equals the independent numpy reference (fp32 and any4-quantized, prefill, chunked prefill and
decode, greedy continuations), and every part a family needs exists (numpy model, ExecuTorch parity config)."""

from __future__ import annotations

import numpy as np
import pytest

from pocketllm.export.checkpoint import expected_tensors, open_checkpoint
from pocketllm.export.cli.engines import make_engine
from pocketllm.export.families import families, spec_from_config
from pocketllm.export.init_checkpoint import init_checkpoint
from pocketllm.runtime_py.evaluate import run_logits
from pocketllm.runtime_py.families import reference_families
from pocketllm.runtime_py.generate import generate

FAMILIES = list(families())
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    return {name: init_checkpoint(name, "tiny", root / name, seed=7, dtype="fp32") for name in FAMILIES}


@pytest.fixture(scope="module")
def tiny_any4(tiny, tmp_path_factory):
    from pocketllm.export.quant.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("conformance-any4")
    out = {}
    for name, directory in tiny.items():
        quantize_checkpoint(directory, root / name, "any4", group_size=16)
        out[name] = root / name
    return out


def ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_declares_every_part(family):
    f = families()[family]
    assert "tiny" in f.presets
    assert family in reference_families(), f"runtime_py/families/{family}.py is missing"
    spec = spec_from_config(f.presets["tiny"]())
    assert spec.family == family
    assert f.tokenizer.eos in f.tokenizer.specials
    if spec.moe is not None:
        assert f.moe_names is not None


def test_every_family_is_exported_to_executorch_in_tests():
    from tests.test_executorch_export import configs

    exported = {spec_from_config(cfg).family for cfg in configs().values()}
    assert exported == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_round_trip(tiny, family):
    ckpt = open_checkpoint(tiny[family])
    assert ckpt.spec.family == family
    assert set(ckpt.weight_map) == set(expected_tensors(ckpt.spec))


@pytest.mark.parametrize("weights", ["fp32", "any4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_equals_reference(tiny, tiny_any4, family, weights):
    """Prefill (one call), chunked prefill and decode: max |delta logit| <= 1e-4; 24 greedy tokens identical."""
    directory = tiny[family] if weights == "fp32" else tiny_any4[family]
    ckpt = open_checkpoint(directory)
    torch_engine = make_engine("torch", ckpt, 256, "fp32")
    ref_engine = make_engine("reference", ckpt, 256)
    prompt = ids(100, ckpt.spec.vocab_size)
    for mode in ("prefill", "decode"):
        a, b = run_logits(torch_engine, prompt, mode), run_logits(ref_engine, prompt, mode)
        assert np.abs(a - b).max() <= 1e-4, mode
    for engine in (torch_engine, ref_engine):
        engine.reset()
    chunks = [(0, 37), (37, 80), (80, 100)]
    a = np.concatenate([torch_engine.forward(np.asarray(prompt[s:e]), s) for s, e in chunks])
    b = np.concatenate([ref_engine.forward(np.asarray(prompt[s:e]), s) for s, e in chunks])
    assert np.abs(a - b).max() <= 1e-4
    runs = [generate(e, prompt[:20], 24, greedy=True).tokens for e in (torch_engine, ref_engine)]
    assert runs[0] == runs[1]
