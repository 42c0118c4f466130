"""Run commands check limits and option combinations before anything runs (the echoed prompt never precedes an
error), refuse options they would ignore, and keep stdout for the text alone."""

from __future__ import annotations

import pytest

from tests.cli.conftest import BUNDLE_CONTEXT, assert_one_line_error, invoke
from tests.conftest import TINY_AUSTEN

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GEN = ["generate", "--checkpoint", TINY_AUSTEN, "--prompt", "It is a truth"]


def test_bundle_context_is_checked_before_generating(nf4_bundle):
    _, bundle, _ = nf4_bundle
    base = ["generate", "--engine", "executorch", "--bundle", bundle, "--prompt", "The quick brown fox"]
    r = invoke(*base, "--max-context", 1000, "--max-new-tokens", 10)
    assert_one_line_error(r, "--max-context 1000 exceeds the bundle's context", f"({BUNDLE_CONTEXT})",
                          "fixed at export", "re-export")
    assert r.stdout == ""
    r = invoke(*base, "--max-new-tokens", 100)
    assert_one_line_error(r, "needs", f"more than the bundle's context ({BUNDLE_CONTEXT})",
                          "lower --max-new-tokens", "re-export the bundle with a larger --max-context")
    assert "raise --max-context" not in r.output and r.stdout == ""
    r = invoke(*base, "--max-context", 16, "--max-new-tokens", 20)  # a lower cap than the bundle's is honoured
    assert_one_line_error(r, "more than --max-context (16)", f"raise --max-context (up to {BUNDLE_CONTEXT})")


def test_checkpoint_context_advice():
    r = invoke(*GEN, "--max-new-tokens", 40, "--max-context", 16)
    assert_one_line_error(r, "more than --max-context (16)", "raise --max-context (up to 1024)")
    r = invoke(*GEN, "--max-new-tokens", 2000)
    assert_one_line_error(r, "more than the model's max_position_embeddings (1024)", "lower --max-new-tokens")
    assert "raise --max-context" not in r.output
    assert_one_line_error(invoke(*GEN, "--max-context", 5000), "--max-context 5000 exceeds the model's "
                          "max_position_embeddings (1024)")


@pytest.mark.parametrize("command", ["logits", "generate", "export"])
def test_max_context_zero_is_refused_everywhere(command, tmp_path):
    args = {"logits": ["logits", "--checkpoint", TINY_AUSTEN, "--tokens", "1", "--out", tmp_path / "l.npy"],
            "generate": GEN, "export": ["export", "--checkpoint", TINY_AUSTEN, "--out", tmp_path / "b"]}[command]
    assert_one_line_error(invoke(*args, "--max-context", 0), "--max-context", "greater than or equal to 1")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,fragments", [
    (["--temperature", "0"], ["--temperature must be greater than 0 (got 0.0)", "--greedy"]),
    (["--top-p", "0"], ["--top-p must be in (0, 1] (got 0.0)"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1] (got 1.5)"]),
    (["--greedy", "--temperature", "0.5"], ["--greedy", "--temperature would be ignored"]),
    (["--greedy", "--top-p", "0.9", "--temperature", "0.5"], ["--temperature and --top-p would be ignored"]),
    (["--dtype", "bf16", "--engine", "reference"], ["--dtype bf16 applies to the torch engine only"]),
    (["--bundle", "/tmp/b", "--engine", "reference"], ["--bundle is read by the coreml, executorch, onnx engine(s)"]),
])
def test_options_that_would_be_ignored_or_fail_later_are_refused_first(args, fragments):
    r = invoke(*GEN, *args)
    assert_one_line_error(r, *fragments)
    assert r.stdout == ""  # nothing echoed before the error


def test_bundle_engines_refuse_checkpoint_and_dtype(nf4_bundle):
    _, bundle, _ = nf4_bundle
    base = ["generate", "--engine", "executorch", "--bundle", bundle, "--prompt", "x"]
    assert_one_line_error(invoke(*base, "--checkpoint", TINY_AUSTEN),
                          "--checkpoint is read by the torch and reference engines", "--engine executorch")
    assert_one_line_error(invoke(*base, "--dtype", "bf16"), "--dtype bf16 applies to the torch engine only",
                          "fixed at export")


def test_perplexity_needs_something_to_score(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    base = ["perplexity", "--checkpoint", TINY_AUSTEN, "--text"]
    assert_one_line_error(invoke(*base, empty), f"{empty}: the text file is empty")
    for n in ("0", "-5"):
        assert_one_line_error(invoke(*base, TINY_AUSTEN / "README.md", "--max-tokens", n), "--max-tokens",
                              "greater than or equal to 1")


def test_parity_tolerance_must_not_be_negative(nf4_bundle):
    assert_one_line_error(invoke("parity", nf4_bundle[1], "--tolerance", "-1"), "--tolerance",
                          "greater than or equal to 0")


def test_generate_writes_the_text_alone_to_stdout():
    prompt = "It is a truth universally acknowledged"
    r = invoke("generate", "--checkpoint", TINY_AUSTEN, "--prompt", prompt, "--greedy", "--max-new-tokens", 12)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(prompt) and r.stdout.endswith("\n")
    assert "tokens/s" not in r.stdout and "│" not in r.stdout  # the speed table and line: stderr
    assert r.stderr.rstrip().splitlines()[-1].endswith("tokens/s") and "decode" in r.stderr
