"""numpy twin of pocketllm::moe_ffn / moe_ffn_any4: the routed experts of a mixture-of-experts layer.

Written from MODELS.md (SmallThinker: ReGLU experts `down(relu(gate(u)) * up(u))`, u = post-attention norm output;
MiniMax: SwiGLU experts `w2(silu(w1 u) * w3 u)`) and docs/quantization.md (any4), independently of export/ops.
Routing is the caller's: expert_ids int [T, k] and expert_weights float32 [T, k].

    out[t] = sum_j expert_weights[t, j] * down_e(act(gate_e u_t) * up_e u_t),   e = expert_ids[t, j]

Layouts as the op's: gate, up [E, F, H] and down_t [E, F, H] (the down weight [H, F] transposed) for float experts;
any4 experts as stacked packed tensors in the checkpoint's orientation (gate/up [E, F, ...], down [E, H, ...]), group
size = K / groups. float32 math; each chosen expert's output times its weight is added to a float32 sum that starts
at zero, experts in ascending id order.
"""

from __future__ import annotations

import numpy as np

from pocketllm.runtime_py.ops.any4_linear import dequantize_lut, unpack_codes
from pocketllm.runtime_py.ops.silu_mul import silu


def _act(activation: str):
    if activation == "reglu":
        return lambda g: np.maximum(g, np.float32(0))
    if activation == "swiglu":
        return silu
    raise ValueError(f"moe_ffn: unknown activation {activation!r} (expected reglu or swiglu)")


def _routed_sum(u: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, activation: str,
                expert) -> np.ndarray:
    """expert(e) -> (gate [F, H], up [F, H], down [H, F]) float32."""
    act = _act(activation)
    u32 = u.astype(np.float32)
    out = np.zeros(u.shape, dtype=np.float32)
    for e in np.unique(expert_ids):  # sorted
        rows, slot = np.nonzero(expert_ids == e)
        gate, up, down = expert(int(e))
        x = u32[rows]
        y = (act(x @ gate.T) * (x @ up.T)) @ down.T  # [n, H]
        np.add.at(out, rows, y * expert_weights[rows, slot, None].astype(np.float32))
    return out


def moe_ffn(u: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, gate: np.ndarray, up: np.ndarray,
            down_t: np.ndarray, activation: str) -> np.ndarray:
    """u [T, H]; gate, up, down_t [E, F, H] (float32, or bf16 values held as float32). Returns float32 [T, H]."""
    return _routed_sum(u, expert_ids, expert_weights, activation,
                       lambda e: (gate[e].astype(np.float32), up[e].astype(np.float32),
                                  down_t[e].astype(np.float32).T))


def any4_weight(qweight: np.ndarray, lut: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """One expert's packed any4 matrix (qweight uint8 [N, K/2], lut [N, 16], scales/zeros [N, G]) -> float32 [N, K]
    = lut[code] * scale + zero (two float32 roundings)."""
    return dequantize_lut(unpack_codes(qweight), lut.astype(np.float32), scales, zeros)


def moe_ffn_any4(u: np.ndarray, expert_ids: np.ndarray, expert_weights: np.ndarray, gate_qweight, gate_lut,
                 gate_scales, gate_zeros, up_qweight, up_lut, up_scales, up_zeros, down_qweight, down_lut, down_scales,
                 down_zeros, activation: str) -> np.ndarray:
    """Stacked any4 experts: *_qweight uint8 [E, N, K/2], *_lut [E, N, 16], *_scales/_zeros [E, N, G]."""
    return _routed_sum(u, expert_ids, expert_weights, activation, lambda e: (
        any4_weight(gate_qweight[e], gate_lut[e], gate_scales[e], gate_zeros[e]),
        any4_weight(up_qweight[e], up_lut[e], up_scales[e], up_zeros[e]),
        any4_weight(down_qweight[e], down_lut[e], down_scales[e], down_zeros[e])))
