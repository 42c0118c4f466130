"""MiniCPM4 in numpy (MODELS.md sections 1-2): the pre-norm decoder (runtime_py/decoder.py) with muP scalars from
the spec (scale_emb, residual_scale = scale_depth / sqrt(layers), logit_scale = dim_model_base / hidden_size),
dense or InfLLM v2 attention, and a SwiGLU MLP:

    mlp(u) = down(silu(gate(u)) * up(u))        weights `model.layers.{i}.mlp.{gate,up,down}_proj.weight`
"""

from __future__ import annotations

import numpy as np

from pocketllm.runtime_py.decoder import PreNormDecoder, take
from pocketllm.runtime_py.mlp import swiglu


class Model(PreNormDecoder):
    def load_ffn(self, weights: dict[str, np.ndarray], i: int):
        H, I, p = self.spec.hidden_size, self.spec.intermediate_size, f"model.layers.{i}.mlp."
        return (take(weights, p + "gate_proj.weight", (I, H)), take(weights, p + "up_proj.weight", (I, H)),
                take(weights, p + "down_proj.weight", (H, I)))

    def feed_forward(self, i: int, u: np.ndarray, layer_input: np.ndarray) -> np.ndarray:
        return swiglu(u, *self.ffn[i])
