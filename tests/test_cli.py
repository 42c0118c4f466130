"""The CLI end to end: logits files, streamed generation from the trained tiny model, perplexity."""

from __future__ import annotations

import json
import re

import numpy as np
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from tests.conftest import AUSTEN_DATA, TINY_AUSTEN

runner = CliRunner()


def test_logits_prefill_equals_decode_and_engines_agree(tiny_dirs, tmp_path):
    d = tiny_dirs["smallthinker_softmax"]
    results = {}
    for engine in ("torch", "reference"):
        for mode in ("prefill", "decode"):
            out = tmp_path / f"{engine}-{mode}.npy"
            r = runner.invoke(app, ["logits", "--checkpoint", str(d), "--tokens", "0,5,9,33,7,100,3,250",
                                    "--mode", mode, "--engine", engine, "--out", str(out)])
            assert r.exit_code == 0, r.output
            results[engine, mode] = np.load(out)
            assert results[engine, mode].dtype == np.float32 and results[engine, mode].shape == (8, 512)
    base = results["reference", "prefill"]
    for key, value in results.items():
        assert np.abs(value - base).max() <= 1e-4, key


def training_vocabulary() -> set[str]:
    words = set()
    for book in ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey"):
        words |= set(re.findall(r"[a-z]+", (AUSTEN_DATA / f"{book}.txt").read_text(encoding="utf-8").lower()))
    return words


def test_generate_from_tiny_austen_prints_readable_english():
    prompt = "It is a truth universally acknowledged"
    r = runner.invoke(app, ["generate", "--checkpoint", str(TINY_AUSTEN), "--prompt", prompt, "--greedy",
                            "--max-new-tokens", "48"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith(prompt)
    assert re.search(r"[\d.]+ tokens/s\s*$", r.stderr)  # the speed goes to stderr: stdout is the text alone
    continuation = r.stdout[len(prompt):-1]
    words = re.findall(r"[a-z]+", continuation.lower())
    assert len(words) >= 20, continuation
    known = training_vocabulary()
    assert sum(w in known for w in words) / len(words) >= 0.9, continuation


def test_generate_sampling_is_seeded_and_engines_stream_the_same_text():
    args = ["generate", "--checkpoint", str(TINY_AUSTEN), "--prompt", "Emma was", "--max-new-tokens", "24",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    # stdout = the streamed text and a newline
    texts = [runner.invoke(app, args + ["--engine", e]).stdout[:-1] for e in ("torch", "reference")]
    assert texts[0] == texts[1] and len(texts[0]) > len("Emma was") + 20


def test_perplexity_command(tmp_path):
    out = tmp_path / "ppl.json"
    r = runner.invoke(app, ["perplexity", "--checkpoint", str(TINY_AUSTEN), "--text",
                            str(AUSTEN_DATA / "persuasion.txt"), "--context", "256", "--max-tokens", "2000",
                            "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    # A trained model: far below the 8192 of a uniform guess over the vocabulary.
    assert result["tokens"] == 2000 and 1.0 < result["perplexity"] < 1000.0
