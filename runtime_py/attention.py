"""Softmax attention over a KV cache: grouped-query, with an arbitrary visibility mask.

Dense causal and sliding-window attention are masks over the same computation; InfLLM v2 (infllm.py) builds its
own per-KV-head mask from the selected blocks and calls `masked_attention` too.

GQA head grouping: query head h reads KV head h // G (G = query heads per KV head), as upstream's repeat_kv does.
"""

from __future__ import annotations

import numpy as np

SCORE_ELEMENTS = 1 << 23  # attention scores held at once (32 MiB of float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax; rows that are entirely -inf come out as all zeros instead of NaN."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _softmax_inplace(x: np.ndarray) -> np.ndarray:
    """softmax over the last axis, reusing x's memory (the score tensors are the largest arrays we make)."""
    m = np.max(x, axis=-1, keepdims=True)
    np.subtract(x, np.where(np.isfinite(m), m, 0.0).astype(x.dtype), out=x)
    np.exp(x, out=x)
    total = np.sum(x, axis=-1, keepdims=True)
    x /= np.where(total > 0, total, 1.0).astype(x.dtype)
    return x


def causal_mask(start_pos: int, T: int, L: int, window: int | None = None) -> np.ndarray:
    """bool [T, L]: query t (absolute position i = start_pos + t) sees key j iff j <= i and, with a sliding
    window, i - j < window."""
    i = np.arange(start_pos, start_pos + T)[:, None]
    j = np.arange(L)[None, :]
    visible = j <= i
    if window is not None:
        visible &= (i - j) < window
    return visible


def masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Exact softmax attention, scale 1/sqrt(head_dim), fp32.

    q: [T, Hq, D]; k, v: [L, Hkv, D]; mask: bool [T, L] (shared by all heads) or [Hkv, T, L] (per KV head,
    shared by the query heads of its group). Returns [T, Hq, D].
    Queries run in chunks so that the score tensor stays near SCORE_ELEMENTS floats for long prompts.
    """
    T, Hq, _ = q.shape
    L = k.shape[0]
    chunk = max(1, SCORE_ELEMENTS // (Hq * L))
    if T <= chunk:
        return _masked_attention(q, k, v, mask)
    parts = [_masked_attention(q[t:t + chunk], k, v, mask[..., t:t + chunk, :]) for t in range(0, T, chunk)]
    return np.concatenate(parts, axis=0)


def _masked_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    T, Hq, D = q.shape
    L, Hkv, _ = k.shape
    G = Hq // Hkv
    # One [G*T, D] x [D, L] product per KV head: the G query heads of a group are stacked along the rows.
    qg = np.ascontiguousarray(q.reshape(T, Hkv, G, D).transpose(1, 2, 0, 3)).reshape(Hkv, G * T, D)
    kt = k.transpose(1, 2, 0)  # [Hkv, D, L]
    vt = v.transpose(1, 0, 2)  # [Hkv, L, D]
    scores = (qg @ kt).reshape(Hkv, G, T, L) * np.float32(1.0 / np.sqrt(D))  # [Hkv, G, T, L]
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None]  # -> [1|Hkv, 1, T, L]
    np.copyto(scores, np.float32(-np.inf), where=~mask)
    probs = _softmax_inplace(scores).reshape(Hkv, G * T, L)
    out = (probs @ vt).reshape(Hkv, G, T, D)
    return np.ascontiguousarray(out.transpose(2, 0, 1, 3)).reshape(T, Hq, D)


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                     window: int | None = None) -> np.ndarray:
    """Causal (optionally sliding-window) attention of T new queries over the first L = start_pos + T cache rows.

    q: [T, Hq, D] at positions start_pos .. start_pos + T - 1; k, v: [L, Hkv, D]. Returns [T, Hq, D].
    """
    T, L = q.shape[0], k.shape[0]
    return masked_attention(q, k, v, causal_mask(start_pos, T, L, window))
