"""Token generation over any engine with `forward(tokens int64 [T], start_pos) -> logits float32 [T, V]` and
`reset()`: the numpy reference model, or an artifact runner (ExecuTorch, ONNX Runtime, Core ML).

The prompt is prefilled in one forward call, whose last row gives the first new token; every further token costs
one single-token forward. Prefill and decode are timed separately (wall clock), so tokens/s mean the same thing for
every engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError


class Engine(Protocol):
    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray: ...

    def reset(self) -> None: ...


@dataclass
class GenerationResult:
    tokens: list[int]  # generated ids only (not the prompt); ends with the EOS id when one stopped generation
    prefill_seconds: float  # the prompt's forward call
    decode_seconds: float  # all single-token forward calls together
    decode_tokens_per_s: float  # single-token forward calls per second (0.0 when there were none)
    prefill_tokens_per_s: float  # prompt tokens per second
    stopped_on_eos: bool = False


def sample_next(logits: np.ndarray, rng: np.random.Generator, *, greedy: bool, temperature: float,
                top_p: float) -> int:
    """Pick one id from a logits row [V].

    Greedy: argmax (ties -> lowest id). Otherwise softmax(logits / temperature) restricted to the nucleus: the
    most probable ids, best first (ties -> lower id), up to and including the first one at which their cumulative
    probability reaches top_p; renormalised and sampled with `rng`.
    """
    if greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    mass_before = np.cumsum(sorted_p) - sorted_p
    keep = order[mass_before < top_p]  # never empty: the first id has 0 mass before it
    kept = p[keep] / p[keep].sum()
    return int(keep[rng.choice(keep.size, p=kept)])


def generate(engine: Engine, prompt_ids: Sequence[int] | np.ndarray, max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, eos_ids: Sequence[int] = (),
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Generate up to max_new_tokens ids after prompt_ids, starting from an empty cache (engine.reset()).

    Stops early right after producing an id in eos_ids (that id is included in the result). on_token(id) is
    called for every generated id, as soon as it is chosen (EOS included), for streaming.
    Sampling (greedy=False) uses numpy's default_rng(seed): the same seed gives the same tokens.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if prompt.size == 0:
        raise PocketllmError("generate: the prompt must hold at least one token (e.g. BOS)")
    if max_new_tokens < 0:
        raise PocketllmError(f"generate: max_new_tokens must be >= 0 (got {max_new_tokens})")
    if not greedy and not temperature > 0:
        raise PocketllmError(f"generate: temperature must be > 0 when sampling (got {temperature})")
    if not 0 < top_p <= 1:
        raise PocketllmError(f"generate: top_p must be in (0, 1] (got {top_p})")
    if max_new_tokens == 0:
        return GenerationResult([], 0.0, 0.0, 0.0, 0.0)

    rng = np.random.default_rng(seed)
    eos = set(int(e) for e in eos_ids)

    def pick(row: np.ndarray) -> int:
        return sample_next(row, rng, greedy=greedy, temperature=temperature, top_p=top_p)

    engine.reset()
    t0 = time.perf_counter()
    logits = engine.forward(prompt, 0)
    prefill_seconds = time.perf_counter() - t0

    tokens: list[int] = []
    decode_seconds = 0.0
    pos = prompt.size
    while True:
        token = pick(np.asarray(logits)[-1])
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos or len(tokens) == max_new_tokens:
            break
        t0 = time.perf_counter()
        logits = engine.forward(np.array([token], dtype=np.int64), pos)
        decode_seconds += time.perf_counter() - t0
        pos += 1

    steps = len(tokens) - 1  # single-token forward calls made
    return GenerationResult(
        tokens=tokens,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        decode_tokens_per_s=steps / decode_seconds if steps and decode_seconds > 0 else 0.0,
        prefill_tokens_per_s=prompt.size / prefill_seconds if prefill_seconds > 0 else 0.0,
        stopped_on_eos=tokens[-1] in eos,
    )
