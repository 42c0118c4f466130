"""Router near-ties in `pocketllm parity` (runtime_py/parity.py, ROUTER_TIES).

Two engines that agree to the contract's tolerance may route a token to different experts when the router's k-th
and next logits stand closer than that tolerance; the position then differs by far more than rounding. An exact
contract compares such a prompt up to the tie and says so; a routing defect, which shows at clear margins, still
fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from pocketllm.runtime_py import ReferenceModel
from pocketllm.runtime_py.mlp import route, route_margin
from pocketllm.runtime_py.parity import compare_engines, contract_criteria, verdict

TOL = 1e-3


def result(deltas: list[float], margins: list[float | None] | None, prompt_tokens: int = 3,
           first_divergence: int | None = None) -> dict:
    """compare_engines' record of one prompt: the first prompt_tokens deltas are prefill rows, the rest steps."""
    pre, steps = deltas[:prompt_tokens], deltas[prompt_tokens:]
    n = len(steps) + 1
    return {"prompt_tokens": prompt_tokens, "steps": n, "max_abs_delta_prefill": max(pre),
            "per_position_max_abs_delta_prefill": pre, "max_abs_delta_steps": max(steps, default=0.0),
            "per_step_max_abs_delta": steps, "top1_agreement": 1.0 if first_divergence is None else 0.9,
            "continuation_identical": first_divergence is None, "first_divergence": first_divergence,
            "infllm_engaged": None, "per_position_router_margin": margins}


CLEAR = [0.5] * 8


def test_route_margin_is_the_gap_below_the_last_chosen_logit():
    logits = np.array([[0.9, 0.1, 0.5, 0.45], [1.0, 1.0, 0.0, -1.0]], np.float32)
    np.testing.assert_allclose(route_margin(logits, 2), [0.05, 1.0], rtol=1e-6)  # 0.5 vs 0.45; 1.0 vs 0.0
    assert np.isinf(route_margin(logits, 4)).all()  # every expert chosen: nothing to tie with
    np.testing.assert_allclose(route_margin(logits, 1, previous=np.array([0.2, 0.01])), [0.2, 0.0])  # running min
    chosen, _ = route(logits, 2, apply_softmax=True)
    assert chosen[1].tolist() == [0, 1]  # the tie route_margin reports as 0 is broken by index


def test_a_prompt_that_departs_at_a_near_tie_is_compared_up_to_it():
    clean = result([1e-4] * 8, CLEAR)
    tie = result([1e-4] * 5 + [0.13, 2e-3, 1e-4], CLEAR[:5] + [2e-4, 0.5, 0.5], first_divergence=4)
    v = verdict([clean, tie], contract_criteria(TOL, w4a8=False))
    assert v["passed"] and v["max_abs_delta"] == pytest.approx(1e-4)  # positions from the tie on are not compared
    assert v["router_ties"] == [{"prompt": 1, "position": 5, "margin": 2e-4, "positions_not_compared": 3}]
    assert v["continuations_identical"]  # step 4 is decided at position 3 - 1 + 4 = 6, after the tie
    assert "router near-tie" in v["contract"]


def test_a_departure_at_a_clear_margin_still_fails():
    bad = result([1e-4] * 5 + [0.13, 1e-4, 1e-4], CLEAR)
    v = verdict([bad], contract_criteria(TOL, w4a8=False))
    assert not v["passed"] and "router_ties" not in v and v["max_abs_delta"] == pytest.approx(0.13)


def test_a_departure_before_the_near_tie_still_fails():
    bad = result([1e-4, 0.02, 1e-4, 1e-4, 1e-4, 0.13, 1e-4, 1e-4], CLEAR[:5] + [2e-4, 0.5, 0.5])
    assert not verdict([bad], contract_criteria(TOL, w4a8=False))["passed"]


def test_a_greedy_divergence_before_the_near_tie_still_fails():
    tie = result([1e-4] * 5 + [0.13, 1e-4, 1e-4], CLEAR[:5] + [2e-4, 0.5, 0.5], first_divergence=2)  # position 4
    v = verdict([tie], contract_criteria(TOL, w4a8=False))
    assert not v["passed"] and not v["continuations_identical"]


def test_models_without_experts_and_non_exact_contracts_are_unchanged():
    dense = result([1e-4] * 5 + [0.13, 1e-4, 1e-4], None)
    assert not verdict([dense], contract_criteria(TOL, w4a8=False))["passed"]
    tie = result([1e-4] * 5 + [0.13, 1e-4, 1e-4], CLEAR[:5] + [2e-4, 0.5, 0.5])
    unmatched = verdict([tie], contract_criteria(None, w4a8=False))  # 8da4w: top-1 only, nothing cut
    assert unmatched["passed"] and "router_ties" not in unmatched and unmatched["max_abs_delta"] == pytest.approx(0.13)


IDS = [1, 5, 9, 2, 7]


def test_smallthinker_records_each_tokens_smallest_router_margin(tiny_dirs):
    ref = ReferenceModel.from_checkpoint(tiny_dirs["smallthinker_sigmoid"], max_context=64)
    ref.forward(np.array(IDS), 0)
    router0 = ref.ffn[0][0]  # [E, H]; layer 0 routes its input, the embedding rows
    x0 = ref.embed[np.array(IDS)] * np.float32(ref.spec.scale_emb)
    assert ref.last_router_margin.shape == (len(IDS),)
    assert (ref.last_router_margin <= route_margin(x0 @ router0.T, ref.spec.moe.top_k)).all()
    ref.forward(np.array([3]), len(IDS))
    assert ref.last_router_margin.shape == (1,)  # the last call's tokens only


@pytest.mark.parametrize("name", ["smallthinker_softmax", "minimax", "minicpm4_dense"])
def test_compare_engines_reports_a_margin_per_compared_position(tiny_dirs, tmp_path, name):
    from pocketllm.export.init_checkpoint import init_checkpoint

    path = init_checkpoint("minimax", "tiny", tmp_path / "mm", seed=3, dtype="fp32") if name == "minimax" \
        else tiny_dirs[name]
    ref, engine = (ReferenceModel.from_checkpoint(path, max_context=64) for _ in range(2))
    r = compare_engines(ref, engine, IDS, 4, None)
    margins = r["per_position_router_margin"]
    if name == "minicpm4_dense":
        assert margins is None  # no router
        return
    assert len(margins) == len(r["per_position_max_abs_delta_prefill"]) + len(r["per_step_max_abs_delta"])
    assert all(m is not None and m >= 0 for m in margins)
