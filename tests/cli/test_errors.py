"""No tracebacks, no boxes: every bad input is one line `error: ...` with exit code 2 (README), usage errors from
typer included (export/cli/usage.py); and `perplexity` runs a bundle."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli.conftest import assert_one_line_error, invoke
from tests.conftest import TINY_AUSTEN

pytestmark = pytest.mark.usefixtures("one_torch_thread")

THREADED = {  # every command with --threads, with otherwise valid arguments
    "logits": ["logits", "--checkpoint", TINY_AUSTEN, "--tokens", "1,2", "--out", "/tmp/never-written.npy"],
    "generate": ["generate", "--checkpoint", TINY_AUSTEN, "--prompt", "x"],
    "perplexity": ["perplexity", "--checkpoint", TINY_AUSTEN, "--text", TINY_AUSTEN / "README.md"],
    "quantize": ["quantize", "--checkpoint", TINY_AUSTEN, "--scheme", "int8", "--out", "/tmp/never-written"],
    "export": ["export", "--checkpoint", TINY_AUSTEN, "--out", "/tmp/never-written"],
    "parity": ["parity", "/tmp/no-bundle"],
}


@pytest.mark.parametrize("command", sorted(THREADED))
@pytest.mark.parametrize("value", ["0", "-3"])
def test_threads_must_be_positive_on_every_command(command, value):
    assert_one_line_error(invoke(*THREADED[command], "--threads", value), "--threads",
                          "greater than or equal to 1")


@pytest.mark.parametrize("args,fragments", [
    (["init-checkpoint", "--arch", "llama", "--preset", "tiny", "--out", "/tmp/x"],
     ["--arch", "'llama' is not one of 'minicpm4', 'minimax', 'smallthinker'"]),
    (["generate", "--checkpoint", TINY_AUSTEN, "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens"]),
    (["perplexity", "--checkpoint", TINY_AUSTEN, "--text", TINY_AUSTEN / "README.md", "--context", "1"],
     ["--context", "greater than or equal to 2"]),
    (["quantize", "--checkpoint", TINY_AUSTEN, "--scheme", "any4", "--out", "/tmp/x", "--max-calibration-tokens",
      "1"], ["--max-calibration-tokens", "greater than or equal to 2"]),
    (["export", "--checkpoint", TINY_AUSTEN, "--out", "/tmp/x", "--quant", "fp3"],
     ["--quant", "'fp3' is not one of", "'nf4'"]),
    (["generate", "--prompt", "x", "--no-such-option"], ["No such option: --no-such-option"]),
    (["generate", "--checkpoint", TINY_AUSTEN], ["Missing option '--prompt'"]),
    (["no-such-command"], ["No such command"]),
])
def test_usage_errors_are_one_line(args, fragments):
    r = invoke(*args)
    assert_one_line_error(r, *fragments)
    assert "Value error" not in r.output and "╭" not in r.output and "Usage:" not in r.output


def test_non_utf8_text_and_prompts(tmp_path, nf4_bundle):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 au lait, na\xefve fa\xe7ade.\n".encode("latin-1"))
    assert_one_line_error(invoke("perplexity", "--checkpoint", TINY_AUSTEN, "--text", latin1),
                          f"{latin1}: the text file is not UTF-8 text", "at byte 3")
    assert_one_line_error(invoke("parity", nf4_bundle[1], "--prompts", latin1),
                          f"{latin1}: the prompts file is not UTF-8 text")


def test_json_to_a_directory_or_an_impossible_path(tmp_path):
    base = ["perplexity", "--checkpoint", TINY_AUSTEN, "--text", TINY_AUSTEN / "README.md"]
    assert_one_line_error(invoke(*base, "--json", tmp_path), f"--json {tmp_path} is a directory")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(invoke(*base, "--json", afile / "out.json"), f"{afile} is a file, not a directory")
    assert_one_line_error(invoke("logits", "--checkpoint", TINY_AUSTEN, "--tokens", "1", "--out", tmp_path),
                          f"--out {tmp_path} is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_json_to_an_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(invoke("perplexity", "--checkpoint", TINY_AUSTEN, "--text", TINY_AUSTEN / "README.md",
                                 "--json", locked / "p.json"), "permission denied")


def test_perplexity_runs_a_bundle_like_its_reference_weights(nf4_bundle, tmp_path):
    """`perplexity --engine executorch --bundle B` (it used to crash) scores like the numpy reference on the
    bundle's own reference/ weights."""
    _, bundle, _ = nf4_bundle
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. It is a truth universally acknowledged.\n")
    results = {}
    for engine, source in (("executorch", ["--bundle", bundle]), ("reference", ["--checkpoint", bundle / "reference"])):
        out = tmp_path / f"{engine}.json"
        r = invoke("perplexity", "--engine", engine, *source, "--text", text, "--context", 32, "--json", out)
        assert r.exit_code == 0, r.output
        results[engine] = json.loads(out.read_text())
    assert results["executorch"]["tokens"] == results["reference"]["tokens"] > 10
    assert results["executorch"]["nll"] == pytest.approx(results["reference"]["nll"], abs=1e-4)
