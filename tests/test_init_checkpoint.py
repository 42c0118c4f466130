"""`pocketllm init-checkpoint` writes the exact upstream layout, atomically, for every preset."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from pocketllm.export.checkpoint import expected_tensors, open_checkpoint
from pocketllm.export.cli.main import app
from pocketllm.export.init_checkpoint import init_checkpoint
from pocketllm.export.families import families, preset_config
from pocketllm.export.families import spec_from_config

runner = CliRunner()


@pytest.mark.parametrize("arch", list(families()))
def test_tiny_preset_layout(tmp_path, arch):
    out = tmp_path / arch
    result = runner.invoke(app, ["init-checkpoint", "--arch", arch, "--preset", "tiny", "--out", str(out),
                                 "--seed", "3", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    family = families()[arch]
    # what upstream ships: a SentencePiece model (+ tokenizer.json, added tokens) or byte-level BPE files
    tokenizer_files = {"sentencepiece": ["added_tokens.json", "tokenizer.json", "tokenizer.model"],
                       "bpe": ["merges.txt", "tokenizer.json", "vocab.json"]}[family.tokenizer.kind]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json", *tokenizer_files])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == list(family.architectures)
    ckpt = open_checkpoint(out)
    assert set(ckpt.weight_map) == set(expected_tensors(ckpt.spec))
    assert set(ckpt.dtypes.values()) == {"F32"}
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"


def test_seed_makes_weights_reproducible(tmp_path):
    a = init_checkpoint("smallthinker", "tiny", tmp_path / "a", seed=7, dtype="bf16")
    b = init_checkpoint("smallthinker", "tiny", tmp_path / "b", seed=7, dtype="bf16")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert open_checkpoint(a).weight_dtype == "BF16"


def test_sharded_layout_has_index(tmp_path):
    d = init_checkpoint("minicpm4", "tiny", tmp_path / "s", dtype="fp32", shard_bytes=150_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(d / shard, framework="pt") as f:
            assert {n for n, s in index["weight_map"].items() if s == shard} == set(f.keys())
    assert index["metadata"]["total_size"] > 0


def test_refuses_to_overwrite_and_force_replaces(tmp_path):
    out = tmp_path / "m"
    init_checkpoint("minicpm4", "tiny", out, dtype="fp32")
    result = runner.invoke(app, ["init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", str(out),
                                 "--force", "--dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert open_checkpoint(out).weight_dtype == "BF16"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import pocketllm.export.init_checkpoint as ic

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ic, "write_weights", boom)
    with pytest.raises(OSError):
        ic.init_checkpoint("minicpm4", "tiny", tmp_path / "m", dtype="fp32")
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_is_one_line(tmp_path):
    result = runner.invoke(app, ["init-checkpoint", "--arch", "minicpm4", "--preset", "huge", "--out",
                                 str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "unknown --preset 'huge'" in result.output and "0.5b" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch,preset", [(a, p) for a, f in families().items() for p in f.presets if p != "tiny"])
def test_real_presets_match_published_shapes(arch, preset):
    """Real-size presets parse and have the parameter counts the model cards state (no weights are written)."""
    spec = spec_from_config(preset_config(arch, preset))
    total = sum(_numel(s) for s in expected_tensors(spec).values())
    billions = {"0.5b": (0.40, 0.60), "8b": (7.5, 8.6), "4b-a0.6b": (3.8, 4.4), "21b-a3b": (20.5, 22.5)}[preset]
    assert billions[0] <= total / 1e9 <= billions[1], total


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
