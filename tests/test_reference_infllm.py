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

from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import families, spec_from_config
from pocketllm.export.spec import SparseSpec
from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.ops.infllm_attention import compressed_keys, exp_fixed, infllm_attention, kernel_range, kernel_scores

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
