"""Our torch model and the independent numpy reference agree: logits within 1e-4 (fp32), prefill and decode, and
identical 64-token greedy continuations, for every tiny family variant."""

from __future__ import annotations

import numpy as np
import pytest

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.cli.engines import make_engine
from pocketllm.runtime_py.evaluate import run_logits
from pocketllm.runtime_py.generate import generate

VARIANTS = ["minicpm4_dense", "minicpm4_sparse", "smallthinker_sigmoid", "smallthinker_softmax"]


def engines(directory, max_context):
    ckpt = open_checkpoint(directory)
    return ckpt, make_engine("torch", ckpt, max_context, "fp32"), make_engine("reference", ckpt, max_context)


def prompt(n, vocab, seed=0):
    return np.random.default_rng(seed).integers(3, vocab, size=n).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_logits_match(tiny_dirs, variant, mode):
    # 600 tokens: beyond the tiny sparse preset's dense_len (512), so InfLLM v2 engages in prefill, and past
    # the tiny SmallThinker's 32-token sliding window.
    n = 600 if mode == "prefill" else 160
    ckpt, torch_engine, ref_engine = engines(tiny_dirs[variant], 640)
    ids = prompt(n, ckpt.spec.vocab_size)
    a = run_logits(torch_engine, ids, mode)
    b = run_logits(ref_engine, ids, mode)
    assert a.shape == b.shape == (n, ckpt.spec.vocab_size)
    assert np.abs(a - b).max() <= 1e-4


def test_decode_with_infllm_engaged(tiny_dirs):
    """Decode steps whose total length passes dense_len (512) run sparse in both implementations."""
    ckpt, torch_engine, ref_engine = engines(tiny_dirs["minicpm4_sparse"], 640)
    ids = np.asarray(prompt(560, ckpt.spec.vocab_size, seed=3))
    diffs = []
    for engine in (torch_engine, ref_engine):
        engine.reset()
        engine.forward(ids[:500], 0)
        diffs.append(np.concatenate([engine.forward(ids[i:i + 1], i) for i in range(500, 560)]))
    assert np.abs(diffs[0] - diffs[1]).max() <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_continuations_identical(tiny_dirs, variant):
    ckpt, torch_engine, ref_engine = engines(tiny_dirs[variant], 640)
    # A 480-token prompt plus 64 new tokens crosses dense_len=512 during decode for the sparse preset.
    ids = prompt(480, ckpt.spec.vocab_size, seed=5)
    a = generate(torch_engine, ids, 64, greedy=True).tokens
    b = generate(ref_engine, ids, 64, greedy=True).tokens
    assert len(a) == 64 and a == b


# ------------------------------------------------------------------------------------------------ InfLLM v2 op
