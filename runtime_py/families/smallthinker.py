"""SmallThinker in numpy (MODELS.md section 3): the pre-norm decoder (runtime_py/decoder.py) with per-layer NoPE and
sliding-window attention from the spec, and a mixture of ReGLU experts routed BEFORE attention:

    r = layer_input @ router.T                  the layer's input, before its norm and attention   [T, E]
    ffn(u) = sum over the top-k experts e of w_e * down_e(relu(gate_e(u)) * up_e(u))   u = post-attention norm
    w = softmax of the k logits (moe_primary_router_apply_softmax), else sigmoid of them renormalised to sum 1

Weights `model.layers.{i}.block_sparse_moe.primary_router.weight`, `...experts.{e}.{gate,up,down}.weight`.
"""

from __future__ import annotations

import numpy as np

from pocketllm.runtime_py.decoder import PreNormDecoder, take
from pocketllm.runtime_py.mlp import Expert, moe


class Model(PreNormDecoder):
    def load_ffn(self, weights: dict[str, np.ndarray], i: int):
        spec = self.spec
        H, E, F, q = spec.hidden_size, spec.moe.num_experts, spec.moe.ffn_hidden_size, f"model.layers.{i}.block_sparse_moe."
        router = take(weights, q + "primary_router.weight", (E, H))
        experts = [Expert(gate=take(weights, f"{q}experts.{e}.gate.weight", (F, H)),
                          up=take(weights, f"{q}experts.{e}.up.weight", (F, H)),
                          down=take(weights, f"{q}experts.{e}.down.weight", (H, F))) for e in range(E)]
        return router, experts

    def feed_forward(self, i: int, u: np.ndarray, layer_input: np.ndarray) -> np.ndarray:
        router, experts = self.ffn[i]
        chosen, weights = self.router.route(i, layer_input @ router.T, self.spec.moe.top_k,
                                            self.spec.moe.router_softmax)
        return moe(u, chosen, weights, experts)
