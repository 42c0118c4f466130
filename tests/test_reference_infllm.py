"""InfLLM v2 in the numpy reference (runtime_py/infllm.py), checked against docs/infllm_v2.md.

Three kinds of evidence: tiny cases whose selected blocks are worked out by hand below, a per-query loop that
reads the doc's steps literally (the vectorised code must pick exactly the same blocks), and equality with dense
attention when the budget covers every block or the dense fallback applies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pocketllm.export.spec import SparseSpec
from pocketllm.runtime_py.attention import causal_attention
from pocketllm.runtime_py.ops.infllm_attention import compressed_keys, infllm_attention, kernel_range

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
    k = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float32)
    kc = compressed_keys(k, SparseSpec())
    assert kc.shape == (5, 2, 8)  # floor((100 - 32) / 16) + 1
    np.testing.assert_allclose(kc[3], k[48:80].mean(axis=0), rtol=1e-6, atol=1e-7)
    assert compressed_keys(k[:31], SparseSpec()).shape == (0, 2, 8)


# ---------------------------------------------------------------------------- the doc's steps, one query at a time


def selection_by_the_letter(q: np.ndarray, k: np.ndarray, start_pos: int, sp: SparseSpec) -> np.ndarray:
    """docs/infllm_v2.md steps 2-6 with explicit loops over KV heads, queries, kernels and blocks."""
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    n_blocks = math.ceil(L / sp.block_size)
    n_kernels = (L - sp.kernel_size) // sp.kernel_stride + 1 if L >= sp.kernel_size else 0
    kc = [k[sp.kernel_stride * j: sp.kernel_stride * j + sp.kernel_size].mean(axis=0) for j in range(n_kernels)]
    selected = np.zeros((Hkv, T, n_blocks), dtype=bool)
    for h in range(Hkv):
        for t in range(T):
            i = start_pos + t
            seen = [j for j in range(n_kernels) if sp.kernel_stride * j + sp.kernel_size - 1 <= i]
            group = dict.fromkeys(seen, 0.0)
            for hq in range(h * G, (h + 1) * G):
                logits = np.array([q[t, hq] @ kc[j][h] / np.sqrt(D) for j in seen], dtype=np.float32)
                p = np.exp(logits - logits.max()) if seen else logits
                for j, pj in zip(seen, p / p.sum() if seen else p):
                    group[j] += pj
            score = {}
            for b in range(n_blocks):
                touching = [group[j] for j in seen if sp.kernel_stride * j <= sp.block_size * b + sp.block_size - 1
                            and sp.kernel_stride * j + sp.kernel_size - 1 >= sp.block_size * b]
                score[b] = max(touching) if touching else -np.inf
            b_q = i // sp.block_size
            forced = [b for b in range(b_q + 1) if b < sp.init_blocks or b >= b_q - sp.window_size // sp.block_size]
            others = [b for b in range(b_q + 1) if b not in forced and np.isfinite(score[b])]
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


@pytest.mark.parametrize("case", CASES)
def test_vectorised_selection_equals_a_per_query_reading_of_the_doc(case):
    sparse, Hq, Hkv, D, L, T = CASES[case]
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


@pytest.mark.parametrize("start_pos, T", [(0, 600), (550, 50), (599, 1)])
def test_a_budget_covering_every_block_is_dense_attention(start_pos, T):
    sparse = SparseSpec(32, 16, 1, 64, 128, 8, False, -1)  # budget 10 blocks = all of 600 tokens
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
