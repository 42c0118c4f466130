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
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.ops.any4_linear import any4_dequantize, dequantize_lut, unpack_codes
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
        return t["qweight"].astype(np.float32) * t["scales"].astype(np.float32)
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


def quantized_weight_loader(quantization):
    """A `load_weights(dir, weight_map)` for quantized checkpoints: float tensors as usual, and every packed module
    M dequantized into `M.weight` (float32), so the reference model reads it like any other checkpoint."""

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
            out[f"{module}.weight"] = dequantize(tq.scheme, packed[module])
            del packed[module]
        return out

    return load
