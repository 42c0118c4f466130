"""Parity: a bundle's artifact (any runner) against the numpy reference on real prompts.

For each prompt both engines prefill it, then run `steps` greedy steps in lockstep, each fed the reference's
greedy token. Per step: max |delta logit| over the vocabulary and whether the two argmaxes agree. As long as every
step agrees, the artifact's own greedy continuation is identical to the reference's (same inputs, same argmax), so
"identical continuation" = every top-1 agrees; the first disagreement is reported. The reference runs the bundle's
own `reference/` weights (for quantized bundles: the quantized checkpoint, i.e. exactly the artifact's weights),
so a bundle copied anywhere can be checked.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

# Real prompts of different kinds (prose, code, numbers, dialogue, multilingual); long enough together with 64
# steps to cross InfLLM v2's dense_len on the tiny presets when it is small.
DEFAULT_PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families,",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "def main():\n    for i in range(10):\n        print(i, fibonacci(i))\n",
    "In 1969, Apollo 11 landed on the Moon. The mission launched on July 16 and returned on July 24; "
    "3 + 4 = 7 and the square root of 144 is 12. Q: What is the capital of France? A:",
    "Bonjour le monde! ¿Dónde está la biblioteca? 你好，世界。 The quick brown fox jumps over the lazy dog, and "
    "the five boxing wizards jump quickly. Pack my box with five dozen liquor jugs. She sells sea shells by the",
    # Long enough (~450+ tokens on an 8K-vocabulary BPE) for InfLLM v2 to drop blocks on small sparse configs;
    # truncated to the bundle's context when it does not fit.
    "The family of Dashwood had long been settled in Sussex, and their estate was large, but the letter which arrived "
    "on a wet Tuesday in November changed everything that the sisters had supposed about their prospects. Elinor read "
    "it twice by the window before she said a word, and Marianne, who watched her face, knew at once that the news "
    "was not good. Their mother was away visiting a friend in the next parish, and the house felt very quiet. "
    "\"We must be sensible,\" said Elinor at last, folding the paper with great care. \"There is nothing to be gained "
    "by despair, and a great deal to be lost by haste.\" Marianne declared that sense was the coldest of all virtues, "
    "that a heart which could fold a letter so neatly after such a blow could hardly be said to feel at all. Elinor "
    "only smiled, and asked whether the fire wanted more coal. The rain continued all that afternoon. Towards evening "
    "a carriage was heard on the gravel, and both sisters ran to the hall, expecting their mother; but it was a "
    "stranger, a tall gentleman in a grey coat, who begged pardon for the intrusion and asked the way to Barton. He "
    "had lost the road in the storm, he said, and his horse was tired. Elinor offered him tea while the servant saw to "
    "the horse, and he accepted with evident relief. He spoke little at first, but he listened well, and when Marianne "
    "mentioned the poet she most admired, he answered with a warmth that made her colour. By the time the horse was "
    "ready the rain had stopped, and the gentleman seemed in no great hurry to leave. He promised to call again when "
    "he had settled his business at Barton, and he kept his word sooner than anyone expected. Within a week he was a "
    "regular visitor, and the neighbours began to talk. Mrs. Jennings, who talked more than any of them, was certain "
    "that there would be a wedding before the spring, though she could not decide which of the sisters",
]
DEFAULT_TOLERANCE = {"none": 1e-3, "any4": 1e-3, "int4": 1e-3, "int8": 1e-3, "nf4": 1e-3}
# (a W4A8 bundle's scheme is any4: the same 1e-3, against a reference that reproduces its int8 activations)
# 8da4w quantizes activations dynamically inside XNNPACK: no reference runs those exact numerics, so its deltas
# against the float reference are reported, and only top-1 agreement is required.
MIN_TOP1_UNMATCHED = 0.9
# ROUTER_TIES. A mixture-of-experts router keeps its top-k logits. Where the k-th and the best one left out stand
# closer than an exact contract's tolerance, an engine that matches the reference to that tolerance may route the token
# to the other expert, and that position's logits then differ by far more (measured 2026-12-02: a random-weight MiniMax
# int8 Core ML bundle in fp32 mode, |delta| <= 8.4e-4 everywhere but one decode step, 0.13, where the reference's
# margin was 1.8e-4, the smallest of the prompt's 156 positions). So under an exact contract, when a prompt's first
# position past the tolerance is such a near-tie (the reference's smallest margin over the layers there within the
# tolerance), the reference is replayed with that layer sending that token to the runner-up expert instead
# (mlp.RouterTrace), and from that position on the artifact is held to the replay: the same tolerance at every
# position and the same greedy tokens. Nothing is left uncompared; an artifact that departs for any other reason does
# not match the replay either and fails. The report names each such tie (`router_ties`).
# W4A8 (quantization.activations "int8"): the reference reproduces the kernel's numerics bit for bit (the op tests
# hold the kernel to that on the same inputs), but each engine rounds every activation to int8 from its own fp32
# input, and those differ in the last bits (norms, attention and sums run in other orders). An activation near a
# rounding boundary then rounds the other way, and in a deep model those one-step flips compound: on tiny-austen
# (8 layers) a difference of one fp32 rounding already moves the logits ~1e-2 (benchmarks/w4a8_sensitivity.py), so no
# fixed tolerance separates rounding from a defect. The contract is measured against the reference's own noise floor:
# the reference runs again with every int8-rounded activation moved by a relative W4A8_JITTER * N(0, 1) (8 fp32 ulps,
# the top of what summation order does), and the artifact's per-position |delta| must be no larger than that
# run's, up to W4A8_NOISE_FACTOR, at the median and the 90th percentile (plus the exact tolerance, for models too
# shallow to flip at all); its top-1 disagreement at most W4A8_NOISE_FACTOR x the noise run's + W4A8_TOP1_SLACK.
# Calibration (2026-12-01, tiny-austen W4A8 bundle, 3 prompts x 32 steps; median / p90 of |delta|): the .pte
# 0.0066 / 0.0145; jitter 1e-7 0.0068 / 0.0175, 2^-20 0.0119 / 0.0249; the same weights with fp32 activations (a
# bundle running exact any4 under a W4A8 label) 0.0367 / 0.0662, which fails. On the random-weight 0.5b preset the
# floor itself is ~0.9 logits with 42% top-1 agreement (chaotic: the contract can tell little there; the op tests and
# trained models carry the weight), and its .pte sits on it (0.90 / 1.10 vs 0.92 / 1.10, top-1 35%).
W4A8_JITTER = 2.0 ** -20
W4A8_NOISE_FACTOR = 1.5
W4A8_QUANTILES = (0.5, 0.9)
W4A8_TOP1_SLACK = 0.02


def read_prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    from pocketllm.export.paths import read_text_file

    text = read_text_file(Path(path), "prompts file")
    lines = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not lines:
        raise PocketllmError(f"{path}: no prompts (one per line)")
    return lines


def _infllm_engaged(reference, start_pos: int, block_size: int) -> bool | None:
    """Did any InfLLM v2 layer of the last call leave a valid block out? None when no layer is InfLLM."""
    sels = [s for s in getattr(reference, "last_selection", []) if s is not None]
    if not sels:
        return None
    for sel in sels:  # [Hkv, T, n_blocks]
        T = sel.shape[1]
        valid = (start_pos + np.arange(T)) // block_size + 1  # blocks 0..b_q
        if (sel.sum(axis=-1) < valid[None, :]).any():
            return True
    return False


class RecordedReference:
    """The reference's calls for one prompt, recorded on the first run and replayed on later ones (parity feeds
    every engine the reference's own greedy tokens, so every mode of a runner asks for the same calls)."""

    def __init__(self, reference, block_size: int | None):
        self.reference, self.block_size = reference, block_size
        self.calls: list[tuple[np.ndarray, bool | None, tuple[np.ndarray, np.ndarray] | None]] = []
        self.next = 0

    def reset(self) -> None:
        self.next = 0
        if not self.calls:
            self.reference.reset()

    def forward(self, tokens: np.ndarray, start_pos: int):
        """(logits, whether an InfLLM v2 layer left a valid block out: None when no layer is InfLLM, (each token's
        smallest router top-k margin, the layer of it): None without experts)."""
        if self.next == len(self.calls):
            logits = self.reference.forward(tokens, start_pos)
            engaged = _infllm_engaged(self.reference, start_pos, self.block_size) if self.block_size else None
            trace = getattr(self.reference, "router", None)
            routing = None if trace is None or trace.margin is None else (trace.margin.copy(), trace.layer.copy())
            self.calls.append((logits, engaged, routing))
        self.next += 1
        return self.calls[self.next - 1]

    def replay_runner_up(self, layer: int, position: int, calls: list[tuple[np.ndarray, int]]) -> list[np.ndarray]:
        """The reference's logits for `calls` [(tokens, start_pos)] with MoE layer `layer` sending the token at
        `position` to its runner-up expert (ROUTER_TIES). The recorded calls stay as they are."""
        trace = self.reference.router
        trace.runner_up = {layer: {position}}
        try:
            self.reference.reset()
            return [self.reference.forward(tokens, start) for tokens, start in calls]
        finally:
            trace.runner_up = {}
            self.reference.reset()


def compare_engines(reference, engine, prompt_ids: list[int], steps: int, block_size: int | None,
                    tie_tolerance: float | None = None) -> dict:
    """reference: the numpy model, or a RecordedReference of it. tie_tolerance: an exact contract's tolerance, for
    router near-ties (ROUTER_TIES); None: no tie handling."""
    if not isinstance(reference, RecordedReference):
        reference = RecordedReference(reference, block_size)
    reference.reset()
    engine.reset()
    ids = np.asarray(prompt_ids, dtype=np.int64)
    ref, engaged, routing = reference.forward(ids, 0)
    # per compared position (prefill rows, then steps): the reference's smallest router margin and its layer
    margins, layers = (None, None) if routing is None else (list(routing[0]), list(routing[1]))
    got = engine.forward(ids, 0)
    prefill_rows = np.abs(ref - got).max(axis=-1)  # per position
    prefill_delta = float(prefill_rows.max())
    tie = None  # the first position past tie_tolerance, when it is a near-tie: the artifact's rows from it on are kept
    departed = tie_tolerance is None or margins is None  # past the tolerance already (or no tie handling)
    if not departed:
        first = next((i for i, d in enumerate(prefill_rows) if d > tie_tolerance), None)
        departed = first is not None
        if departed and margins[first] <= tie_tolerance:
            tie = {"position": first, "rows": list(got[first:])}
    deltas, agree, ref_tokens, got_tokens = [], [], [], []
    pos = ids.size
    r_row, g_row = ref[-1], got[-1]
    for step in range(steps):
        r_tok, g_tok = int(np.argmax(r_row)), int(np.argmax(g_row))
        ref_tokens.append(r_tok)
        got_tokens.append(g_tok)
        agree.append(r_tok == g_tok)
        if step == steps - 1:
            break
        token = np.array([r_tok], dtype=np.int64)  # both engines are fed the reference's choice
        r_out, e, routing = reference.forward(token, pos)
        r_row = r_out[-1]
        if margins is not None:
            margins.append(routing[0][-1])
            layers.append(routing[1][-1])
        g_row = engine.forward(token, pos)[-1]
        deltas.append(float(np.abs(r_row - g_row).max()))
        if tie is not None:
            tie["rows"].append(g_row.copy())
        elif not departed and deltas[-1] > tie_tolerance:
            departed = True
            if margins[pos] <= tie_tolerance:
                tie = {"position": pos, "rows": [g_row.copy()]}
        if e is not None:
            engaged = bool(engaged) or bool(e)
        pos += 1
    first = next((i for i, a in enumerate(agree) if not a), None)
    if tie is not None:
        tie = _runner_up_replay(reference, ids, ref_tokens, tie, float(margins[tie["position"]]),
                                int(layers[tie["position"]]), got_tokens)
    return {
        "prompt_tokens": int(ids.size), "steps": steps,
        "max_abs_delta_prefill": prefill_delta,
        "per_position_max_abs_delta_prefill": [float(d) for d in prefill_rows],
        "max_abs_delta_steps": max(deltas) if deltas else 0.0,
        "per_step_max_abs_delta": deltas,
        "top1_agreement": float(np.mean(agree)),
        "continuation_identical": first is None,
        "first_divergence": first,
        "reference_continuation": ref_tokens,
        "artifact_continuation": got_tokens,
        "infllm_engaged": engaged,
        "per_position_router_margin": None if margins is None else
        [float(m) if np.isfinite(m) else None for m in margins],
        "router_tie": tie,
    }


def _runner_up_replay(reference: RecordedReference, ids: np.ndarray, ref_tokens: list[int], tie: dict,
                      margin: float, layer: int, got_tokens: list[int]) -> dict:
    """ROUTER_TIES: the reference replayed with `layer` sending the token at tie["position"] to its runner-up, and
    the artifact's rows from that position on (tie["rows"]) against it: max |delta| and the greedy tokens they pick."""
    P, p = ids.size, tie["position"]
    calls = [(ids, 0)] + [(np.array([t], dtype=np.int64), P + s) for s, t in enumerate(ref_tokens[:-1])]
    out = reference.replay_runner_up(layer, p, calls)
    replay = (list(out[0]) + [r[-1] for r in out[1:]])[p:]  # one row per position, from the tie on
    deltas = [float(np.abs(a - b).max()) for a, b in zip(tie["rows"], replay)]
    # greedy step s is decided at position P - 1 + s: the steps from the tie on, against the replay's choices
    steps = range(max(0, p - P + 1), len(got_tokens))
    same = all(got_tokens[s] == int(np.argmax(replay[P - 1 + s - p])) for s in steps)
    return {"position": p, "margin": margin, "layer": layer, "positions": len(deltas),
            "max_abs_delta_vs_runner_up": float(np.max(deltas)),  # NaN stays NaN (Python's max would skip it)
            "greedy_identical_vs_runner_up": same}


def manifest_score_rule(manifest: dict) -> str | None:
    """The InfLLM v2 score rule the bundle's artifacts use (an export option, so the manifest is where it lives; the
    reference weights' config.json cannot say it). None when no layer is InfLLM v2."""
    sparse = manifest.get("attention", {}).get("infllm_v2")
    if sparse is None:
        return None
    if "score_rule" not in sparse:  # written before the rule was an option (its kernels took no score_rule)
        raise PocketllmError("manifest.json: attention.infllm_v2 does not record its score_rule (a bundle from "
                             "before InfLLM v2 score rules); re-export it")
    return sparse["score_rule"]


def reference_for(bundle: Path, manifest: dict, checkpoint: Path | None, max_context: int,
                  float_weights: str | None = None, activation_jitter: float = 0.0, kv_cache_dtype: str = "float32"):
    """The numpy reference on the bundle's reference weights (or on `checkpoint` when given), with the numerics the
    artifact promises: InfLLM v2 blocks scored with the rule the manifest records; a W4A8 bundle
    (`quantization.activations` "int8") runs its decoder's any4 layers with int8 activations exactly as the kernel
    does, every other variant in fp32; float_weights "float16" rounds the weights as an fp16 artifact stores them;
    activation_jitter: the W4A8 noise-floor reference (ReferenceModel.from_checkpoint); kv_cache_dtype: the
    artifact's KV cache (its target entry's `kv_cache_dtype`), float16 rounding what the reference caches alike."""
    from pocketllm.runtime_py import ReferenceModel

    if checkpoint is None:
        ref = manifest.get("reference")
        if not ref:
            raise PocketllmError(f"{bundle}: the bundle holds no reference weights; pass --checkpoint DIR")
        path = bundle / ref["dir"]
    else:
        path = Path(checkpoint)
    q = manifest.get("quantization", {})
    # int8 activations the reference reproduces: W4A8 (any4 weights) only; 8da4w's run inside XNNPACK
    activations = q.get("activations", "fp32") if q.get("scheme") == "any4" else "fp32"
    return ReferenceModel.from_checkpoint(path, max_context=max_context, score_rule=manifest_score_rule(manifest),
                                          float_weights=float_weights, activations=activations,
                                          activation_jitter=activation_jitter, kv_cache_dtype=kv_cache_dtype), path


def runner_modes(target: str) -> dict[str, dict]:
    """A runner's parity modes (`PARITY_MODES` of runtime_py/runners/<target>): mode -> criteria. {} for a runner
    with one way to run."""
    import importlib

    from pocketllm.runtime_py.runners import runner_modules

    module = runner_modules().get(target)
    return dict(getattr(importlib.import_module(module), "PARITY_MODES", {})) if module else {}


def contract_criteria(tolerance: float | None, w4a8: bool) -> dict:
    """The criteria of a bundle's parity contract: exact variants |delta| <= tolerance everywhere with identical
    continuations; W4A8 within the reference's own noise floor (see W4A8_JITTER); unmatched numerics (8da4w,
    tolerance None) top-1 >= MIN_TOP1_UNMATCHED."""
    if tolerance is None:
        return {"min_top1": MIN_TOP1_UNMATCHED}
    if w4a8:
        return {"tolerance": tolerance, "noise_jitter": W4A8_JITTER, "noise_factor": W4A8_NOISE_FACTOR,
                "quantiles": list(W4A8_QUANTILES), "top1_slack": W4A8_TOP1_SLACK}
    return {"tolerance": tolerance, "identical": True}


def tie_tolerance(criteria: dict | None) -> float | None:
    """The tolerance within which router near-ties are resolved: an exact contract's; None for the W4A8 noise floor
    and for unmatched numerics (ROUTER_TIES)."""
    return None if not criteria or criteria.get("noise_jitter") is not None else criteria.get("tolerance")


def _positions(result: dict) -> list[float]:
    """One prompt's max |delta logit| per compared position: prefill positions, then greedy steps."""
    return result["per_position_max_abs_delta_prefill"] + result["per_step_max_abs_delta"]


def _rows(results: list[dict], ties: dict[int, dict] | None = None) -> np.ndarray:
    """Every compared position's max |delta logit| over the prompts; for a prompt with an accepted router near-tie
    (`ties`, by prompt index), against the reference up to the tie and against its runner-up replay from it on."""
    ties = ties or {}
    return np.array([d for i, r in enumerate(results) for d in (
        _positions(r)[:ties[i]["position"]] + [ties[i]["max_abs_delta_vs_runner_up"]] if i in ties
        else _positions(r))], dtype=np.float64)


def router_tie(result: dict, tolerance: float) -> dict | None:
    """The prompt's router near-tie when the artifact matches the reference's runner-up replay from it on (ROUTER_TIES):
    within `tolerance` at every position, the same greedy tokens. None otherwise."""
    tie = result.get("router_tie")
    within = lambda d: d <= tolerance  # noqa: E731 - False for NaN
    if not tie or not within(tie["margin"]) or not within(tie["max_abs_delta_vs_runner_up"]) \
            or not tie["greedy_identical_vs_runner_up"]:
        return None
    if not all(within(d) for d in _positions(result)[:tie["position"]]):  # (compare_engines found it first already)
        return None
    return tie


def noise_floor(results: list[dict], criteria: dict) -> dict:
    """The W4A8 noise floor: the jittered reference's |delta| quantiles and top-1 agreement against the reference."""
    rows = _rows(results)
    return {"jitter": criteria["noise_jitter"], "positions": int(rows.size),
            "quantiles": {str(q): float(np.quantile(rows, q)) for q in criteria["quantiles"]},
            "max_abs_delta": float(rows.max()), "top1_agreement": float(np.mean([r["top1_agreement"] for r in results]))}


def verdict(results: list[dict], criteria: dict, noise: dict | None = None) -> dict:
    """Summary of one run over the prompts and whether it passes `criteria`: tolerance (max |delta logit|, None =
    not required), identical (every greedy continuation the reference's), min_top1 (mean per-step top-1
    agreement); W4A8 (noise_jitter): `noise` = noise_floor(...) of the jittered reference, and the artifact's |delta|
    quantiles must stay within noise_factor x the floor's + tolerance, its top-1 disagreement within noise_factor x
    the floor's + top1_slack."""
    tolerance, exact = criteria.get("tolerance"), tie_tolerance(criteria)
    ties = {i: t for i, r in enumerate(results) if exact is not None and (t := router_tie(r, exact))}
    rows = _rows(results, ties)
    max_delta = float(rows.max()) if rows.size else 0.0
    top1 = float(np.mean([r["top1_agreement"] for r in results]))
    # greedy step s is decided at position prompt_tokens - 1 + s: from an accepted near-tie on, the tokens were held to
    # the runner-up replay's (router_tie)
    identical = all(r["continuation_identical"] or (i in ties and r["prompt_tokens"] - 1 + r["first_divergence"]
                                                    >= ties[i]["position"]) for i, r in enumerate(results))
    within = float(np.mean(rows <= tolerance)) if tolerance is not None and rows.size else None
    extra = {}
    if criteria.get("noise_jitter") is not None:
        if noise is None:
            raise ValueError("a W4A8 verdict needs the noise floor")
        factor = criteria["noise_factor"]
        quantiles = {str(q): float(np.quantile(rows, q)) for q in criteria["quantiles"]}
        bounds = {q: factor * v + tolerance for q, v in noise["quantiles"].items()}
        need_top1 = 1.0 - (factor * (1.0 - noise["top1_agreement"]) + criteria["top1_slack"])
        passed = all(quantiles[q] <= bounds[q] for q in bounds) and top1 >= need_top1
        names = " and ".join(f"p{round(float(q) * 100)}" for q in bounds)
        contract = (f"W4A8: |delta| {names} <= {factor} x the reference's own under {criteria['noise_jitter']:.1e} "
                    f"relative activation jitter + {tolerance}, top-1 agreement >= {need_top1:.1%}")
        extra = {"quantiles": quantiles, "bounds": bounds, "noise_floor": noise, "min_top1_here": need_top1}
    else:
        passed = tolerance is None or max_delta <= tolerance
        contract = (f"exact: |delta| <= {tolerance} at every position"
                    + (", identical greedy continuations" if criteria.get("identical") else "")
                    if tolerance is not None else f"unmatched numerics: top-1 agreement >= "
                    f"{criteria.get('min_top1', 0.0):.0%}")
        passed = passed and (not criteria.get("identical") or identical) and top1 >= criteria.get("min_top1", 0.0)
    if ties:
        extra["router_ties"] = [{"prompt": i, **t} for i, t in ties.items()]
        contract += (f"; {len(ties)} prompt(s) held to the reference with a near-tie token routed to the runner-up "
                     "expert from that position on")
    return {"passed": bool(passed), "max_abs_delta": max_delta, "positions_within_tolerance": within,
            "top1_agreement": top1, "continuations_identical": identical, "tolerance": tolerance,
            "contract": contract, "criteria": {k: v for k, v in criteria.items() if k != "doc"}, **extra}


def run_parity(bundle: Path, *, target: str | None = None, prompts_file: Path | None = None, steps: int = 64,
               checkpoint: Path | None = None, tolerance: float | None = None, threads: int | None = None,
               mode: str | None = None, engine=None, progress=None) -> dict:
    """Compare the bundle's `target` artifact (default: its first) with the reference; writes BUNDLE/parity.json
    (one section per target) and the summary into manifest.json. progress(done, total) after each prompt.

    A runner with several modes (`PARITY_MODES`, e.g. Core ML's interpreter: fp32 = the program's math, fp16 = what
    a phone computes) runs in each (or in `mode` only), each with its own criteria; the report holds one section
    per mode under `modes` and passes when every mode passes. `tolerance` overrides the max |delta logit| of the
    modes that bound it. The reference weights are rounded as the artifact stores them (entry `float_weights`).

    The bundle keeps its most thorough record per target: a run that compares fewer greedy steps in all (prompts x
    steps, over its modes) than the saved report is returned with `saved: False` and `kept` (the saved report's
    size), and nothing in the bundle changes. Prompts longer than the bundle's context allows (with `steps`) keep
    their beginning; each report says so (`prompt_truncated`, `prompt_tokens_full`)."""
    from pocketllm.export.atomic import write_json
    from pocketllm.export.bundle.manifest import MANIFEST, PARITY_FILE, add_parity, read_manifest
    from pocketllm.export.outputs import check_out_file
    from pocketllm.export.tokenizer import load_tokenizer
    from pocketllm.runtime_py.runners import open_runner

    bundle = Path(bundle)
    for name in (PARITY_FILE, MANIFEST):  # what parity rewrites must not be one of its inputs
        check_out_file(bundle / name, f"parity's {name}",
                       inputs={"--prompts": prompts_file, "--checkpoint": checkpoint})
    manifest = read_manifest(bundle, verify=True, verify_reference=checkpoint is None)
    prompts = read_prompts(prompts_file)  # before any model is loaded
    target = target or next(iter(manifest.get("targets", {})), None)
    max_context = int(manifest["model"]["max_context"])
    entry = manifest.get("targets", {}).get(target) or {}
    modes = {} if engine is not None else runner_modes(target)
    if mode is not None:
        if mode not in modes:
            raise PocketllmError(f"--mode {mode!r}: the {target} runner has "
                                 f"{'modes ' + ', '.join(modes) if modes else 'no modes'}")
        modes = {mode: modes[mode]}
    float_weights = entry.get("float_weights")
    kv_cache_dtype = entry.get("kv_cache_dtype", "float32")
    reference, ref_path = reference_for(bundle, manifest, checkpoint, max_context, float_weights,
                                        kv_cache_dtype=kv_cache_dtype)
    tok = load_tokenizer(bundle, manifest["tokenizer"]["bos_id"])
    quant = manifest.get("quantization", {}).get("scheme", "none")
    sparse = manifest.get("attention", {}).get("infllm_v2")
    block = sparse["block_size"] if sparse else None
    encoded = []
    for text in prompts:
        ids = tok.encode(text)
        n = min(steps, max_context - 1)
        encoded.append((text, ids[:max_context - n], n, len(ids)))  # a long prompt keeps its beginning (reported)
    recorded = [RecordedReference(reference, block) for _ in encoded]

    def run(engine, runs: int = 1, run_index: int = 0, criteria: dict | None = None) -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        results = []
        for i, (text, ids, n, full) in enumerate(encoded):
            r = compare_engines(recorded[i], engine, ids, n, block, tie_tolerance=tie_tolerance(criteria))
            r["prompt"], r["prompt_truncated"], r["prompt_tokens_full"] = text[:80], len(ids) < full, full
            results.append(r)
            if progress:
                progress(run_index * len(prompts) + i + 1, runs * len(prompts))
        return results, round(time.perf_counter() - t0, 2)

    base = {"bundle": bundle.name, "target": target, "quant": quant,
            "reference": "bundle" if checkpoint is None else str(ref_path), "reference_weights": float_weights
            or "as stored", "kv_cache_dtype": kv_cache_dtype, "steps": steps}
    keys = ("passed", "max_abs_delta", "positions_within_tolerance", "top1_agreement", "continuations_identical",
            "tolerance", "contract", "steps", "infllm_engaged")
    if not modes:
        engine = engine or open_runner(bundle, target, threads=threads, verify=False)
        default = DEFAULT_TOLERANCE.get(quant) if tolerance is None else tolerance
        w4a8 = manifest.get("quantization", {}).get("activations") == "int8" and \
            manifest.get("quantization", {}).get("scheme") == "any4"
        criteria = contract_criteria(default, w4a8)
        results, seconds = run(engine, 1 + w4a8, criteria=criteria)
        noise = None
        if "noise_jitter" in criteria:  # the reference against itself under rounding-sized jitter, same tokens
            jittered, _ = reference_for(bundle, manifest, checkpoint, max_context, float_weights,
                                        activation_jitter=criteria["noise_jitter"], kv_cache_dtype=kv_cache_dtype)
            noise = noise_floor(run(jittered, 2, 1)[0], criteria)
        report = {**base, **verdict(results, criteria, noise), "seconds": seconds, "prompts": results,
                  "infllm_engaged": any(r["infllm_engaged"] for r in results) if block else None}
        summary = {k: report[k] for k in keys} | {"prompts": len(results)}
    else:
        import importlib

        from pocketllm.runtime_py.runners import runner_modules

        runner = importlib.import_module(runner_modules()[target]).Runner
        sections = {}
        for name, criteria in modes.items():
            if tolerance is not None and criteria.get("tolerance") is not None:
                criteria = {**criteria, "tolerance": tolerance}
            results, seconds = run(runner(bundle, threads=threads, manifest=manifest, mode=name), criteria=criteria)
            sections[name] = {"mode": name, **verdict(results, criteria), "seconds": seconds, "prompts": results}
        engaged = any(r["infllm_engaged"] for s in sections.values() for r in s["prompts"]) if block else None
        report = {**base, "passed": all(s["passed"] for s in sections.values()), "infllm_engaged": engaged,
                  "seconds": round(sum(s["seconds"] for s in sections.values()), 2), "modes": sections}
        summary = {"passed": report["passed"], "steps": steps, "infllm_engaged": engaged,
                   "prompts": len(encoded), "reference_weights": base["reference_weights"],
                   "modes": {m: {k: s[k] for k in keys if k in s} | {"criteria": s["criteria"]}
                             for m, s in sections.items()}}
    saved = _saved_report(bundle / PARITY_FILE, target)
    report["compared_steps"] = _compared_steps(report)
    if saved is not None and _compared_steps(saved) > report["compared_steps"]:
        # a quicker check never replaces a more thorough record: it is returned, and the saved one stays
        report["saved"] = False
        report["kept"] = {"steps": saved.get("steps"), "prompts": _prompt_count(saved),
                          "compared_steps": _compared_steps(saved), "passed": saved.get("passed")}
        return report
    report["saved"] = True
    write_json(bundle / PARITY_FILE, _merged_report(bundle / PARITY_FILE, target, report))
    add_parity(bundle, target, summary)
    return report


def _sections(report: dict) -> list[dict]:
    """A report's runs: itself, or one per runner mode."""
    modes = report.get("modes")
    return list(modes.values()) if isinstance(modes, dict) else [report]


def _compared_steps(report: dict) -> int:
    """How thorough a parity report is: greedy steps compared, summed over its prompts (and modes)."""
    return sum(int(p.get("steps", 0)) for s in _sections(report) for p in s.get("prompts", []))


def _prompt_count(report: dict) -> int:
    return max((len(s.get("prompts", [])) for s in _sections(report)), default=0)


def _saved_report(path: Path, target: str) -> dict | None:
    import json

    try:
        reports = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    report = reports.get(target) if isinstance(reports, dict) else None
    return report if isinstance(report, dict) else None


def _merged_report(path: Path, target: str, report: dict) -> dict:
    """parity.json holds one report per target: {target: report}."""
    import json

    reports = {}
    if path.is_file():
        try:
            reports = json.loads(path.read_text())
        except ValueError:
            reports = {}
    if not isinstance(reports, dict) or "prompts" in reports:  # not a per-target file
        reports = {}
    reports[target] = report
    return reports
