"""Bad input to `pocketllm quantize` and malformed quantized checkpoints: one clear line, exit code 2, no traceback,
nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from pocketllm.export.quant.quantize import quantize_checkpoint
from tests.test_checkpoint_errors import assert_one_line_error

runner = CliRunner()


def quantize(src, out, *extra):
    return runner.invoke(app, ["quantize", "--checkpoint", str(src), "--out", str(out), *extra])


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left


@pytest.fixture(scope="module")
def quantized_dir(tiny_dirs, tmp_path_factory):
    return quantize_checkpoint(tiny_dirs["minicpm4_dense"], tmp_path_factory.mktemp("q") / "int4", "int4", 32).out


@pytest.mark.parametrize("args,fragments", [
    (["--scheme", "fp3"], ["--scheme", "'fp3' is not one of 'any4', 'int4', 'nf4', 'int8'"]),
    (["--scheme", "any4", "--group-size", "48"], ["group size 48 does not divide the input width 64",
                                                 "model.layers.0.self_attn.q_proj.weight"]),
    (["--scheme", "any4", "--group-size", "-4"], ["--group-size must be 0", "-4"]),
    (["--scheme", "int8", "--group-size", "32"], ["int8 is per output channel"]),
    (["--scheme", "any4", "--group-size", "32", "--calibration", "no/such/file.txt"],
     ["no/such/file.txt", "calibration file not found"]),
    (["--scheme", "any4", "--group-size", "32", "--act-stat", "median"],
     ["--act-stat", "'median' is not one of 'abs_mean', 'mean_abs', 'rms'"]),
])
def test_bad_options(tiny_dirs, tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_one_line_error(quantize(tiny_dirs["minicpm4_dense"], out, *args), *fragments)
    assert_nothing_written(out)


def test_empty_calibration_file(tiny_dirs, tmp_path):
    empty = tmp_path / "calib.txt"
    empty.write_text("  \n\n")
    out = tmp_path / "out"
    result = quantize(tiny_dirs["minicpm4_dense"], out, "--scheme", "any4", "--group-size", "32",
                      "--calibration", str(empty))
    assert_one_line_error(result, "calib.txt", "calibration file is empty")
    assert_nothing_written(out)


def test_calibration_file_and_literal_text(tiny_dirs, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune.\n")
    for value, source in ((str(text), "file:calib.txt"), ("Some literal calibration text, 1 2 3.", "text")):
        out = tmp_path / source.replace(":", "_")
        result = quantize(tiny_dirs["minicpm4_dense"], out, "--scheme", "int4", "--group-size", "32",
                          "--calibration", value)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["source"] == source


def test_already_quantized_input(quantized_dir, tmp_path):
    out = tmp_path / "again"
    assert_one_line_error(quantize(quantized_dir, out, "--scheme", "any4", "--group-size", "32"),
                          "already quantized", "int4")
    assert_nothing_written(out)


def test_existing_output_is_not_replaced(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line_error(quantize(tiny_dirs["minicpm4_dense"], out, "--scheme", "int8"), "already exists",
                          "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_tied_lm_head_cannot_be_quantized(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(quantize(tiny_dirs["minicpm4_dense"], out, "--scheme", "int8", "--quantize-lm-head"),
                          "ties lm_head")
    assert_nothing_written(out)


# ------------------------------------------------------------------------ malformed quantized checkpoints
def copy_of(src, tmp_path):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def edit_qconfig(d, change):
    cfg = json.loads((d / "config.json").read_text())
    change(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def edit_tensors(d, change):
    t = load_file(str(d / "model.safetensors"))
    change(t)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def run_logits(d, tmp_path):
    out = tmp_path / "logits.npy"
    result = runner.invoke(app, ["logits", "--checkpoint", str(d), "--tokens", "1,2,3", "--out", str(out)])
    assert not out.exists()
    return result


M = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("name,breaker,fragments", [
    ("missing scales", lambda d: edit_tensors(d, lambda t: t.pop(f"{M}.scales")),
     [f"missing tensor '{M}.scales'", "[160, 2]"]),
    ("wrong dtype", lambda d: edit_tensors(d, lambda t: t.__setitem__(f"{M}.qweight",
                                                                       t[f"{M}.qweight"].astype(np.int8))),
     [f"'{M}.qweight'", "dtype I8", "expected U8"]),
    ("wrong shape", lambda d: edit_tensors(d, lambda t: t.__setitem__(f"{M}.zeros", t[f"{M}.zeros"][:, :1])),
     [f"'{M}.zeros'", "shape [160, 1]", "expected [160, 2]"]),
    ("float weight left in", lambda d: edit_tensors(d, lambda t: t.__setitem__(
        f"{M}.weight", np.zeros((160, 64), np.float32))), [f"unexpected tensor '{M}.weight'"]),
    ("unknown scheme", lambda d: edit_qconfig(d, lambda q: q["modules"][M].__setitem__("scheme", "int3")),
     ["unknown quantization scheme 'int3'", M]),
    ("group not dividing", lambda d: edit_qconfig(d, lambda q: q["modules"][M].__setitem__("group_size", 48)),
     ["group size 48 does not divide the input width 64"]),
    ("foreign method", lambda d: edit_qconfig(d, lambda q: q.__setitem__("quant_method", "gptq")),
     ["quant_method 'gptq' is not supported"]),
    ("unknown module", lambda d: edit_qconfig(d, lambda q: q["modules"].__setitem__(
        "model.layers.9.mlp.up_proj", {"scheme": "int4", "group_size": 32})), ["'model.layers.9.mlp.up_proj'",
                                                                                "no weight"]),
    ("bad version", lambda d: edit_qconfig(d, lambda q: q.__setitem__("format_version", 7)),
     ["format_version must be 1"]),
])
def test_malformed_quantized_checkpoint(quantized_dir, tmp_path, name, breaker, fragments):
    d = copy_of(quantized_dir, tmp_path)
    breaker(d)
    assert_one_line_error(run_logits(d, tmp_path), *fragments)
