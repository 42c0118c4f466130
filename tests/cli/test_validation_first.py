"""The CLI's rule (export/cli/common.py): every command checks its arguments before any model is loaded.

Every way of loading a model or reading or writing weights is made to fail loudly; then each command runs with
one bad argument that only the command's own checks (not typer) can catch. Each must answer with its one-line
error and exit code 2, having touched no loader."""

from __future__ import annotations

import pytest

from tests.cli.conftest import assert_one_line_error, invoke
from tests.conftest import TINY_AUSTEN


@pytest.fixture
def loaders_forbidden(monkeypatch):
    """Patch every model loader / weight reader / runner constructor to record the call and raise."""
    import pocketllm.export.checkpoint as checkpoint
    import pocketllm.export.checkpoint_writer as writer
    import pocketllm.export.cli.engines as engines
    import pocketllm.export.nn as nn
    import pocketllm.export.nn.load as nn_load
    import pocketllm.runtime_py.runners as runners
    from pocketllm.runtime_py.model import ReferenceModel

    calls = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise RuntimeError(f"{name} was called before the arguments were checked")
        return fail

    monkeypatch.setattr(engines.TorchEngine, "__init__", forbidden("TorchEngine"))
    monkeypatch.setattr(ReferenceModel, "from_checkpoint", classmethod(forbidden("ReferenceModel.from_checkpoint")))
    monkeypatch.setattr(runners, "open_runner", forbidden("open_runner"))
    monkeypatch.setattr(nn_load, "load_model", forbidden("load_model"))
    monkeypatch.setattr(nn, "load_model", forbidden("load_model"))
    monkeypatch.setattr(checkpoint.Checkpoint, "iter_tensors", forbidden("Checkpoint.iter_tensors"))
    monkeypatch.setattr(writer, "write_weights", forbidden("write_weights"))
    return calls


def bad_arguments(tmp_path, bundle):
    """command -> (arguments with exactly one mistake, fragment of the expected error)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    ckpt = TINY_AUSTEN
    return {
        "init-checkpoint": (["init-checkpoint", "--arch", "minicpm4", "--preset", "huge", "--out", tmp_path / "c"],
                            "huge"),
        "init-checkpoint --force": (["init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", afile,
                                     "--force"], "is a file"),
        "logits": (["logits", "--checkpoint", ckpt, "--tokens", "1,2,999999", "--out", tmp_path / "l.npy"],
                   "outside the vocabulary"),
        "logits --dtype": (["logits", "--engine", "reference", "--dtype", "bf16", "--checkpoint", ckpt, "--tokens",
                            "1", "--out", tmp_path / "l.npy"], "applies to the torch engine only"),
        "generate": (["generate", "--checkpoint", ckpt, "--prompt", "x", "--temperature", "0"],
                     "--temperature must be greater than 0"),
        "generate --max-context": (["generate", "--checkpoint", ckpt, "--prompt", "x", "--max-context", "99999"],
                                   "exceeds the model's max_position_embeddings"),
        "generate bundle": (["generate", "--engine", "executorch", "--bundle", bundle, "--prompt", "x",
                             "--max-new-tokens", "500"], "more than the bundle's context"),
        "perplexity": (["perplexity", "--checkpoint", ckpt, "--text", empty], "the text file is empty"),
        "perplexity --context": (["perplexity", "--checkpoint", ckpt, "--text", afile, "--context", "5000"],
                                 "--context 5000 needs 5000 positions"),
        "quantize": (["quantize", "--checkpoint", ckpt, "--scheme", "any4", "--group-size", "48", "--out",
                      tmp_path / "q"], "group size 48 does not divide"),
        "quantize --out": (["quantize", "--checkpoint", ckpt, "--scheme", "int8", "--out", ckpt, "--force"],
                           "is the --checkpoint input itself"),
        "export": (["export", "--checkpoint", ckpt, "--quant", "int4", "--group-size", "48", "--out",
                    tmp_path / "b"], "group size 48 does not divide"),
        "export --out": (["export", "--checkpoint", ckpt, "--out", ckpt / "bundle"], "is inside the --checkpoint"),
        "parity": (["parity", bundle, "--prompts", empty], "no prompts"),
    }


CASES = ["init-checkpoint", "init-checkpoint --force", "logits", "logits --dtype", "generate",
         "generate --max-context", "generate bundle", "perplexity", "perplexity --context", "quantize",
         "quantize --out", "export", "export --out", "parity"]


@pytest.mark.parametrize("case", CASES)
def test_arguments_are_checked_before_any_model_is_loaded(nf4_bundle, loaders_forbidden, tmp_path, case):
    args, fragment = bad_arguments(tmp_path, nf4_bundle[1])[case]
    r = invoke(*args)
    assert loaders_forbidden == []
    assert_one_line_error(r, fragment)
    assert r.stdout == ""


def test_the_loaders_really_are_forbidden(loaders_forbidden, tmp_path):
    """The check above can fail: a valid command reaches a loader, which raises."""
    r = invoke("logits", "--checkpoint", TINY_AUSTEN, "--tokens", "1,2", "--out", tmp_path / "l.npy")
    assert r.exit_code != 0 and loaders_forbidden == ["TorchEngine"]
