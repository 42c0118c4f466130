"""`pocketllm parity`: a quicker check never replaces a more thorough saved result, progress is reported per prompt,
cut prompts are reported, and what parity writes is never one of its inputs."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import BUNDLE_CONTEXT, assert_one_line_error, invoke, tree_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = "The quick brown fox jumps over the lazy dog.\nIt is a truth universally acknowledged.\n"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def saved(bundle):
    return (json.loads((bundle / "parity.json").read_text())["executorch"],
            json.loads((bundle / "manifest.json").read_text())["parity"]["executorch"])


def test_a_quicker_run_keeps_the_more_thorough_result(bundle_copy, prompts):
    r = invoke("parity", bundle_copy, "--prompts", prompts, "--steps", 6)
    assert r.exit_code == 0, r.output
    report, summary = saved(bundle_copy)
    assert report["steps"] == summary["steps"] == 6 and report["compared_steps"] == 12
    files = tree_hash(bundle_copy)

    r = invoke("parity", bundle_copy, "--prompts", prompts, "--steps", 1)
    assert r.exit_code == 0, r.output
    assert "parity.json keeps its more thorough executorch result (2 prompts x 6 steps, PASS)" in r.output
    assert "not saved" in r.stdout
    assert tree_hash(bundle_copy) == files  # parity.json and manifest.json untouched

    r = invoke("parity", bundle_copy, "--prompts", prompts, "--steps", 8)
    assert r.exit_code == 0 and "wrote" in r.stdout, r.output
    report, summary = saved(bundle_copy)
    assert report["steps"] == summary["steps"] == 8


def test_progress_is_reported_per_prompt(bundle_copy, prompts):
    from pocketllm.runtime_py.parity import run_parity

    calls = []
    report = run_parity(bundle_copy, prompts_file=prompts, steps=1, progress=lambda done, total: calls.append(
        (done, total)))
    assert calls == [(1, 2), (2, 2)] and report["passed"]


def test_cut_prompts_are_reported(bundle_copy, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("short prompt\n" + " ".join(["word"] * 200) + "\n")
    r = invoke("parity", bundle_copy, "--prompts", long, "--steps", 4)
    assert r.exit_code == 0, r.output
    first, cut = json.loads((bundle_copy / "parity.json").read_text())["executorch"]["prompts"]
    assert not first["prompt_truncated"]
    assert cut["prompt_truncated"] and cut["prompt_tokens"] == BUNDLE_CONTEXT - 4 < cut["prompt_tokens_full"]
    line = f"* prompt 1: {cut['prompt_tokens_full']} tokens, cut to its first {cut['prompt_tokens']} to fit"
    assert line in r.output


@pytest.mark.parametrize("name", ["parity.json", "manifest.json"])
def test_what_parity_writes_is_never_its_input(bundle_copy, name):
    if name == "parity.json":
        (bundle_copy / name).write_text(PROMPTS)
    before = tree_hash(bundle_copy)
    assert_one_line_error(invoke("parity", bundle_copy, "--prompts", bundle_copy / name),
                          f"parity's {name}", "is the --prompts input itself")
    assert tree_hash(bundle_copy) == before
