"""Dense, sliding-window and grouped-query attention in the numpy reference (runtime_py/attention.py)."""

from __future__ import annotations

import numpy as np

from pocketllm.runtime_py.attention import causal_attention, causal_mask, masked_attention, softmax


def test_causal_mask_for_a_chunk_after_cached_tokens():
    # 2 new queries at positions 3 and 4 over 5 keys
    assert causal_mask(3, 2, 5).astype(int).tolist() == [[1, 1, 1, 1, 0],
                                                         [1, 1, 1, 1, 1]]


def test_sliding_window_sees_the_last_window_keys_including_itself():
    # window 2: key j is visible to query i iff i - j < 2
    assert causal_mask(3, 2, 5, window=2).astype(int).tolist() == [[0, 0, 1, 1, 0],
                                                                   [0, 0, 0, 1, 1]]


def test_keys_outside_the_window_do_not_matter():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 8)), rng.standard_normal((10, 1, 8)), rng.standard_normal((10, 1, 8))
    out = causal_attention(q, k, v, 9, window=4)
    k[:6], v[:6] = 100.0, -100.0  # only keys 6..9 are inside the window of query 9
    np.testing.assert_array_equal(causal_attention(q, k, v, 9, window=4), out)


def test_query_heads_share_kv_heads_in_consecutive_groups():
    """Query head h reads KV head h // G: heads 0-1 use KV head 0, heads 2-3 use KV head 1."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4, 8)), rng.standard_normal((3, 2, 8)), rng.standard_normal((3, 2, 8))
    out = causal_attention(q, k, v, 0)
    for h in range(4):
        g = h // 2
        for t in range(3):
            s = q[t, h] @ k[: t + 1, g].T / np.sqrt(8)
            a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(out[t, h], a @ v[: t + 1, g], rtol=1e-6, atol=1e-6)


def test_per_kv_head_masks():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 4)), rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 4))
    mask = np.array([[[True, False, False]], [[False, False, True]]])  # [Hkv, T, L]
    out = masked_attention(q, k, v, mask)
    np.testing.assert_allclose(out[0, 0], v[0, 0])  # a single visible key gets all the weight
    np.testing.assert_allclose(out[0, 1], v[2, 1])


def test_softmax_of_a_fully_masked_row_is_zero_not_nan():
    assert softmax(np.array([[-np.inf, -np.inf], [0.0, 0.0]])).tolist() == [[0.0, 0.0], [0.5, 0.5]]


def test_long_prompts_are_processed_in_query_chunks_with_the_same_result(monkeypatch):
    import pocketllm.runtime_py.attention as attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((50, 4, 8)).astype(np.float32),
               rng.standard_normal((60, 2, 8)).astype(np.float32), rng.standard_normal((60, 2, 8)).astype(np.float32))
    whole = causal_attention(q, k, v, 10, window=20)
    monkeypatch.setattr(attention, "SCORE_ELEMENTS", 4 * 60 * 7)  # 7 queries per chunk
    np.testing.assert_allclose(causal_attention(q, k, v, 10, window=20), whole, rtol=1e-6, atol=1e-6)
