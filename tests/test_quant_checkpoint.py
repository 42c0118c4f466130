"""Quantized checkpoints end to end: `pocketllm quantize` output is read by the torch model and the numpy reference,
which agree (any4 dequantization bit for bit; logits within 1e-4), and `logits` / `generate` accept it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.cli.engines import make_engine
from pocketllm.export.cli.main import app
from pocketllm.runtime_py.evaluate import run_logits
from pocketllm.export.nn.quant_linear import Any4Linear, Int4Linear, Int8Linear
from pocketllm.export.ops.any4_linear import any4_dequantize
from pocketllm.export.quant.quantize import REPORT_FILE, quantize_checkpoint
from pocketllm.runtime_py.quant import quantized_weight_loader

runner = CliRunner()
# tiny minicpm4: input widths 64 and 160 (group 32 divides both); tiny smallthinker: 64, 96, 48 (group 16)
VARIANTS = {
    "any4_g32": ("minicpm4_dense", "any4", 32, False),
    "any4_row": ("minicpm4_sparse", "any4", 0, False),
    "int4_g32": ("minicpm4_dense", "int4", 32, False),
    "nf4_g32": ("minicpm4_dense", "nf4", 32, False),
    "int8": ("minicpm4_dense", "int8", None, False),
    "any4_moe_head": ("smallthinker_sigmoid", "any4", 16, True),
}


@pytest.fixture(scope="session")
def quantized(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(key):
        if key not in cache:
            base, scheme, g, head = VARIANTS[key]
            cache[key] = quantize_checkpoint(tiny_dirs[base], root / key, scheme, g, quantize_lm_head=head).out
        return cache[key]

    return get


def test_cli_writes_config_report_and_packed_tensors(tiny_dirs, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--scheme", "any4",
                                 "--group-size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "bits/w" in result.output and "relative error" in result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "pocketllm" and qc["scheme"] == "any4" and qc["group_size"] == 32
    assert qc["calibration"]["source"] == "builtin" and qc["calibration"]["tokens"] > 20
    assert len(qc["modules"]) == 2 * 7  # every Linear of both layers; embeddings (tied head) kept
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["tensors"]) == 14 and all(0 < t["rel_error"] < 0.2 for t in report["tensors"])
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (64, 80)
        assert f.get_tensor("model.layers.0.mlp.down_proj.lut").dtype == np.float16
    assert "model.layers.0.mlp.down_proj.weight" not in names and "model.embed_tokens.weight" in names
    assert (out / "tokenizer.json").is_file()


def test_any4_dequantization_bit_exact_torch_vs_numpy(quantized):
    for key in ("any4_g32", "any4_row"):
        ckpt = open_checkpoint(quantized(key))
        reference = quantized_weight_loader(ckpt.quantization)(ckpt.dir, ckpt.weight_map)
        with safe_open(ckpt.dir / "model.safetensors", framework="pt") as f:
            for module, quant in ckpt.quantization.modules.items():
                K = ckpt.quantization.shapes[module][1]
                t = {s: f.get_tensor(f"{module}.{s}") for s in ("qweight", "lut", "scales", "zeros")}
                ours = any4_dequantize(t["qweight"], t["lut"], t["scales"], t["zeros"], quant.group(K)).numpy()
                theirs = reference[f"{module}.weight"]
                assert ours.dtype == theirs.dtype == np.float32
                assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), module


@pytest.mark.parametrize("key", list(VARIANTS))
def test_torch_and_reference_logits_agree(quantized, key):
    ckpt = open_checkpoint(quantized(key))
    kinds = {Any4Linear: "any4", Int4Linear: ("int4", "nf4"), Int8Linear: "int8"}
    torch_engine = make_engine("torch", ckpt, 96, "fp32")
    layers = [m for m in torch_engine.model.modules() if type(m) in kinds]
    assert len(layers) == len(ckpt.quantization.modules)
    ref_engine = make_engine("reference", ckpt, 96)
    ids = np.random.default_rng(0).integers(3, ckpt.spec.vocab_size, size=72).tolist()
    for mode, n in (("prefill", 72), ("decode", 24)):
        a, b = run_logits(torch_engine, ids[:n], mode), run_logits(ref_engine, ids[:n], mode)
        assert np.abs(a - b).max() <= 1e-4, (key, mode, np.abs(a - b).max())


def test_quantized_stays_close_to_fp32(quantized, tiny_dirs):
    ids = np.random.default_rng(1).integers(3, 512, size=48).tolist()
    base = run_logits(make_engine("torch", open_checkpoint(tiny_dirs["minicpm4_dense"]), 64, "fp32"), ids, "prefill")
    errors = {}
    for key in ("int8", "any4_g32", "int4_g32"):
        q = run_logits(make_engine("torch", open_checkpoint(quantized(key)), 64, "fp32"), ids, "prefill")
        errors[key] = float(np.abs(q - base).mean())
    assert errors["int8"] < 0.2 * errors["any4_g32"]  # 8 bits is far closer than 4
    assert errors["any4_g32"] < 0.3 * np.abs(base).mean()


def test_logits_and_generate_commands_accept_quantized(quantized, tmp_path):
    d = quantized("any4_g32")
    out = tmp_path / "l.npy"
    for engine in ("torch", "reference"):
        r = runner.invoke(app, ["logits", "--checkpoint", str(d), "--tokens", "1,5,9", "--engine", engine,
                                "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert np.load(out).shape == (3, 512)
    r = runner.invoke(app, ["generate", "--checkpoint", str(d), "--prompt", "The quick", "--greedy",
                            "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert "tokens/s" in r.output
