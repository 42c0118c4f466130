"""Feed-forward blocks: MiniCPM4's SwiGLU MLP and SmallThinker's routed ReGLU experts.

Weights are in upstream (torch Linear) layout, [out_features, in_features]: a projection is `x @ W.T`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocketllm.runtime_py.attention import softmax
from pocketllm.runtime_py.ops.silu_mul import sigmoid, silu_mul


def swiglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """down(silu(gate(x)) * up(x)). x: [T, H]; gate, up: [I, H]; down: [H, I]. Returns [T, H]."""
    return silu_mul(x @ gate.T, x @ up.T) @ down.T


def reglu(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """down(relu(gate(x)) * up(x)). x: [T, H]; gate, up: [F, H]; down: [H, F]. Returns [T, H]."""
    return (np.maximum(x @ gate.T, 0) * (x @ up.T)) @ down.T


@dataclass
class Expert:
    gate: np.ndarray  # [F, H]
    up: np.ndarray  # [F, H]
    down: np.ndarray  # [H, F]


def route(router_logits: np.ndarray, top_k: int, apply_softmax: bool,
          runner_up: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing. router_logits: [T, E] -> (experts int [T, k] best first, weights float32 [T, k]).

    Equal logits prefer the lower expert index. Weights: softmax over the k chosen logits, or (SmallThinker's
    default) sigmoid of each chosen logit divided by their sum. runner_up: bool [T], rows whose k-th choice is
    replaced by the best expert left out (parity's counterfactual at a near-tie, RouterTrace).
    """
    order = np.argsort(-router_logits, axis=-1, kind="stable")  # [T, E]
    experts = order[:, :top_k].copy()  # [T, k]
    if runner_up is not None and runner_up.any() and order.shape[1] > top_k:
        experts[runner_up, top_k - 1] = order[runner_up, top_k]
    chosen = np.take_along_axis(router_logits, experts, axis=-1)  # [T, k]
    if apply_softmax:
        weights = softmax(chosen, axis=-1)
    else:
        s = sigmoid(chosen)
        weights = s / s.sum(axis=-1, keepdims=True)
    return experts, weights.astype(np.float32)


def route_margin(router_logits: np.ndarray, top_k: int) -> np.ndarray:
    """Per token, how far the k-th chosen logit stands above the best one left out ([T, E] -> [T]; inf when every
    expert is chosen).

    A margin within an engine's rounding of the logits is a near-tie: two correct engines may route that token
    differently (runtime_py/parity.py, router near-ties)."""
    T, E = router_logits.shape
    if E <= top_k:
        return np.full(T, np.inf)
    part = np.partition(router_logits.astype(np.float64), (E - top_k - 1, E - top_k), axis=-1)
    return part[:, E - top_k] - part[:, E - top_k - 1]


class RouterTrace:
    """A model's routing as parity needs it. Per token of the last call: the smallest top-k margin over the MoE layers
    (route_margin) and the layer it came from. And `runner_up` {layer: positions}: tokens whose k-th expert that layer
    replaces with the best one left out, so that parity can replay what an engine that broke a near-tie the other way
    computes (runtime_py/parity.py, ROUTER_TIES). Empty unless parity sets it."""

    def __init__(self) -> None:
        self.margin: np.ndarray | None = None
        self.layer: np.ndarray | None = None
        self.runner_up: dict[int, set[int]] = {}
        self.positions = np.zeros(0, np.int64)

    def start(self, start_pos: int, tokens: int) -> None:
        """A new call: tokens at start_pos .. start_pos + tokens - 1."""
        self.margin = self.layer = None
        self.positions = np.arange(start_pos, start_pos + tokens)

    def route(self, layer: int, router_logits: np.ndarray, top_k: int,
              apply_softmax: bool) -> tuple[np.ndarray, np.ndarray]:
        """route() for MoE layer `layer` of this call, recording its margins."""
        margin = route_margin(router_logits, top_k)
        if self.margin is None:
            self.margin, self.layer = margin, np.full(margin.shape, layer)
        else:
            closer = margin < self.margin
            self.margin, self.layer = np.where(closer, margin, self.margin), np.where(closer, layer, self.layer)
        flip = self.runner_up.get(layer)
        return route(router_logits, top_k, apply_softmax,
                     runner_up=np.isin(self.positions, sorted(flip)) if flip else None)


def moe(u: np.ndarray, chosen: np.ndarray, weights: np.ndarray, experts: list[Expert]) -> np.ndarray:
    """sum_k w_k * expert_k(u) per token. u: [T, H] (post-attention norm output); chosen, weights: [T, k] (route()
    of the router logits the caller computed from the layer input). Each expert runs once, on the tokens routed to
    it. Returns [T, H]."""
    out = np.zeros_like(u)
    for e, ex in enumerate(experts):
        rows, slot = np.nonzero(chosen == e)  # a token picks an expert at most once: rows are distinct
        if rows.size:
            out[rows] += weights[rows, slot, None] * reglu(u[rows], ex.gate, ex.up, ex.down)
    return out
