"""Dequantize packed quantized checkpoints (any4, int4, nf4, int8) into float32 arrays, in numpy.

Written from docs/quantization.md, independently of export/quant and export/nn/quant_linear.py (the reference must
not share the arithmetic it checks). The checkpoint reader (export.checkpoint) has already validated names, shapes
and dtypes; its parsed `quantization` tells which modules are packed and how. For module M with weight [N, K]:

    codes    [N, K] from M.qweight uint8 [N, K/2]: byte b of a row holds column 2b in bits 0-3, 2b+1 in bits 4-7
    any4     W = lut[code] * scale + zero           lut = M.lut [N, 16] fp16, per row
    int4     W = (code - 8) * scale + zero
    nf4      W = NF4[code] * scale                  NF4: QLoRA's 16-value NormalFloat codebook (below)
    int8     W = q * scale                          q = M.qweight int8 [N, K], scale = M.scales [N, 1]

scale and zero are fp16 [N, K/g], one per row and group of g consecutive columns (g = K for group_size 0). All
arithmetic is float32 after exact fp16 -> fp32 widening: one multiply, then one add, each rounded (no fused
multiply-add), which is what makes the torch model and this reference agree bit for bit on any4.

`model.embed_tokens` may be packed too (the embedding table; for a tied model also the LM head): it is dequantized
like any weight, so the gather and the head read the same values. Activations: "fp32" (every exact variant) or
"int8" (the W4A8 variant, docs/quantization.md "W4A8"): any4 layers of the decoder (`model.layers.*`) then become
W4A8Weight operators whose `x @ W.T` runs runtime_py/ops/any4_linear_w4a8.py instead of a float matmul.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.ops.any4_linear import any4_dequantize, dequantize_lut, unpack_codes
from pocketllm.runtime_py.ops.any4_linear_w4a8 import any4_linear_w4a8, lut_to_int8
from pocketllm.runtime_py.ops.int8_linear import int8_dequantize
from pocketllm.runtime_py.weights import load_weights

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], dtype=np.float32)
INT4 = np.arange(16, dtype=np.float32) - np.float32(8)
PACKED_SUFFIXES = ("qweight", "scales", "zeros", "lut")


def dequantize(scheme: str, t: dict[str, np.ndarray]) -> np.ndarray:
    """Packed tensors of one module (suffix -> array, stored dtypes) -> float32 weight [N, K]."""
    if scheme == "int8":
        return int8_dequantize(t["qweight"], t["scales"])
    codes = unpack_codes(t["qweight"])
    if scheme == "any4":
        return any4_dequantize(t["qweight"], t["lut"], t["scales"], t["zeros"])
    if scheme == "int4":
        return dequantize_lut(codes, INT4, t["scales"], t["zeros"])
    if scheme == "nf4":
        return dequantize_lut(codes, NF4, t["scales"], None)
    raise PocketllmError(f"reference model: unknown quantization scheme {scheme!r}")


def load_packed(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file in their stored dtypes (uint8, int8, float16), fp16 checked for NaN/inf."""
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(path, framework="numpy") as f:
            for name in names:
                x = f.get_tensor(name)
                if x.dtype == np.float16 and not np.isfinite(x).all():
                    raise PocketllmError(f"{path}: tensor '{name}' has {int((~np.isfinite(x)).sum())} non-finite "
                                         "values (NaN or inf)")
                out[name] = x
    except SafetensorError as e:
        raise PocketllmError(f"{path}: corrupt safetensors file ({e})") from None
    return out


W4A8_SCOPE = "model.layers."  # the any4 layers the W4A8 variant runs with int8 activations (export/nn/quant_linear)
ACTIVATIONS = ("fp32", "int8")


class _W4A8Transposed:
    __array_ufunc__ = None  # numpy defers `x @ w.T` to __rmatmul__ below

    def __init__(self, w: "W4A8Weight"):
        self.w = w
        self.shape = (w.shape[1], w.shape[0])

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        w = self.w
        if w.jitter is not None:  # the noise-floor run of W4A8 parity (runtime_py/parity.py)
            eps, rng = w.jitter
            x = np.asarray(x, dtype=np.float32)
            x = (x * (1 + eps * rng.standard_normal(x.shape))).astype(np.float32)
        return any4_linear_w4a8(x, w.qweight, w.lut_i8, w.lut_scale, w.scales, w.zeros, w.group_size)


class W4A8Weight:
    """An any4 weight [N, K] that multiplies with W4A8 numerics: `x @ w.T` = any4_linear_w4a8(x, ...), so model code
    written as `x @ W.T` runs it unchanged. `dense()` is the exact dequantized weight (for inspection only).

    jitter (eps, rng): multiply each activation by (1 + eps * N(0, 1)) before it is rounded to int8, i.e. move it
    by fp32-rounding-sized amounts as another engine's summation order would (the W4A8 parity noise floor)."""

    __array_ufunc__ = None

    def __init__(self, t: dict[str, np.ndarray], group_size: int,
                 jitter: tuple[float, np.random.Generator] | None = None):
        self.jitter = jitter
        self.qweight = t["qweight"]
        self.shape = (self.qweight.shape[0], 2 * self.qweight.shape[1])
        self.group_size = group_size
        self.lut_i8, self.lut_scale = lut_to_int8(t["lut"].astype(np.float32))
        self.scales, self.zeros = _row_blocks(t["scales"]), _row_blocks(t["zeros"])
        self._exact = t

    @property
    def T(self) -> _W4A8Transposed:
        return _W4A8Transposed(self)

    def dense(self) -> np.ndarray:
        t = self._exact
        return any4_dequantize(t["qweight"], t["lut"], t["scales"], t["zeros"])


def _row_blocks(t: np.ndarray) -> np.ndarray:
    """fp16 [N, G] -> [ceil(N / 8), G, 8] (element [b, g, r] = row 8b + r; padding rows 0)."""
    N, G = t.shape
    blocks = -(-N // 8)
    padded = np.zeros((blocks * 8, G), dtype=np.float16)
    padded[:N] = t
    return np.ascontiguousarray(padded.reshape(blocks, 8, G).transpose(0, 2, 1))


def quantized_weight_loader(quantization, activations: str = "fp32", activation_jitter: float = 0.0):
    """A `load_weights(dir, weight_map)` for quantized checkpoints: float tensors as usual, and every packed module
    M dequantized into `M.weight` (float32), so the reference model reads it like any other checkpoint. With
    activations "int8", any4 modules under model.layers become W4A8Weight operators instead; activation_jitter > 0
    makes them jitter their inputs (one seeded generator for the whole model, so a run is reproducible)."""
    if activations not in ACTIVATIONS:
        raise PocketllmError(f"reference model: unknown activations {activations!r} (expected one of: "
                             f"{', '.join(ACTIVATIONS)})")
    if activation_jitter and activations != "int8":
        raise PocketllmError("reference model: activation_jitter applies to int8 activations only")
    jitter = (float(activation_jitter), np.random.default_rng(0)) if activation_jitter else None

    def is_packed(name: str) -> bool:
        module, _, suffix = name.rpartition(".")
        return suffix in PACKED_SUFFIXES and module in quantization.modules

    def load(checkpoint_dir: str | Path, weight_map: dict[str, str]) -> dict[str, np.ndarray]:
        plain = {n: s for n, s in weight_map.items() if not is_packed(n)}
        out = load_weights(checkpoint_dir, plain)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name, shard in weight_map.items():
            if is_packed(name):
                by_shard[shard].append(name)
        packed: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for shard, names in sorted(by_shard.items()):
            for name, x in load_packed(Path(checkpoint_dir) / shard, names).items():
                module, _, suffix = name.rpartition(".")
                packed[module][suffix] = x
        for module, tq in quantization.modules.items():
            if activations == "int8" and tq.scheme == "any4" and module.startswith(W4A8_SCOPE):
                K = quantization.shapes[module][1]
                out[f"{module}.weight"] = W4A8Weight(packed[module], tq.group(K), jitter)
            else:
                out[f"{module}.weight"] = dequantize(tq.scheme, packed[module])
            del packed[module]
        return out

    return load
