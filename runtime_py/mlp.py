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


def route(router_logits: np.ndarray, top_k: int, apply_softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing. router_logits: [T, E] -> (experts int [T, k] best first, weights float32 [T, k]).

    Equal logits prefer the lower expert index. Weights: softmax over the k chosen logits, or (SmallThinker's
    default) sigmoid of each chosen logit divided by their sum.
    """
    experts = np.argsort(-router_logits, axis=-1, kind="stable")[:, :top_k]  # [T, k]
    chosen = np.take_along_axis(router_logits, experts, axis=-1)  # [T, k]
    if apply_softmax:
        weights = softmax(chosen, axis=-1)
    else:
        s = sigmoid(chosen)
        weights = s / s.sum(axis=-1, keepdims=True)
    return experts, weights.astype(np.float32)


def route_margin(router_logits: np.ndarray, top_k: int, previous: np.ndarray | None = None) -> np.ndarray:
    """Per token, how far the k-th chosen logit stands above the best one left out ([T, E] -> [T]; inf when every
    expert is chosen), or the smaller of that and `previous` (a model's running minimum over its MoE layers).

    A margin within an engine's rounding of the logits is a near-tie: two correct engines may route that token
    differently (runtime_py/parity.py, router near-ties)."""
    T, E = router_logits.shape
    if E <= top_k:
        margin = np.full(T, np.inf)
    else:
        part = np.partition(router_logits.astype(np.float64), (E - top_k - 1, E - top_k), axis=-1)
        margin = part[:, E - top_k] - part[:, E - top_k - 1]
    return margin if previous is None else np.minimum(previous, margin)


def moe(u: np.ndarray, router_logits: np.ndarray, experts: list[Expert], top_k: int,
        apply_softmax: bool) -> np.ndarray:
    """sum_k w_k * expert_k(u) per token. u: [T, H] (post-attention norm output); router_logits: [T, E] (computed
    by the caller from the layer input). Each expert runs once, on the tokens routed to it. Returns [T, H]."""
    chosen, weights = route(router_logits, top_k, apply_softmax)  # [T, k], [T, k]
    out = np.zeros_like(u)
    for e, ex in enumerate(experts):
        rows, slot = np.nonzero(chosen == e)  # a token picks an expert at most once: rows are distinct
        if rows.size:
            out[rows] += weights[rows, slot, None] * reglu(u[rows], ex.gate, ex.up, ex.down)
    return out
