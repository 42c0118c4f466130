"""Router near-ties in `pocketllm parity` (runtime_py/parity.py, ROUTER_TIES).

Two engines that agree to the contract's tolerance may route a token to different experts when the router's k-th
and next logits stand closer than that tolerance; the position then differs by far more than rounding. Parity then
replays the reference with that token sent to the runner-up expert and holds the artifact to the replay from there
on. An artifact that departs for any other reason matches neither and fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from pocketllm.runtime_py import ReferenceModel
from pocketllm.runtime_py.mlp import RouterTrace, route, route_margin
from pocketllm.runtime_py.parity import compare_engines, contract_criteria, verdict

TOL = 1e-3
IDS = [1, 5, 9, 2, 7, 3, 11, 4]
STEPS = 6


def test_route_margin_is_the_gap_below_the_last_chosen_logit():
    logits = np.array([[0.9, 0.1, 0.5, 0.45], [1.0, 1.0, 0.0, -1.0]], np.float32)
    np.testing.assert_allclose(route_margin(logits, 2), [0.05, 1.0], rtol=1e-6)  # 0.5 vs 0.45; 1.0 vs 0.0
    assert np.isinf(route_margin(logits, 4)).all()  # every expert chosen: nothing to tie with
    trace = RouterTrace()  # a model's running minimum over its MoE layers, and the layer it came from
    trace.start(0, 2)
    trace.route(0, logits, 1, apply_softmax=True)  # margins 0.4, 0.0
    trace.route(1, logits + np.array([[0, 0, 0.35, 0], [0, -0.5, 0, 0]], np.float32), 1, apply_softmax=True)  # .05 .5
    np.testing.assert_allclose(trace.margin, [0.05, 0.0], rtol=1e-5)
    assert trace.layer.tolist() == [1, 0]


def test_runner_up_replaces_only_the_kth_choice_of_the_rows_asked():
    logits = np.array([[0.9, 0.1, 0.5, 0.45], [0.2, 0.8, 0.7, 0.1]], np.float32)
    chosen, weights = route(logits, 2, apply_softmax=True, runner_up=np.array([True, False]))
    assert chosen.tolist() == [[0, 3], [1, 2]]  # row 0: expert 2 (k-th) gives way to expert 3 (the best left out)
    np.testing.assert_allclose(weights[0], np.exp([0.9, 0.45]) / np.exp([0.9, 0.45]).sum(), rtol=1e-6)


def smallest_margin(ref, ids) -> tuple[int, int, float]:
    """(position, layer, margin) of the reference's closest routing decision over a prompt's prefill."""
    ref.reset()
    ref.forward(np.array(ids), 0)
    p = int(np.argmin(ref.router.margin))
    return p, int(ref.router.layer[p]), float(ref.router.margin[p])


class Offset:
    """An engine that adds `offset` to every logit from position `start` on (a defect, not a routing tie)."""

    def __init__(self, model, start: int, offset: float):
        self.model, self.start, self.offset = model, start, offset

    def reset(self):
        self.model.reset()

    def forward(self, tokens, start_pos):
        out = self.model.forward(tokens, start_pos).copy()
        positions = start_pos + np.arange(len(tokens))
        out[positions >= self.start] += self.offset
        return out


@pytest.fixture(scope="module")
def models(tiny_dirs):
    path = tiny_dirs["smallthinker_sigmoid"]
    return (lambda: ReferenceModel.from_checkpoint(path, max_context=64))


def test_an_engine_that_broke_a_near_tie_the_other_way_passes(models):
    """The engine is the reference itself with one near-tie token routed to the runner-up: it departs there by far
    more than the tolerance, and matches the runner-up replay exactly from there on."""
    ref, engine = models(), models()
    p, layer, margin = smallest_margin(ref, IDS)
    engine.router.runner_up = {layer: {p}}
    tol = margin * 1.01 + 1e-9  # the contract's tolerance just covers this margin
    r = compare_engines(ref, engine, IDS, STEPS, None, tie_tolerance=tol)
    assert max(r["per_position_max_abs_delta_prefill"]) > tol  # a real departure at the tie
    tie = r["router_tie"]
    assert (tie["position"], tie["layer"]) == (p, layer) and tie["max_abs_delta_vs_runner_up"] == 0.0
    v = verdict([r], {"tolerance": tol, "identical": True})
    assert v["passed"] and v["router_ties"][0]["prompt"] == 0 and "runner-up" in v["contract"]
    assert v["max_abs_delta"] <= tol


def test_a_defect_that_starts_at_a_near_tie_still_fails(models):
    """Same near-tie position, but the engine's logits are off by 0.1 from there on: the replay does not match."""
    ref = models()
    p, layer, margin = smallest_margin(ref, IDS)
    engine = Offset(models(), p, 0.1)
    tol = margin * 1.01 + 1e-9
    r = compare_engines(ref, engine, IDS, STEPS, None, tie_tolerance=tol)
    assert r["router_tie"]["max_abs_delta_vs_runner_up"] > tol
    v = verdict([r], {"tolerance": tol, "identical": True})
    assert not v["passed"] and "router_ties" not in v


def test_a_defect_from_the_first_position_fails_even_when_every_position_is_a_near_tie(models):
    """With a tolerance above every margin, position 0 is a 'near-tie' too: the replay still tells a defect apart."""
    ref = models()
    ref.reset()
    ref.forward(np.array(IDS), 0)
    tol = float(ref.router.margin.max()) * 2 + 1e-6
    r = compare_engines(ref, Offset(models(), 0, 5 * tol), IDS, STEPS, None, tie_tolerance=tol)
    assert r["router_tie"]["position"] == 0
    assert not verdict([r], {"tolerance": tol, "identical": True})["passed"]


def test_a_departure_at_a_clear_margin_is_not_a_tie(models):
    ref = models()
    ref.reset()
    ref.forward(np.array(IDS), 0)
    clear = int(np.argmax(ref.router.margin))
    tol = float(ref.router.margin.min()) * 0.5  # below every margin
    r = compare_engines(ref, Offset(models(), clear, 10 * tol + 1e-3), IDS, STEPS, None, tie_tolerance=tol)
    assert r["router_tie"] is None
    assert not verdict([r], {"tolerance": tol, "identical": True})["passed"]


def test_ties_are_resolved_under_exact_contracts_only(models):
    """compare_engines without a tie tolerance (W4A8's noise floor, 8da4w's top-1 contract) records margins but no
    tie; the dense model records none."""
    ref, engine = models(), models()
    p, layer, _ = smallest_margin(ref, IDS)
    engine.router.runner_up = {layer: {p}}
    r = compare_engines(ref, engine, IDS, STEPS, None)
    assert r["router_tie"] is None
    margins = r["per_position_router_margin"]
    assert len(margins) == len(r["per_position_max_abs_delta_prefill"]) + len(r["per_step_max_abs_delta"])
    assert all(m is not None and m >= 0 for m in margins)
    assert verdict([r], contract_criteria(None, w4a8=False)).get("router_ties") is None


def test_the_dense_model_and_minimax_record_their_routing(tiny_dirs, tmp_path):
    from pocketllm.export.init_checkpoint import init_checkpoint

    dense = ReferenceModel.from_checkpoint(tiny_dirs["minicpm4_dense"], max_context=64)
    assert compare_engines(dense, ReferenceModel.from_checkpoint(tiny_dirs["minicpm4_dense"], max_context=64), IDS,
                           2, None)["per_position_router_margin"] is None
    path = init_checkpoint("minimax", "tiny", tmp_path / "mm", seed=3, dtype="fp32")
    mm = ReferenceModel.from_checkpoint(path, max_context=64)
    mm.forward(np.array(IDS), 0)
    assert mm.router.margin.shape == (len(IDS),) and (mm.router.margin >= 0).all()
    assert set(mm.router.layer.tolist()) <= set(range(mm.spec.num_layers))


class NaNAfter:
    """An engine that broke a near-tie the other way and then writes NaN into its top logit at `bad`."""

    def __init__(self, model, bad: int):
        self.model, self.bad = model, bad

    def reset(self):
        self.model.reset()

    def forward(self, tokens, start_pos):
        out = self.model.forward(tokens, start_pos).copy()
        for i, pos in enumerate(range(start_pos, start_pos + len(tokens))):
            if pos == self.bad:
                out[i, int(np.argmax(out[i]))] = np.nan
        return out


def test_a_tie_at_a_decode_step_is_replayed_and_the_reference_is_reusable_after(models):
    """The tie at a greedy step (the prefill matches): detected there, replayed through the steps; the same recorded
    reference then serves another run unchanged."""
    from pocketllm.runtime_py.parity import RecordedReference

    probe = models()
    r0 = compare_engines(probe, models(), IDS, STEPS, None)
    P = len(IDS)
    margins = r0["per_position_router_margin"]
    p = P + int(np.argmin(margins[P:]))  # the closest decision among the step positions
    probe.reset()
    probe.forward(np.array(IDS), 0)
    for s, t in enumerate(r0["reference_continuation"][:p - P + 1]):  # through position p
        probe.forward(np.array([t]), P + s)
    layer = int(probe.router.layer[-1])
    engine = models()
    engine.router.runner_up = {layer: {p}}
    tol = margins[p] * 1.01 + 1e-9
    recorded = RecordedReference(models(), None)
    r = compare_engines(recorded, engine, IDS, STEPS, None, tie_tolerance=tol)
    if r["router_tie"] is None:  # the flip moved no logit past this tolerance: nothing to resolve
        assert max(r["per_step_max_abs_delta"]) <= tol
        return
    assert r["router_tie"]["position"] == p and r["router_tie"]["max_abs_delta_vs_runner_up"] == 0.0
    assert verdict([r], {"tolerance": tol, "identical": True})["passed"]
    again = compare_engines(recorded, models(), IDS, STEPS, None, tie_tolerance=tol)  # replayed calls, clean engine
    assert again["router_tie"] is None and max(again["per_position_max_abs_delta_prefill"]) == 0.0
    assert max(again["per_step_max_abs_delta"]) == 0.0


def test_nan_logits_after_a_tie_fail(models):
    ref, flipped = models(), models()
    p, layer, margin = smallest_margin(ref, IDS)
    flipped.router.runner_up = {layer: {p}}
    tol = margin * 1.01 + 1e-9
    r = compare_engines(ref, NaNAfter(flipped, len(IDS) + 1), IDS, STEPS, None, tie_tolerance=tol)
    assert r["router_tie"] is not None and np.isnan(r["router_tie"]["max_abs_delta_vs_runner_up"])
    assert not verdict([r], {"tolerance": tol, "identical": True})["passed"]
