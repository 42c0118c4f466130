"""Bad checkpoints get one clear line naming the file, key or tensor; exit code 2; no traceback; nothing written."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from pocketllm.export.init_checkpoint import init_checkpoint
from tests.conftest import edit_config

runner = CliRunner()


def run_logits(ckpt, out):
    return runner.invoke(app, ["logits", "--checkpoint", str(ckpt), "--tokens", "1,2,3", "--out", str(out)])


def assert_one_line_error(result, *fragments):
    text = result.output
    assert result.exit_code == 2, text
    assert "Traceback" not in text
    lines = [l for l in text.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def rewrite_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out" / "logits.npy"


def assert_nothing_written(out):
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_good_checkpoint_writes_logits(tiny_copy, out):
    result = run_logits(tiny_copy(), out)
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (3, 512)


def test_missing_config(tiny_copy, out):
    d = tiny_copy()
    (d / "config.json").unlink()
    assert_one_line_error(run_logits(d, out), "config.json", "not found")
    assert_nothing_written(out)


def test_unknown_model_type(tiny_copy, out):
    d = edit_config(tiny_copy(), model_type="gpt7")
    assert_one_line_error(run_logits(d, out), "config.json", "unknown model_type 'gpt7'")
    assert_nothing_written(out)


def test_missing_config_key(tiny_copy, out):
    d = edit_config(tiny_copy(), hidden_size=None)
    assert_one_line_error(run_logits(d, out), "config.json", "'hidden_size'", "missing")
    assert_nothing_written(out)


def test_ill_typed_config_key(tiny_copy, out):
    d = edit_config(tiny_copy(), num_attention_heads="4")
    assert_one_line_error(run_logits(d, out), "'num_attention_heads'", "positive integer", "'4'")
    assert_nothing_written(out)


def test_ill_typed_layout_array(tiny_copy, out):
    d = edit_config(tiny_copy("smallthinker_sigmoid"), rope_layout=[1, 1])
    assert_one_line_error(run_logits(d, out), "'rope_layout'", "a list of 4 entries")
    assert_nothing_written(out)


def test_missing_shard(tmp_path, out):
    d = init_checkpoint("minicpm4", "tiny", tmp_path / "sharded", dtype="fp32", shard_bytes=100_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (d / shards[1]).unlink()
    assert_one_line_error(run_logits(d, out), shards[1], "shard not found")
    assert_nothing_written(out)


def test_missing_tensor(tiny_copy, out):
    d = tiny_copy()
    rewrite_tensors(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_one_line_error(run_logits(d, out), "missing tensor 'model.layers.1.mlp.up_proj.weight'", "[160, 64]")
    assert_nothing_written(out)


def test_tensor_shape_mismatch(tiny_copy, out):
    d = tiny_copy()

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    rewrite_tensors(d / "model.safetensors", shrink)
    assert_one_line_error(run_logits(d, out), "'model.layers.0.self_attn.k_proj.weight'", "shape [16, 64]",
                          "expected [32, 64]")
    assert_nothing_written(out)


def test_non_finite_weights(tiny_copy, out):
    d = tiny_copy()

    def poison(t):
        t["model.norm.weight"][3] = np.nan

    rewrite_tensors(d / "model.safetensors", poison)
    for engine in ("torch", "reference"):
        result = runner.invoke(app, ["logits", "--checkpoint", str(d), "--tokens", "1,2", "--engine", engine,
                                     "--out", str(out)])
        assert_one_line_error(result, "'model.norm.weight'", "non-finite")
        assert_nothing_written(out)


def test_truncated_safetensors(tiny_copy, out):
    d = tiny_copy()
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_logits(d, out), "model.safetensors", "truncated")
    assert_nothing_written(out)


def test_corrupt_safetensors_header(tiny_copy, out):
    d = tiny_copy()
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"\x00" * n
    path.write_bytes(bytes(data))
    assert_one_line_error(run_logits(d, out), "model.safetensors", "corrupt")
    assert_nothing_written(out)


def test_unexpected_tensor_is_rejected(tiny_copy, out):
    d = tiny_copy()
    rewrite_tensors(d / "model.safetensors",
                    lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros((2, 2), np.float32)))
    assert_one_line_error(run_logits(d, out), "unexpected tensor 'model.layers.0.mlp.extra.weight'")


def test_token_outside_vocab(tiny_copy, out):
    result = runner.invoke(app, ["logits", "--checkpoint", str(tiny_copy()), "--tokens", "1,99999", "--out", str(out)])
    assert_one_line_error(result, "99999", "outside the vocabulary")
    assert_nothing_written(out)
