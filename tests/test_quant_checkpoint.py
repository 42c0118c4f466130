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
from pocketllm.export.nn.quant_linear import Any4Linear, Int4Linear, Int8Linear, QuantEmbedding, dequantize_packed
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
    # every Linear of both layers, and the tied LM head = the embedding table, in 8 bits per channel (the default)
    assert len(qc["modules"]) == 2 * 7 + 1
    assert qc["modules"]["model.embed_tokens"] == {"scheme": "int8", "group_size": 0} and "lm_head" not in qc["modules"]
    report = json.loads((out / REPORT_FILE).read_text())
    assert len(report["tensors"]) == 15 and all(0 < t["rel_error"] < 0.2 for t in report["tensors"])
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").shape == (64, 80)
        assert f.get_tensor("model.layers.0.mlp.down_proj.lut").dtype == np.float16
        assert f.get_tensor("model.embed_tokens.qweight").dtype == np.int8
    assert "model.layers.0.mlp.down_proj.weight" not in names and "model.embed_tokens.weight" not in names
    assert "lm_head.qweight" not in names  # tied: stored once
    assert (out / "tokenizer.json").is_file()


def test_cli_lm_head_none_keeps_the_table_in_floating_point(tiny_dirs, tmp_path):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--scheme", "int4",
                                 "--group-size", "32", "--lm-head", "none", "--out", str(out)])
    assert result.exit_code == 0, result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["modules"]) == 2 * 7 and "model.embed_tokens" not in qc["modules"]


HEAD_VARIANTS = {  # (base, lm_head, embedding) -> (lm_head scheme or None, embedding scheme or None)
    "tied_int8": ("minicpm4_dense", "auto", "auto"),
    "tied_any4": ("minicpm4_dense", "any4", "auto"),
    "untied_any4_head_int8_emb": ("smallthinker_sigmoid", "any4", "int8"),
    "untied_default": ("smallthinker_sigmoid", "auto", "auto"),
}


@pytest.fixture(scope="module")
def head_variants(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for key, (base, head, emb) in HEAD_VARIANTS.items():
        g = 32 if base.startswith("minicpm4") else 16
        out[key] = quantize_checkpoint(tiny_dirs[base], root / key, "any4", g, lm_head=head, embedding=emb).out
    return out


def test_head_and_embedding_choices_in_the_config(head_variants):
    expect = {"tied_int8": ("int8", None), "tied_any4": ("any4", None),
              "untied_any4_head_int8_emb": ("int8", "any4"), "untied_default": ("int8", "int8")}
    for key, (emb, head) in expect.items():
        q = open_checkpoint(head_variants[key]).quantization
        assert q.modules["model.embed_tokens"].scheme == emb, key
        assert (q.modules["lm_head"].scheme if "lm_head" in q.modules else None) == head, key
        assert q.scheme == "any4"  # the headline stays the decoder layers' scheme


@pytest.mark.parametrize("key", list(HEAD_VARIANTS))
def test_packed_embedding_gathers_the_reference_rows_bit_for_bit(head_variants, key):
    """QuantEmbedding dequantizes the gathered rows exactly as the reference dequantizes the whole table, and a tied
    head multiplies by that same table (one tensor)."""
    import torch

    from pocketllm.export.nn.load import load_model
    from pocketllm.export.nn.quant_linear import QuantEmbedding

    ckpt = open_checkpoint(head_variants[key])
    model, _ = load_model(ckpt, max_context=32, dtype="fp32")
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding)
    table = quantized_weight_loader(ckpt.quantization)(ckpt.dir, ckpt.weight_map)["model.embed_tokens.weight"]
    tokens = torch.tensor([[0, 7, 3, ckpt.spec.vocab_size - 1, 7]])
    rows = emb(tokens)[0].numpy()
    assert rows.dtype == np.float32 and np.array_equal(rows.view(np.uint32), table[tokens[0].numpy()].view(np.uint32))
    if ckpt.spec.tie_word_embeddings:
        assert model.lm_head is None and not any(n.startswith("lm_head") for n in model.state_dict())
        h = torch.randn(3, ckpt.spec.hidden_size)
        np.testing.assert_allclose(model.head(h).numpy(), h.numpy() @ table.T, rtol=1e-5, atol=1e-5)


def test_any4_dequantization_bit_exact_torch_vs_numpy(quantized):
    for key in ("any4_g32", "any4_row"):
        ckpt = open_checkpoint(quantized(key))
        reference = quantized_weight_loader(ckpt.quantization)(ckpt.dir, ckpt.weight_map)
        with safe_open(ckpt.dir / "model.safetensors", framework="pt") as f:
            for module, quant in ckpt.quantization.modules.items():
                K = ckpt.quantization.shapes[module][1]
                t = {s: f.get_tensor(f"{module}.{s}") for s in quant.packed(*ckpt.quantization.shapes[module])}
                ours = dequantize_packed(quant, t, K).numpy()  # any4 layers, the int8 table (tied head)
                theirs = reference[f"{module}.weight"]
                assert ours.dtype == theirs.dtype == np.float32
                assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), module


@pytest.mark.parametrize("key", list(VARIANTS))
def test_torch_and_reference_logits_agree(quantized, key):
    ckpt = open_checkpoint(quantized(key))
    kinds = {Any4Linear: "any4", Int4Linear: ("int4", "nf4"), Int8Linear: "int8", QuantEmbedding: "table"}
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
