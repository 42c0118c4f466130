"""Engine-agnostic evaluation loops over any engine with `forward(tokens int64 [T], start_pos) -> logits float32
[T, vocab]` and `reset()` (the reference model, the torch engine, any artifact runner): logits of a token sequence,
and perplexity over a text."""

from __future__ import annotations

import numpy as np


def run_logits(engine, tokens: list[int], mode: str) -> np.ndarray:
    """[T, vocab] fp32: one prefill call, or one token per step through the cache."""
    engine.reset()
    ids = np.asarray(tokens, dtype=np.int64)
    if mode == "prefill":
        return np.asarray(engine.forward(ids, 0), dtype=np.float32)
    return np.concatenate([engine.forward(ids[i:i + 1], i) for i in range(len(ids))]).astype(np.float32)


def perplexity_of(engine, ids: list[int], bos_id: int | None, context: int, progress=None) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) and token count over non-overlapping windows."""
    step = context - 1 if bos_id is not None else context
    total_nll, count = 0.0, 0
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        window = ([bos_id] if bos_id is not None else []) + chunk
        if len(window) < 2:
            break
        engine.reset()
        logits = np.asarray(engine.forward(np.asarray(window, dtype=np.int64), 0), dtype=np.float64)[:-1]
        targets = np.asarray(window[1:])
        m = logits.max(axis=-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1)))
        total_nll += float((logz - logits[np.arange(len(targets)), targets]).sum())
        count += len(targets)
        if progress:
            progress(len(chunk))
    return total_nll / max(count, 1), count
