"""Our torch model and the independent numpy reference agree: logits within 1e-4 (fp32), prefill and decode, and
identical 64-token greedy continuations, for every tiny family variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.checkpoint import open_checkpoint
from pocketllm.export.cli.engines import make_engine
from pocketllm.runtime_py.evaluate import run_logits
from pocketllm.export.ops.infllm_attention import (infllm_attention_reference, infllm_block_mask, infllm_block_scores,
                                         infllm_op_args)
from pocketllm.export.spec import SparseSpec
from pocketllm.runtime_py.generate import generate
from pocketllm.runtime_py.ops.infllm_attention import block_scores as reference_block_scores
from pocketllm.runtime_py.ops.infllm_attention import infllm_attention as reference_infllm
from pocketllm.runtime_py.ops.infllm_attention import kernel_scores as reference_kernel_scores

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
SPARSE = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128, topk=3,
                    dense_len=-1)


def op_args(s: SparseSpec):
    """The op's arguments after start_pos: kernel_size .. topk, dense_len, score_rule."""
    return infllm_op_args(s)


def mask_args(s: SparseSpec):
    """infllm_block_mask's arguments after start_pos (no dense_len)."""
    return (s.kernel_size, s.kernel_stride, s.block_size, s.init_blocks, s.window_size, s.topk) + op_args(s)[-1:]


def random_qkv(L, T, hq=8, hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, hq, d, generator=g)
    k = torch.randn(1, L, hkv, d, generator=g)
    v = torch.randn(1, L, hkv, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("score_rule", ["upstream", "exact"])
@pytest.mark.parametrize("start_pos,T", [(0, 2048), (2047, 1), (1500, 37)])
def test_selected_blocks_match_reference_exactly(start_pos, T, score_rule):
    """On a long random context the torch op and the numpy reference compute the same block scores bit for bit
    and so choose the very same blocks."""
    sparse = SparseSpec(**{**SPARSE.__dict__, "score_rule": score_rule})
    L = start_pos + T
    q, k, v = random_qkv(L, T, seed=start_pos)
    scores = infllm_block_scores(q[0], k[0], start_pos, sparse.kernel_size, sparse.kernel_stride, sparse.block_size,
                                 op_args(sparse)[-1]).numpy()
    positions = np.arange(start_pos, L)
    group = reference_kernel_scores(q[0].numpy(), k[0].numpy(), positions, sparse)
    assert np.array_equal(scores, reference_block_scores(group, scores.shape[-1], sparse))
    ours = infllm_block_mask(q[0], k[0], start_pos, *mask_args(sparse)).numpy()
    out_ref, theirs = reference_infllm(q[0].numpy(), k[0].numpy(), v[0].numpy(), start_pos, sparse)
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)
    # Sparse really is sparse here: late queries read only topk + window/block blocks.
    assert ours[:, -1].sum(axis=-1).max() == sparse.budget
    out = infllm_attention_reference(q, k, v, start_pos, *op_args(sparse))
    assert np.abs(out[0].numpy() - out_ref).max() <= 1e-5


def test_the_score_rules_select_differently_on_random_data():
    """The option is real: on the same random context upstream's LSE-over-Kc2 rule and the exact softmax disagree
    on some blocks (they agree on most)."""
    q, k, _ = random_qkv(2048, 2048, seed=0)
    masks = [infllm_block_mask(q[0], k[0], 0, *mask_args(SparseSpec(**{**SPARSE.__dict__, "score_rule": rule})))
             for rule in ("upstream", "exact")]
    differ = (masks[0] != masks[1]).float().mean().item()
    assert 0 < differ < 0.5


def test_budget_covering_every_block_equals_dense():
    L = 1024
    q, k, v = random_qkv(L, L, seed=7)
    everything = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128,
                            topk=L // 64, dense_len=-1)
    sparse = infllm_attention_reference(q, k, v, 0, *op_args(everything))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (sparse - dense).abs().max() <= 1e-5


def test_dense_fallback_below_dense_len():
    q, k, v = random_qkv(300, 300, seed=9)
    fallback = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=1,
                          dense_len=301)
    got = infllm_attention_reference(q, k, v, 0, *op_args(fallback))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (got - dense).abs().max() <= 1e-5
    engaged = infllm_attention_reference(q, k, v, 0, *op_args(SparseSpec(**{**fallback.__dict__, "dense_len": 300})))
    assert (engaged - dense).abs().max() > 1e-3


def test_op_out_variant_and_fake_shapes():
    q, k, v = random_qkv(200, 8, seed=11)
    k_cache = torch.zeros(1, 256, 2, 32)
    v_cache = torch.zeros(1, 256, 2, 32)
    k_cache[:, :200], v_cache[:, :200] = k, v
    functional = torch.ops.pocketllm.infllm_attention(q, k_cache, v_cache, 192, *op_args(SPARSE))
    out = torch.empty(0)
    torch.ops.pocketllm.infllm_attention.out(q, k_cache, v_cache, 192, *op_args(SPARSE), out=out)
    assert torch.equal(functional, out)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k_cache, v_cache))
        fake = torch.ops.pocketllm.infllm_attention(fq, fk, fv, 192, *op_args(SPARSE))
        assert fake.shape == q.shape and fake.dtype == q.dtype


@pytest.mark.parametrize("L", [1, 20, 31, 32])
def test_always_sparse_with_fewer_keys_than_one_kernel(L):
    """dense_len = -1 and a context shorter than kernel_size: no compressed key exists, only forced blocks count."""
    always = SparseSpec(**{**SPARSE.__dict__, "dense_len": -1})
    q, k, v = random_qkv(L, L, seed=L)
    ours = infllm_block_mask(q[0], k[0], 0, *mask_args(always)).numpy()
    out_ref, theirs = reference_infllm(q[0].numpy(), k[0].numpy(), v[0].numpy(), 0, always)
    assert np.array_equal(ours, theirs) and ours.all()
    out = infllm_attention_reference(q, k, v, 0, *op_args(always))
    assert np.abs(out[0].numpy() - out_ref).max() <= 1e-5
