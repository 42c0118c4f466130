"""InfLLM v2 in the numpy reference (runtime_py/infllm.py), checked against docs/infllm_v2.md.

Three kinds of evidence: tiny cases whose selected blocks are worked out by hand below, a per-query loop that
reads the doc's steps literally (the vectorised code must pick exactly the same blocks), and equality with dense
attention when the budget covers every block or the dense fallback applies. Both score rules: upstream's
exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))) (the default) and the exact softmax over Kc1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import families, spec_from_config
from pocketllm.export.ops.infllm_attention import (SCORE_RULE_CODES, infllm_attention_reference, infllm_block_mask,
                                                   infllm_block_scores, infllm_op_args)
from pocketllm.export.spec import SparseSpec
from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.ops import infllm_attention as reference
from pocketllm.runtime_py.ops.infllm_attention import block_scores as reference_block_scores
from pocketllm.runtime_py.ops.infllm_attention import (compressed_keys, exp_fixed, infllm_attention, kernel_range,
                                                       kernel_scores)
from pocketllm.runtime_py.ops.infllm_attention import infllm_attention as reference_infllm
from pocketllm.runtime_py.ops.infllm_attention import kernel_scores as reference_kernel_scores
from tests.kernels import I, ptr

# ------------------------------------------------------------------------------------------ hand-checked cases
# Kernels of 4 tokens every 2 tokens, blocks of 4 tokens: kernel j = tokens [2j, 2j+4) touches blocks b with
# 2b-1 <= j <= 2b+1. 24 tokens -> 11 kernels, 6 blocks. No local window: forced blocks are block 0 (init) and the
# query's own block; budget = topk. One head, head_dim 1, q = 1, so a kernel's score grows with its mean key.
TINY = SparseSpec(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=4, window_size=0, topk=3, dense_len=-1)


def tiny_selection(keys: dict[int, float], sparse: SparseSpec = TINY) -> tuple[np.ndarray, np.ndarray]:
    k = np.zeros((24, 1, 1), dtype=np.float32)
    for pos, value in keys.items():
        k[pos] = value
    v = np.random.default_rng(0).standard_normal((24, 1, 1)).astype(np.float32)
    q = np.ones((24, 1, 1), dtype=np.float32)
    out, selected = infllm_attention(q, k, v, 0, sparse)
    return out, selected[0]  # [24, 6]


def blocks(row: np.ndarray) -> list[int]:
    return np.flatnonzero(row).tolist()


def test_one_spike_ties_between_two_blocks_go_to_the_lower_block():
    # Key 9 = 8: kernel 3 (tokens 6-9) and kernel 4 (tokens 8-11) have mean 2, every other kernel 0.
    # Block 1 (kernels 1-3) and block 2 (kernels 3-5) both score p(kernel 3): a tie, won by block 1.
    _, sel = tiny_selection({9: 8.0})
    assert blocks(sel[23]) == [0, 1, 5]  # forced 0 and 5, one free slot -> block 1
    assert blocks(sel[15]) == [0, 1, 3]  # sees kernels 0-6; same tie; block 2 is left out although it holds key 9
    assert blocks(sel[7]) == [0, 1]  # every valid block (forced) fits the budget
    assert blocks(sel[2]) == [0]  # sees no kernel yet (kernel 0 ends at token 3): forced blocks only


def test_the_highest_block_score_wins_the_free_slots():
    # Keys 9 = 8 and 10 = 4: kernel 3 mean 2, kernel 4 mean 3, kernel 5 (tokens 10-13) mean 1.
    # Block scores: block 1 = p(k3), block 2 = p(k4), block 3 = p(k5), blocks 4-5 = p(0-mean kernel).
    _, sel = tiny_selection({9: 8.0, 10: 4.0})
    assert blocks(sel[23]) == [0, 2, 5]
    assert blocks(sel[15]) == [0, 2, 3]
    _, sel = tiny_selection({9: 8.0, 10: 4.0}, SparseSpec(**{**TINY.__dict__, "topk": 4}))
    assert blocks(sel[23]) == [0, 1, 2, 5]  # second free slot: block 1 (p(k3)) beats block 3 (p(k5))


def test_attention_reads_exactly_the_tokens_of_the_selected_blocks():
    out, sel = tiny_selection({9: 8.0})
    rng = np.random.default_rng(0)
    v = rng.standard_normal(24)
    k = np.zeros(24)
    k[9] = 8.0
    tokens = [j for b in (0, 1, 5) for j in range(4 * b, 4 * b + 4)]  # query 23 attends to blocks 0, 1 and 5
    a = np.exp(k[tokens] - k[tokens].max())
    assert out[23, 0, 0] == pytest.approx(float(a @ v[tokens] / a.sum()), abs=1e-6)


def test_kernels_touching_a_block_are_upstreams_maxpool_window():
    """k=32, s=16, B=64: block b takes the max over kernels 4b-1 .. 4b+3 (max-pool 5, stride 4, padding 1)."""
    sparse = SparseSpec()
    n = 100
    for b in range(20):
        assert kernel_range(b, n, sparse) == (max(0, 4 * b - 1), min(n, 4 * b + 4))


def test_compressed_keys_are_means_of_complete_windows():
    k = np.random.default_rng(0).standard_normal((300, 2, 8)).astype(np.float32)
    kc = compressed_keys(k, 32, 16)
    assert kc.shape == (17, 2, 8)  # floor((300 - 32) / 16) + 1
    np.testing.assert_allclose(kc[3], k[48:80].mean(axis=0), rtol=1e-6, atol=1e-7)
    assert compressed_keys(k[:31], 32, 16).shape == (0, 2, 8)
    # The coarse keys Kc2 that normalise upstream's scores: 4x the kernel and the stride of the config's.
    sparse = SparseSpec()
    assert (sparse.coarse_kernel_size, sparse.coarse_kernel_stride) == (128, 64)
    kc2 = compressed_keys(k, 128, 64)
    assert kc2.shape == (3, 2, 8)  # floor((300 - 128) / 64) + 1
    np.testing.assert_allclose(kc2[2], k[128:256].mean(axis=0), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------- upstream's score rule by hand
def upstream_case(score_rule: str) -> tuple[SparseSpec, np.ndarray, np.ndarray]:
    """One KV head shared by two query heads, head_dim 1 (scale 1): head 0 has q = +1 (logit = key), head 1 has
    q = -1 (logit = -key). Kernels of 4 tokens every 2 (Kc1[j] = tokens 2j..2j+3), coarse keys of 16 every 8
    (Kc2[J] = tokens 8J..8J+15), blocks of 4 tokens; no window, 1 init block, topk 3: the last query (47) keeps
    block 0 and its own block 11, plus ONE free slot. Keys: tokens 8-11 = 16 (block 2), 16-19 = 15 (block 4),
    32-35 = -6 (block 8), all others 0."""
    sparse = SparseSpec(kernel_size=4, kernel_stride=2, init_blocks=1, block_size=4, window_size=0, topk=3,
                        dense_len=-1, score_rule=score_rule)
    k = np.zeros((48, 1, 1), dtype=np.float32)
    k[8:12], k[16:20], k[32:36] = 16.0, 15.0, -6.0
    q = np.tile(np.array([[1.0], [-1.0]], dtype=np.float32), (48, 1, 1))  # [48, 2, 1]
    return sparse, q, k


def test_upstream_scores_are_exp_q_kc1_minus_lse_of_q_kc2_and_pick_other_blocks_than_the_exact_softmax():
    """Kernel score = sum over the group's heads of exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))).

    Kc1: kernel 4 = 16 (block 2), kernel 8 = 15 (block 4), kernel 16 = -6 (block 8); kernels 3, 5 = 8, 7, 9 = 7.5,
    15, 17 = -3; the other 14 are 0. Kc2 (5 coarse keys): 64/16 = 4, (64 + 60)/16 = 7.75, 60/16 = 3.75, -1.5, -1.5.
    upstream: LSE_0 = log(e^4 + e^7.75 + e^3.75 + 2 e^-1.5) = log 2419.2, LSE_1 = log(e^-4 + e^-7.75 + e^-3.75 +
      2 e^1.5) = log 9.005; block 2 scores e^16 / 2419.2 = 3673 (head 1 adds e^-16 / 9.005), block 8 scores
      e^6 / 9.005 = 44.8, block 4 e^15 / 2419.2 = 1351: the free slot goes to block 2.
    exact: head 0 splits its softmax mass between kernels 4 and 8 (e^16 / (e^16 + e^15 + ...) = 0.73), head 1
      puts 0.88 on kernel 16 (e^6 / (e^6 + 2 e^3 + 14 + ...)): the free slot goes to block 8.
    """
    sparse, q, k = upstream_case("upstream")
    v = np.zeros_like(k)
    _, selected = infllm_attention(q, k, v, 0, sparse)
    assert blocks(selected[0, 47]) == [0, 2, 11]
    _, selected = infllm_attention(q, k, v, 0, SparseSpec(**{**sparse.__dict__, "score_rule": "exact"}))
    assert blocks(selected[0, 47]) == [0, 8, 11]

    # The kernel scores themselves, against the formula evaluated with math.exp / math.log.
    lse0 = math.log(math.exp(4) + math.exp(7.75) + math.exp(3.75) + 2 * math.exp(-1.5))
    lse1 = math.log(math.exp(-4) + math.exp(-7.75) + math.exp(-3.75) + 2 * math.exp(1.5))
    group = kernel_scores(q[47:], k, np.array([47]), sparse)[0, 0]  # [23 kernels]
    for j, kc in [(4, 16.0), (8, 15.0), (16, -6.0), (3, 8.0), (0, 0.0)]:
        assert group[j] == pytest.approx(math.exp(kc - lse0) + math.exp(-kc - lse1), rel=1e-13)
    assert group[4] > 1  # no clamp: a score may exceed 1 when q.Kc1 beats the coarse log-sum-exp


def test_a_query_that_sees_no_coarse_key_scores_every_kernel_it_sees_inf():
    """LSE over no coarse key is -inf, so exp(q.Kc1 - LSE) = +inf for every visible kernel: all blocks with a
    visible kernel tie and the lower indices win (query 13 sees kernels 0-5, tokens 0-13, and no coarse key, whose
    first window is tokens 0-15)."""
    sparse = SparseSpec(kernel_size=4, kernel_stride=2, init_blocks=0, block_size=4, window_size=0, topk=2,
                        dense_len=-1)
    k = np.zeros((14, 1, 1), dtype=np.float32)
    k[8:12] = 30.0  # block 2 would win under any finite score
    q = np.ones((14, 1, 1), dtype=np.float32)
    group = kernel_scores(q, k, np.arange(14), sparse)[0]
    assert np.isposinf(group[13]).all()
    _, selected = infllm_attention(q, k, np.zeros_like(k), 0, sparse)
    assert blocks(selected[0, 13]) == [0, 3]  # own block 3 forced, then the tie among blocks 0-2 goes to block 0
    _, selected = infllm_attention(q, k, np.zeros_like(k), 0, SparseSpec(**{**sparse.__dict__, "score_rule": "exact"}))
    assert blocks(selected[0, 13]) == [2, 3]


def test_the_score_rule_is_ours_not_a_config_key():
    """Upstream's rule is the default; config.json cannot change it (upstream has no such key); a bad name is a
    one-line error naming the value."""
    config = families()["minicpm4"].presets["tiny"]()
    assert spec_from_config(config).sparse.score_rule == "upstream"
    config["sparse_config"]["score_rule"] = "exact"
    assert spec_from_config(config).sparse.score_rule == "upstream"
    with pytest.raises(PocketllmError, match="score_rule.*'softmax'"):
        SparseSpec(score_rule="softmax")


def test_exp_fixed_is_exp_to_1e_13():
    """docs/infllm_v2.md step 3a: the exp every engine evaluates the same way."""
    x = np.concatenate([np.linspace(-599, 699, 100001), np.random.default_rng(0).standard_normal(10000) * 20])
    expected = np.array([math.exp(t) for t in x])
    np.testing.assert_allclose(exp_fixed(x), expected, rtol=1e-13, atol=0)
    assert exp_fixed(np.array([-np.inf, -600.5, 700.5]))[0] == 0
    assert exp_fixed(np.array([-600.5]))[0] == 0 and np.isposinf(exp_fixed(np.array([700.5]))[0])


# ---------------------------------------------------------------------------- the doc's steps, one query at a time


def selection_by_the_letter(q: np.ndarray, k: np.ndarray, start_pos: int, sp: SparseSpec) -> np.ndarray:
    """docs/infllm_v2.md steps 2-6 with explicit loops over KV heads, queries, kernels and blocks (math.exp,
    math.log: the formula, not the engines' fixed arithmetic)."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    n_blocks = math.ceil(L / sp.block_size)

    def means(size, stride):
        n = (L - size) // stride + 1 if L >= size else 0
        return [(stride * j + size - 1, k[stride * j: stride * j + size].astype(np.float64).mean(axis=0))
                for j in range(n)]  # (last token, mean)

    kc = means(sp.kernel_size, sp.kernel_stride)
    kc_norm = kc if sp.score_rule == "exact" else means(sp.coarse_kernel_size, sp.coarse_kernel_stride)
    selected = np.zeros((Hkv, T, n_blocks), dtype=bool)
    for h in range(Hkv):
        for t in range(T):
            i = start_pos + t
            seen = [j for j, (last, _) in enumerate(kc) if last <= i]
            seen_norm = [c for last, c in kc_norm if last <= i]
            group = dict.fromkeys(seen, 0.0)
            for hq in range(h * G, (h + 1) * G):
                logit = lambda c: float(q[t, hq].astype(np.float64) @ c[h]) / math.sqrt(D)  # noqa: E731
                if seen_norm:
                    m = max(logit(c) for c in seen_norm)
                    lse = m + math.log(sum(math.exp(logit(c) - m) for c in seen_norm))
                else:
                    lse = -math.inf
                for j in seen:
                    group[j] += math.exp(logit(kc[j][1]) - lse)
            score = {}
            for b in range(n_blocks):
                touching = [group[j] for j in seen if sp.kernel_stride * j <= sp.block_size * b + sp.block_size - 1
                            and sp.kernel_stride * j + sp.kernel_size - 1 >= sp.block_size * b]
                score[b] = max(touching) if touching else -math.inf
            b_q = i // sp.block_size
            forced = [b for b in range(b_q + 1) if b < sp.init_blocks or b >= b_q - sp.window_size // sp.block_size]
            others = [b for b in range(b_q + 1) if b not in forced and score[b] > -math.inf]
            others.sort(key=lambda b: (-score[b], b))
            budget = sp.topk + sp.window_size // sp.block_size
            for b in forced + others[: max(budget - len(forced), 0)]:
                selected[h, t, b] = True
    return selected


CASES = {
    # name: (sparse, heads, kv heads, head_dim, total length, new tokens)
    "minicpm4-like prefill": (SparseSpec(32, 16, 1, 64, 128, 4, False, -1), 4, 2, 16, 700, 700),
    "minicpm4-like chunk": (SparseSpec(32, 16, 1, 64, 128, 4, False, -1), 4, 2, 16, 700, 60),
    "minicpm4-like decode": (SparseSpec(32, 16, 1, 64, 128, 4, False, -1), 4, 2, 16, 699, 1),
    "kernel == stride, no window": (SparseSpec(8, 8, 2, 16, 0, 3, False, -1), 6, 2, 8, 200, 200),
    "odd sizes, no init block": (SparseSpec(12, 5, 0, 8, 16, 1, False, -1), 2, 1, 8, 150, 40),
}


@pytest.mark.parametrize("score_rule", ["upstream", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_vectorised_selection_equals_a_per_query_reading_of_the_doc(case, score_rule):
    sparse, Hq, Hkv, D, L, T = CASES[case]
    sparse = SparseSpec(**{**sparse.__dict__, "score_rule": score_rule})
    rng = np.random.default_rng(list(CASES).index(case))
    q = (rng.standard_normal((T, Hq, D)) * 2).astype(np.float32)
    k = rng.standard_normal((L, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, D)).astype(np.float32)
    _, selected = infllm_attention(q, k, v, L - T, sparse)
    assert selected.shape == (Hkv, T, math.ceil(L / sparse.block_size))
    np.testing.assert_array_equal(selected, selection_by_the_letter(q, k, L - T, sparse))


# ----------------------------------------------------------------------------------------- equality with dense


def random_qkv(L: int, T: int, Hq: int = 4, Hkv: int = 2, D: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal((T, Hq, D)) * 2).astype(np.float32),
            rng.standard_normal((L, Hkv, D)).astype(np.float32),
            rng.standard_normal((L, Hkv, D)).astype(np.float32))


@pytest.mark.parametrize("score_rule", ["upstream", "exact"])
@pytest.mark.parametrize("start_pos, T", [(0, 600), (550, 50), (599, 1)])
def test_a_budget_covering_every_block_is_dense_attention(start_pos, T, score_rule):
    sparse = SparseSpec(32, 16, 1, 64, 128, 8, False, -1, score_rule)  # budget 10 blocks = all of 600 tokens
    q, k, v = random_qkv(start_pos + T, T)
    out, selected = infllm_attention(q, k, v, start_pos, sparse)
    causal_blocks = np.arange(10)[None, :] <= (np.arange(start_pos, start_pos + T) // 64)[:, None]
    assert (selected == causal_blocks).all()
    np.testing.assert_allclose(out, causal_attention(q, k, v, start_pos), atol=1e-5)


def test_dense_fallback_applies_while_the_total_length_is_below_dense_len():
    sparse = SparseSpec(32, 16, 1, 64, 128, 3, False, dense_len=600)  # budget 5 of 10 blocks when sparse
    q, k, v = random_qkv(600, 100)
    dense = causal_attention(q[:-1], k[:-1], v[:-1], 500)
    out, selected = infllm_attention(q[:-1], k[:-1], v[:-1], 500, sparse)  # L = 599 < 600: dense
    np.testing.assert_allclose(out, dense, atol=1e-5)
    assert selected[:, -1].sum(axis=-1).tolist() == [10, 10]  # every valid block (0-9 for position 598)
    out, selected = infllm_attention(q, k, v, 500, sparse)  # L = 600: sparse
    assert selected[:, -1].sum(axis=-1).tolist() == [5, 5]  # blocks 0, 7-9 forced + 1 picked
    assert np.abs(out - causal_attention(q, k, v, 500)).max() > 1e-3


def test_a_whole_preallocated_cache_may_be_passed():
    sparse = SparseSpec(32, 16, 1, 64, 128, 2, False, -1)
    q, k, v = random_qkv(1000, 40)
    out, selected = infllm_attention(q, k, v, 560, sparse)  # reads rows 0..599 only
    ref_out, ref_selected = infllm_attention(q, k[:600], v[:600], 560, sparse)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(selected, ref_selected)
    assert selected.shape == (2, 40, 10)


# ---------------------------------------------------------------- the torch op against the numpy reference
SPARSE = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128, topk=3,
                    dense_len=-1)


def op_args(s: SparseSpec):
    """The op's arguments after start_pos: kernel_size .. topk, dense_len, score_rule."""
    return infllm_op_args(s)


def mask_args(s: SparseSpec):
    """infllm_block_mask's arguments after start_pos (no dense_len)."""
    return (s.kernel_size, s.kernel_stride, s.block_size, s.init_blocks, s.window_size, s.topk) + op_args(s)[-1:]


def random_qkv_torch(L, T, hq=8, hkv=2, d=32, seed=0):
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
    q, k, v = random_qkv_torch(L, T, seed=start_pos)
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
    q, k, _ = random_qkv_torch(2048, 2048, seed=0)
    masks = [infllm_block_mask(q[0], k[0], 0, *mask_args(SparseSpec(**{**SPARSE.__dict__, "score_rule": rule})))
             for rule in ("upstream", "exact")]
    differ = (masks[0] != masks[1]).float().mean().item()
    assert 0 < differ < 0.5


def test_budget_covering_every_block_equals_dense():
    L = 1024
    q, k, v = random_qkv_torch(L, L, seed=7)
    everything = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=128,
                            topk=L // 64, dense_len=-1)
    sparse = infllm_attention_reference(q, k, v, 0, *op_args(everything))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (sparse - dense).abs().max() <= 1e-5


def test_dense_fallback_below_dense_len():
    q, k, v = random_qkv_torch(300, 300, seed=9)
    fallback = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=1,
                          dense_len=301)
    got = infllm_attention_reference(q, k, v, 0, *op_args(fallback))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (got - dense).abs().max() <= 1e-5
    engaged = infllm_attention_reference(q, k, v, 0, *op_args(SparseSpec(**{**fallback.__dict__, "dense_len": 300})))
    assert (engaged - dense).abs().max() > 1e-3


def test_op_out_variant_and_fake_shapes():
    q, k, v = random_qkv_torch(200, 8, seed=11)
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
    q, k, v = random_qkv_torch(L, L, seed=L)
    ours = infllm_block_mask(q[0], k[0], 0, *mask_args(always)).numpy()
    out_ref, theirs = reference_infllm(q[0].numpy(), k[0].numpy(), v[0].numpy(), 0, always)
    assert np.array_equal(ours, theirs) and ours.all()
    out = infllm_attention_reference(q, k, v, 0, *op_args(always))
    assert np.abs(out[0].numpy() - out_ref).max() <= 1e-5


# ----------------------------------------------------------------- the C++ kernel (ctypes) against both
INFLLM_CASES = [
    (1, 700, 4, 2, 16, 32, 16, 64, 1, 128, 4, -1),  # decode, deep in the sequence
    (37, 300, 8, 2, 32, 32, 16, 64, 1, 128, 2, -1),  # prefill chunk
    (5, 1000, 6, 3, 8, 8, 4, 16, 2, 32, 3, -1),  # other geometry, GQA 2
    (20, 100, 4, 1, 16, 32, 16, 32, 0, 32, 1, 64),  # no init block; dense_len crossed inside the call
    (300, 0, 4, 2, 16, 32, 16, 64, 1, 64, 1, -1),  # whole prompt, always sparse
    (3, 10, 4, 2, 16, 32, 16, 64, 1, 64, 1, -1),  # fewer keys than one kernel: no compressed keys at all
]


@pytest.mark.parametrize("score_rule", [0, 1], ids=["upstream", "exact"])
@pytest.mark.parametrize("case", INFLLM_CASES, ids=lambda c: f"T{c[0]}-pos{c[1]}")
def test_infllm_selection_and_output_match_reference(kernels, case, score_rule):
    T, start, Hq, Hkv, D, ks, st, B, init, W, topk, dense_len = case
    g = torch.Generator().manual_seed(T * 1000 + start)
    L = start + T
    q = torch.randn(1, T, Hq, D, generator=g)
    k = torch.randn(1, L + 7, Hkv, D, generator=g)
    v = torch.randn(1, L + 7, Hkv, D, generator=g)
    n_blocks = (L + B - 1) // B

    expected = infllm_block_mask(q[0], k[0, :L], start, ks, st, B, init, W, topk, score_rule).to(torch.uint8)
    mask = torch.zeros(Hkv, T, n_blocks, dtype=torch.uint8)
    kernels.pocketllm_infllm_block_mask(ptr(q), ptr(k), I(T), I(Hq), I(Hkv), I(D), I(start), I(ks), I(st), I(B),
                                        I(init), I(W), I(topk), I(score_rule), ptr(mask))
    assert torch.equal(mask, expected), "block selection differs from the reference"

    ref = infllm_attention_reference(q, k, v, start, ks, st, B, init, W, topk, dense_len, score_rule)
    out = torch.zeros_like(q)
    kernels.pocketllm_infllm_attention(ptr(q), ptr(k), ptr(v), I(T), I(Hq), I(Hkv), I(D), I(start), I(ks), I(st),
                                       I(B), I(init), I(W), I(topk), I(dense_len), I(score_rule), ptr(out))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", INFLLM_CASES, ids=lambda c: f"T{c[0]}-pos{c[1]}")
def test_fp16_cache_is_widened_exactly(kernels, case):
    """An fp16 KV cache (ExecuTorch's kv_cache_dtype float16): the kernel reads each fp16 key and value as the fp32
    value it is, so it matches the torch op on the same fp16 cache as closely as the fp32 kernel matches fp32."""
    T, start, Hq, Hkv, D, ks, st, B, init, W, topk, dense_len = case
    g = torch.Generator().manual_seed(T * 1000 + start + 1)
    L = start + T
    q = torch.randn(1, T, Hq, D, generator=g)
    k = torch.randn(1, L + 7, Hkv, D, generator=g).half()
    v = torch.randn(1, L + 7, Hkv, D, generator=g).half()
    ref = infllm_attention_reference(q, k, v, start, ks, st, B, init, W, topk, dense_len, 0)
    out = torch.zeros_like(q)
    kernels.pocketllm_infllm_attention_f16kv(ptr(q), ptr(k), ptr(v), I(T), I(Hq), I(Hkv), I(D), I(start), I(ks),
                                             I(st), I(B), I(init), I(W), I(topk), I(dense_len), I(0), ptr(out))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    wide, k32, v32 = torch.zeros_like(q), k.float(), v.float()  # the fp32 kernel on the widened cache: the same
    kernels.pocketllm_infllm_attention(ptr(q), ptr(k32), ptr(v32), I(T), I(Hq), I(Hkv), I(D), I(start),
                                       I(ks), I(st), I(B), I(init), I(W), I(topk), I(dense_len), I(0), ptr(wide))
    torch.testing.assert_close(out, wide, atol=1e-6, rtol=1e-6)


# Long random contexts (acceptance of issue #9 item 7): T, start_pos, Hq, Hkv, head_dim, sparse config. GQA groups
# of 2, 8 and 16; decode steps, prefill chunks and a whole prompt; the released config where the context is long
# enough for it to drop blocks (96 of 256 blocks at 16K), a smaller budget elsewhere.
RELEASED = SparseSpec(dense_len=-1)
SMALL = SparseSpec(window_size=256, topk=8, dense_len=-1)
LONG_CASES = {
    "decode-16K-gqa8": (1, 16383, 16, 2, 64, RELEASED),
    "decode-16K-gqa16": (1, 16383, 32, 2, 128, RELEASED),
    "decode-12K-gqa2": (1, 12000, 4, 2, 64, RELEASED),
    "chunk-8K-gqa16": (64, 8192, 32, 2, 64, RELEASED),
    "chunk-6K-gqa8": (128, 6000, 16, 2, 64, SMALL),
    "chunk-4K-gqa2": (256, 4000, 4, 2, 64, SMALL),
    "prompt-2K-gqa2": (2048, 0, 4, 2, 32, SMALL),
}


@pytest.mark.parametrize("score_rule", ["upstream", "exact"])
@pytest.mark.parametrize("case", LONG_CASES)
def test_infllm_block_scores_are_bit_identical_in_all_three_engines(kernels, case, score_rule):
    """C++ kernel, torch op and numpy reference compute the same float64 block scores, bit for bit (docs/infllm_v2.md
    step 3a: fixed order of IEEE operations), hence the same selection, including every tie."""
    T, start, Hq, Hkv, D, sparse = LONG_CASES[case]
    sparse = SparseSpec(**{**sparse.__dict__, "score_rule": score_rule})
    rule = SCORE_RULE_CODES[score_rule]
    L = start + T
    g = torch.Generator().manual_seed(L * 7 + Hq)
    q = torch.randn(1, T, Hq, D, generator=g) * 2
    k = torch.randn(1, L, Hkv, D, generator=g)
    n_blocks = (L + sparse.block_size - 1) // sparse.block_size
    args = (I(T), I(Hq), I(Hkv), I(D), I(start), I(sparse.kernel_size), I(sparse.kernel_stride), I(sparse.block_size))

    cpp = torch.zeros(Hkv, T, n_blocks, dtype=torch.float64)
    kernels.pocketllm_infllm_block_scores(ptr(q), ptr(k), *args, I(rule), ptr(cpp))
    ours = infllm_block_scores(q[0], k[0], start, sparse.kernel_size, sparse.kernel_stride, sparse.block_size, rule)
    positions = np.arange(start, L)
    group = reference.kernel_scores(q[0].numpy(), k[0].numpy(), positions, sparse)
    theirs = reference.block_scores(group, n_blocks, sparse)
    assert torch.equal(cpp, ours), "C++ block scores differ from the torch op's"
    assert np.array_equal(ours.numpy(), theirs), "torch block scores differ from the numpy reference's"

    mask = torch.zeros(Hkv, T, n_blocks, dtype=torch.uint8)
    kernels.pocketllm_infllm_block_mask(ptr(q), ptr(k), *args, I(sparse.init_blocks), I(sparse.window_size),
                                        I(sparse.topk), I(rule), ptr(mask))
    expected = infllm_block_mask(q[0], k[0], start, sparse.kernel_size, sparse.kernel_stride, sparse.block_size,
                                 sparse.init_blocks, sparse.window_size, sparse.topk, rule)
    assert torch.equal(mask, expected.to(torch.uint8))
    assert np.array_equal(expected.numpy(), reference.select_blocks(theirs, positions, sparse))
    # The selection is sparse: the last query drops blocks it could read.
    assert mask[:, -1].sum(dim=-1).max().item() == sparse.budget < L // sparse.block_size


def test_infllm_selection_ties_prefer_lower_block(kernels):
    """Identical keys everywhere: every candidate block scores the same, the lowest indices must win."""
    T, Hq, Hkv, D, start = 1, 2, 1, 8, 511
    q = torch.ones(1, T, Hq, D)
    k = torch.ones(1, 512, Hkv, D)
    args = (32, 16, 64, 1, 64, 4)  # kernel, stride, block, init, window, topk: budget 5 = 3 forced + 2
    for rule in (0, 1):
        expected = infllm_block_mask(q[0], k[0, :512], start, *args, rule).to(torch.uint8)
        mask = torch.zeros(Hkv, T, 8, dtype=torch.uint8)
        kernels.pocketllm_infllm_block_mask(ptr(q), ptr(k), I(T), I(Hq), I(Hkv), I(D), I(start), *map(I, args),
                                            I(rule), ptr(mask))
        assert torch.equal(mask, expected)
        assert mask[0, 0].tolist() == [1, 1, 1, 0, 0, 0, 1, 1]  # init 0, top-2 of 1..5 = 1, 2, local 6, 7


# ------------------------------------------------------------------------------------------ ONNX decomposition
ONNX_SPARSE = SparseSpec(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=64, topk=2,
                         dense_len=-1)


@pytest.fixture(scope="module", params=["upstream", "exact"])
def onnx_selection(request, tmp_path_factory):
    """export/targets/onnx/decompose.py's steps 2-6 alone as an ONNX graph in onnxruntime: (q [T, Hq, D],
    k [L, Hkv, D]) -> (block scores float64 [Hkv, T, n_blocks], selection bool), queries at the last T positions."""
    ort = pytest.importorskip("onnxruntime")
    from torch.export import Dim

    from pocketllm.export.targets.onnx import decompose

    sparse = SparseSpec(**{**ONNX_SPARSE.__dict__, "score_rule": request.param})

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", decompose.constants_table(16))

        def forward(self, q, k):
            L, T, B = k.shape[0], q.shape[0], sparse.block_size
            pos = torch.arange(T) + (L - T)
            group = decompose.kernel_scores(q, k, pos, sparse, self.table)
            scores = decompose.block_scores(group, (L + B - 1) // B, sparse)
            return scores, decompose.select_blocks(scores, pos, sparse)

    path = tmp_path_factory.mktemp("onnx-infllm") / f"selection-{request.param}.onnx"
    with torch.no_grad():
        torch.onnx.export(Probe(), (torch.randn(7, 4, 16), torch.randn(200, 2, 16)), str(path), dynamo=True,
                          input_names=["q", "k"], output_names=["scores", "selected"], optimize=False,
                          dynamic_shapes=({0: Dim("T", min=1)}, {0: Dim("L", min=1)}))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return sparse, ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_onnx_block_scores_and_selection_are_bit_identical(onnx_selection):
    """onnxruntime computes the reference's float64 block scores bit for bit (ordered sums as CumSum, exp_fixed
    with Pow(2, k)), hence the same blocks, ties included: block-periodic keys make every block score equal, so only
    the lower-index rule decides. Short contexts (fewer keys than one kernel) select the forced blocks only."""
    sparse, session = onnx_selection
    rng = np.random.default_rng(1)
    dropped = 0
    for L, T in [(5, 5), (31, 31), (33, 2), (200, 200), (450, 450), (700, 1), (1000, 300), (1001, 1)]:
        for periodic in (False, True):
            q = (rng.standard_normal((T, 4, 16)) * 2).astype(np.float32)
            k = rng.standard_normal((L, 2, 16)).astype(np.float32)
            if periodic:
                k = np.tile(k[:64], (L // 64 + 1, 1, 1))[:L]
            pos = np.arange(L - T, L)
            want = reference.block_scores(reference.kernel_scores(q, k, pos, sparse), -(-L // 64), sparse)
            scores, selected = session.run(None, {"q": q, "k": k})
            assert scores.dtype == np.float64 and np.array_equal(scores, want), (L, T, periodic)
            assert np.array_equal(selected, reference.select_blocks(want, pos, sparse)), (L, T, periodic)
            dropped += int((selected.sum(-1) < (pos // 64 + 1)).any())
    assert dropped >= 6
