"""runtime_py.generate: the generation loop shared by the reference model and every artifact runner.

A scripted engine stands in for a model: its logits make token (t + 1) % V the favourite after token t, so the
expected greedy continuation is obvious, and it records every forward call.
"""

from __future__ import annotations

import numpy as np
import pytest

from pocketllm.export.errors import PocketllmError
from pocketllm.runtime_py import generate
from pocketllm.runtime_py.generate import sample_next

V = 10


class CountingEngine:
    """Logits favour (last token + 1) % V; records (tokens, start_pos) of every call."""

    def __init__(self):
        self.calls: list[tuple[list[int], int]] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        assert tokens.dtype == np.int64 and tokens.ndim == 1
        self.calls.append((tokens.tolist(), start_pos))
        logits = np.zeros((tokens.size, V), dtype=np.float32)
        logits[np.arange(tokens.size), (tokens + 1) % V] = 5.0
        return logits


def test_greedy_prefills_once_then_decodes_one_token_per_call():
    engine = CountingEngine()
    result = generate(engine, [3, 4], 4)
    assert result.tokens == [5, 6, 7, 8]
    assert engine.resets == 1
    # the last token is never fed back: 1 prefill + 3 decode calls for 4 tokens
    assert engine.calls == [([3, 4], 0), ([5], 2), ([6], 3), ([7], 4)]
    assert not result.stopped_on_eos
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.decode_tokens_per_s == pytest.approx(3 / result.decode_seconds)
    assert result.prefill_tokens_per_s == pytest.approx(2 / result.prefill_seconds)


def test_generation_stops_right_after_an_eos_token_and_streams_every_token():
    engine, streamed = CountingEngine(), []
    result = generate(engine, [1], 20, eos_ids=(9, 4), on_token=streamed.append)
    assert result.tokens == [2, 3, 4]  # 4 is an EOS id: kept, then stop
    assert streamed == [2, 3, 4] and result.stopped_on_eos
    assert len(engine.calls) == 3


def test_greedy_is_deterministic_and_sampling_is_reproducible_per_seed():
    assert generate(CountingEngine(), [0], 6).tokens == generate(CountingEngine(), [0], 6).tokens
    sampled = [generate(CountingEngine(), [0], 30, greedy=False, temperature=3.0, seed=s).tokens for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_zero_new_tokens_runs_nothing():
    engine = CountingEngine()
    assert generate(engine, [1, 2], 0).tokens == [] and engine.calls == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[]), "at least one token"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(greedy=False, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    args = dict(prompt_ids=[1], max_new_tokens=3) | kwargs
    with pytest.raises(PocketllmError, match=message):
        generate(CountingEngine(), **args)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    # probabilities 0.5, 0.3, 0.2 (ids 2, 0, 1): top_p 0.7 keeps ids 2 and 0 (0.5 < 0.7, then 0.8 >= 0.7)
    logits = np.log(np.array([0.3, 0.2, 0.5]))
    rng = np.random.default_rng(0)
    draws = {sample_next(logits, rng, greedy=False, temperature=1.0, top_p=0.7) for _ in range(300)}
    assert draws == {0, 2}
    draws = {sample_next(logits, rng, greedy=False, temperature=1.0, top_p=0.4) for _ in range(50)}
    assert draws == {2}  # the best id alone already covers 0.4
    draws = {sample_next(logits, rng, greedy=False, temperature=1.0, top_p=1.0) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_greedy_ties_pick_the_lowest_id():
    assert sample_next(np.array([1.0, 3.0, 3.0]), np.random.default_rng(0), greedy=True, temperature=1.0,
                       top_p=1.0) == 1
