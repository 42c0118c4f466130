"""Quantization options agree between `quantize` and `export`: nf4 exports (with the one-line warning every in-graph
dequantizing scheme gets), a group size that does not fit comes with one that does, and both commands take
`--calibration` as text or a path."""

from __future__ import annotations

import re

import pytest

from pocketllm.export.errors import PocketllmError
from pocketllm.export.pipeline import ExportRequest, plan
from tests.cli.conftest import assert_one_line_error, invoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_nf4_exports_with_a_one_line_speed_warning(nf4_bundle):
    stderr = nf4_bundle[2]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: nf4 weights: ExecuTorch dequantizes them inside the graph on every call (portable "
                        "kernels): correct, but decoding is many times slower than fp32 (~40x on tiny-austen); any4 "
                        "(pocketllm's kernel) or 8da4w (XNNPACK) are the fast 4-bit choices"]


@pytest.mark.parametrize("quant,warned", [("int4", True), ("int8", True), ("nf4", True), ("any4", False),
                                          ("none", False)])
def test_which_schemes_warn(tiny_dirs, tmp_path, quant, warned):
    p = plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant=quant,
                           group_size=None if quant in ("int8", "none") else 32))
    assert bool(p.warnings) == warned and all("\n" not in w for w in p.warnings)


def test_a_quantized_checkpoint_exports_with_its_own_scheme(tiny_dirs, tmp_path):
    q = tmp_path / "nf4"
    assert invoke("quantize", "--checkpoint", tiny_dirs["minicpm4_dense"], "--scheme", "nf4", "--group-size", 32,
                  "--out", q).exit_code == 0
    r = invoke("export", "--checkpoint", q, "--quant", "int4", "--out", tmp_path / "b")
    assert_one_line_error(r, "already quantized with nf4; export it with --quant nf4")
    assert plan(ExportRequest(checkpoint=q, out=tmp_path / "b", quant="nf4")).targets[0][1].quant == "nf4"


@pytest.mark.parametrize("command", ["quantize", "export"])
def test_default_group_size_on_a_tiny_model_suggests_one_that_works(tiny_dirs, tmp_path, command):
    ckpt = tiny_dirs["minicpm4_dense"]
    out = tmp_path / "out"
    args = ["--scheme", "any4"] if command == "quantize" else ["--quant", "any4"]
    r = invoke(command, "--checkpoint", ckpt, *args, "--out", out)
    assert_one_line_error(r, "group size 128 does not divide the input width 64", "divides every quantized width")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    suggested = re.search(r"--group-size (\d+) divides", r.output).group(1)
    if command == "quantize":  # the suggestion works
        r = invoke("quantize", "--checkpoint", ckpt, "--scheme", "any4", "--group-size", suggested, "--out", out)
        assert r.exit_code == 0, r.output
    else:
        plan(ExportRequest(checkpoint=ckpt, out=out, quant="any4", group_size=int(suggested)))


def test_export_calibration_takes_text_or_a_path_like_quantize(tiny_dirs, tmp_path):
    ckpt = tiny_dirs["minicpm4_dense"]
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration prose, code and numbers: 1 + 2 = 3.\n")
    for value in ("Literal calibration text, 1 2 3.", str(calib)):
        plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "b", quant="any4", group_size=32, calibration=value))
    for command, quant in (("export", "--quant"), ("quantize", "--scheme")):
        r = invoke(command, "--checkpoint", ckpt, quant, "any4", "--group-size", 32, "--calibration",
                   "no/such/file.txt", "--out", tmp_path / "o")
        assert_one_line_error(r, "no/such/file.txt: calibration file not found")
    with pytest.raises(PocketllmError, match="is a directory, not a calibration file"):
        plan(ExportRequest(checkpoint=ckpt, out=tmp_path / "b", quant="any4", group_size=32, calibration=tmp_path))
