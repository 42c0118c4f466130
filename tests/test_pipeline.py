"""export/pipeline.py: arguments reach the targets (every option, every target), checked before any weight is read."""

from __future__ import annotations

import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.pipeline import ExportRequest, plan


def test_group_size_reaches_8da4w(tiny_dirs, tmp_path):
    """`--quant 8da4w --group-size N` quantizes with groups of N (it used to be dropped on the way)."""
    from pocketllm.export.nn import load_model
    from pocketllm.export.targets.executorch.swaps import quantize_torchao

    p = plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant="8da4w", group_size=32))
    (target, options), = p.targets
    assert target.name == "executorch" and options.group_size == 32
    model, _ = load_model(p.ckpt, max_context=64, dtype="fp32")
    report = quantize_torchao(model, options.group_size)
    assert report["group_size"] == 32
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]]), 0)).all()


def test_8da4w_is_executorch_only(tiny_dirs, tmp_path, monkeypatch):
    import pocketllm.export.targets as registry
    from pocketllm.export.targets.base import Target

    other = type("Other", (Target,), {"name": "other", "quant_schemes": ("none", "8da4w")})()
    real = registry.get_target
    monkeypatch.setattr(registry, "get_target", lambda name: other if name == "other" else real(name))
    with pytest.raises(PocketllmError, match="8da4w is ExecuTorch's in-graph scheme"):
        plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant="8da4w",
                           targets="executorch,other"))


def test_a_target_named_twice_is_refused(tiny_dirs, tmp_path):
    with pytest.raises(PocketllmError, match="names a target twice"):
        plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b",
                           targets="executorch,executorch"))


def test_quantize_lm_head_flag_reaches_the_quantizer(tiny_dirs, tmp_path, monkeypatch):
    """`pocketllm export --quantize-lm-head` (the issue's name, beside --lm-head SCHEME): the tied head/table in the
    layers' scheme (any4-w4a8: any4), checked in plan() and passed to quantize_checkpoint."""
    from typer.testing import CliRunner

    import pocketllm.export.quant.quantize as quantize_mod
    from pocketllm.export.cli.main import app
    from pocketllm.export.quant.recipe import resolve_head

    assert resolve_head("auto", "auto", "any4", True, quantize_lm_head=True) == ("any4", "any4")
    seen = {}

    class Stop(Exception):
        pass

    def fake(ckpt, out, scheme, **kw):
        seen.update(kw, scheme=scheme)
        raise Stop

    monkeypatch.setattr(quantize_mod, "quantize_checkpoint", fake)
    for quant in ("any4", "any4-w4a8"):
        seen.clear()
        result = CliRunner().invoke(app, ["export", "--checkpoint", str(tiny_dirs["minicpm4_dense"]), "--quant", quant,
                                          "--group-size", "32", "--quantize-lm-head", "--out", str(tmp_path / quant)])
        assert isinstance(result.exception, Stop), result.output
        assert seen["scheme"] == "any4" and seen["quantize_lm_head"] is True and seen["lm_head"] == "auto"
    with pytest.raises(PocketllmError, match="--quantize-lm-head means --lm-head any4; it contradicts --lm-head int8"):
        plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant="any4",
                           quantize_lm_head=True, lm_head="int8"))
    with pytest.raises(PocketllmError, match="need a quantizing --quant"):
        plan(ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant="8da4w",
                           quantize_lm_head=True))


def test_coreml_keeps_the_head_in_floating_point(tiny_dirs, tmp_path):
    """Core ML's package holds no quantized LM head: "auto" means none there; an explicit quantized head is refused
    before any weight is read."""
    from pocketllm.export.pipeline import head_choice
    from pocketllm.export.targets import get_target

    req = ExportRequest(checkpoint=tiny_dirs["minicpm4_dense"], out=tmp_path / "b", quant="any4", group_size=32,
                        targets="coreml")
    assert head_choice(req, [get_target("coreml")]) == ("none", "none", False)
    assert head_choice(req, [get_target("executorch")]) == ("auto", "auto", False)
    for extra in ({"quantize_lm_head": True}, {"lm_head": "int8"}):
        with pytest.raises(PocketllmError, match="keeps the LM head and the embedding table in floating point"):
            head_choice(ExportRequest(**{**req.__dict__, **extra}), [get_target("coreml")])
