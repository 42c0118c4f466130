"""The quantized checkpoint format: the `quantization_config` block of config.json and the packed tensors it implies.

Pure Python (no torch, no numpy): export/checkpoint.py calls `parse_quantization` to validate a quantized
checkpoint from its safetensors headers alone. The prose version, with the dequantization formulas, is
docs/quantization.md. A quantized module `M` (an upstream Linear, e.g. `model.layers.0.mlp.up_proj`, weight [N, K])
stores instead of `M.weight`:

    scheme  tensors (safetensors dtype, shape)                                    dequantized W[i, j] (fp32)
    any4    M.qweight U8 [N, K/2], M.scales F16 [N, G], M.zeros F16 [N, G],       lut[i, c] * s[i, j/g] + z[i, j/g]
            M.lut F16 [N, 16]
    int4    M.qweight U8 [N, K/2], M.scales F16 [N, G], M.zeros F16 [N, G]        (c - 8) * s[i, j/g] + z[i, j/g]
    nf4     M.qweight U8 [N, K/2], M.scales F16 [N, G]                            NF4[c] * s[i, j/g]
    int8    M.qweight I8 [N, K],   M.scales F16 [N, 1]                            q[i, j] * s[i]

c = the 4-bit code of column j: byte j // 2 of the row, low nibble for even j, high nibble for odd j.
G = K / g groups per row; group_size g = 0 in the config means one group per row (G = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pocketllm.export.errors import PocketllmError

QUANT_METHOD = "pocketllm"
FORMAT_VERSION = 1
SCHEMES = ("any4", "int4", "nf4", "int8")
FOUR_BIT = ("any4", "int4", "nf4")
# How any4 turns the calibration statistics into a column weight a_j (recorded as calibration.statistic):
#   abs_mean  |mean_t x_tj|        (the paper's: |mean input activation|)
#   mean_abs  mean_t |x_tj|
#   rms       sqrt(mean_t x_tj^2)  (the diagonal of E[x x^T], which the output error actually depends on)
ACT_STATS = ("abs_mean", "mean_abs", "rms")
DEFAULT_ACT_STAT = "abs_mean"
REPORT_FILE = "quantization_report.json"  # every quantized tensor's error, beside config.json
NIBBLE_ORDER = "low_first"  # column 2j in bits 0-3 of byte j, column 2j+1 in bits 4-7 (ONNX MatMulNBits order)

# Per scheme: packed tensor suffix -> (safetensors dtype, shape as a function of N, K, G).
_PACKED = {
    "any4": {"qweight": ("U8", lambda N, K, G: (N, K // 2)), "scales": ("F16", lambda N, K, G: (N, G)),
             "zeros": ("F16", lambda N, K, G: (N, G)), "lut": ("F16", lambda N, K, G: (N, 16))},
    "int4": {"qweight": ("U8", lambda N, K, G: (N, K // 2)), "scales": ("F16", lambda N, K, G: (N, G)),
             "zeros": ("F16", lambda N, K, G: (N, G))},
    "nf4": {"qweight": ("U8", lambda N, K, G: (N, K // 2)), "scales": ("F16", lambda N, K, G: (N, G))},
    "int8": {"qweight": ("I8", lambda N, K, G: (N, K)), "scales": ("F16", lambda N, K, G: (N, 1))},
}
_DTYPE_BITS = {"U8": 8, "I8": 8, "F16": 16}
PACKED_SUFFIXES = ("qweight", "scales", "zeros", "lut")


@dataclass(frozen=True)
class TensorQuant:
    """How one Linear weight [N, K] is stored: scheme and group size (0 = one group per row)."""

    scheme: str
    group_size: int = 0

    def group(self, in_features: int) -> int:
        """The actual group length along K (K itself when group_size is 0)."""
        return self.group_size or in_features

    def packed(self, out_features: int, in_features: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """suffix -> (safetensors dtype, shape) of the tensors that replace `.weight`."""
        G = in_features // self.group(in_features)
        return {s: (dt, shape(out_features, in_features, G)) for s, (dt, shape) in _PACKED[self.scheme].items()}

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Storage bits per weight, everything included (codes, scales, zeros, LUT). See docs/quantization.md."""
        bits = 0
        for dt, shape in self.packed(out_features, in_features).values():
            n = 1
            for s in shape:
                n *= s
            bits += n * _DTYPE_BITS[dt]
        return bits / (out_features * in_features)

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size}


@dataclass(frozen=True)
class QuantConfig:
    """The parsed `quantization_config`: a default scheme (what the CLI was asked for) and every quantized module.

    `modules` maps a module name (the weight's tensor name without `.weight`) to its TensorQuant; any weight not
    listed stays in floating point. `shapes` holds each listed module's [N, K].
    """

    scheme: str
    group_size: int
    modules: dict[str, TensorQuant]
    shapes: dict[str, tuple[int, int]]
    calibration: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # informative keys kept as written (bits_per_weight, ...)

    @property
    def packed_dtypes(self) -> dict[str, str]:
        """Every packed tensor name -> its required safetensors dtype."""
        out = {}
        for m, tq in self.modules.items():
            for suffix, (dt, _) in tq.packed(*self.shapes[m]).items():
                out[f"{m}.{suffix}"] = dt
        return out

    def is_packed(self, tensor_name: str) -> bool:
        module, _, suffix = tensor_name.rpartition(".")
        return suffix in PACKED_SUFFIXES and module in self.modules

    def expected(self, tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Map a table of unquantized tensor names -> shapes to the quantized checkpoint's table."""
        out = {}
        for name, shape in tensors.items():
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module in self.modules:
                for suffix, (_, packed_shape) in self.modules[module].packed(*self.shapes[module]).items():
                    out[f"{module}.{suffix}"] = packed_shape
            else:
                out[name] = shape
        return out

    def bits_per_weight(self) -> float:
        """Over all quantized weights: total storage bits / number of weights."""
        bits = weights = 0
        for m, tq in self.modules.items():
            N, K = self.shapes[m]
            bits += tq.bits_per_weight(N, K) * N * K
            weights += N * K
        return bits / weights if weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "scheme": self.scheme,
             "group_size": self.group_size, "nibble_order": NIBBLE_ORDER,
             "bits_per_weight": round(self.bits_per_weight(), 4), **self.extra,
             "calibration": self.calibration, "modules": {m: tq.to_dict() for m, tq in self.modules.items()}}
        return d


def check_tensor_quant(tq: TensorQuant, module: str, shape: tuple[int, ...], where: str) -> None:
    """One-line error unless `tq` can store the weight `module.weight` of `shape`."""
    if tq.scheme not in SCHEMES:
        raise PocketllmError(f"{where}: unknown quantization scheme {tq.scheme!r} for '{module}' "
                             f"(expected one of: {', '.join(SCHEMES)})")
    if len(shape) != 2:
        raise PocketllmError(f"{where}: '{module}.weight' has shape {list(shape)}; only 2-D Linear weights can be "
                             "quantized")
    N, K = shape
    g = tq.group_size
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise PocketllmError(f"{where}: group size of '{module}' must be 0 (one group per row) or a positive "
                             f"integer (got {g!r})")
    if tq.scheme == "int8" and g != 0:
        raise PocketllmError(f"{where}: int8 is per output channel; group size of '{module}' must be 0 (got {g})")
    if g and K % g:
        raise PocketllmError(f"{where}: group size {g} does not divide the input width {K} of '{module}.weight' "
                             f"{list(shape)}")
    if tq.scheme in FOUR_BIT and K % 2:
        raise PocketllmError(f"{where}: '{module}.weight' has an odd input width {K}; 4-bit packing needs an even "
                             "one")


def parse_quantization(raw: Any, weights: dict[str, tuple[int, ...]], where: str) -> QuantConfig:
    """Validate a `quantization_config` block against the unquantized tensor table (name -> shape)."""
    key = "quantization_config"
    if not isinstance(raw, dict):
        raise PocketllmError(f"{where}: key '{key}' must be an object (got {raw!r})")
    method = raw.get("quant_method")
    if method != QUANT_METHOD:
        raise PocketllmError(f"{where}: {key}.quant_method {method!r} is not supported (pocketllm reads only its "
                             f"own '{QUANT_METHOD}' format; quantize the unquantized checkpoint with "
                             "`pocketllm quantize`)")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise PocketllmError(f"{where}: {key}.format_version must be {FORMAT_VERSION} (got {version!r})")
    if raw.get("nibble_order", NIBBLE_ORDER) != NIBBLE_ORDER:
        raise PocketllmError(f"{where}: {key}.nibble_order must be '{NIBBLE_ORDER}' (got {raw.get('nibble_order')!r})")
    scheme = raw.get("scheme")
    if scheme not in SCHEMES:
        raise PocketllmError(f"{where}: {key}.scheme must be one of {', '.join(SCHEMES)} (got {scheme!r})")
    group_size = raw.get("group_size")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise PocketllmError(f"{where}: {key}.group_size must be a non-negative integer (got {group_size!r})")
    modules_raw = raw.get("modules")
    if not isinstance(modules_raw, dict) or not modules_raw:
        raise PocketllmError(f"{where}: {key}.modules must be a non-empty object mapping module names to "
                             "{\"scheme\", \"group_size\"}")
    modules: dict[str, TensorQuant] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for module, entry in modules_raw.items():
        if not isinstance(entry, dict) or set(entry) != {"scheme", "group_size"}:
            raise PocketllmError(f"{where}: {key}.modules['{module}'] must be an object with exactly the keys "
                                 f"scheme and group_size (got {entry!r})")
        shape = weights.get(f"{module}.weight")
        if shape is None:
            raise PocketllmError(f"{where}: {key}.modules names '{module}', which has no weight in this "
                                 "checkpoint's architecture")
        tq = TensorQuant(entry["scheme"], entry["group_size"])
        check_tensor_quant(tq, module, shape, f"{where}: {key}")
        modules[module] = tq
        shapes[module] = (shape[0], shape[1])
    calibration = raw.get("calibration", {})
    if not isinstance(calibration, dict):
        raise PocketllmError(f"{where}: {key}.calibration must be an object (got {calibration!r})")
    known = {"quant_method", "format_version", "nibble_order", "scheme", "group_size", "modules", "calibration"}
    extra = {k: v for k, v in raw.items() if k not in known and k != "bits_per_weight"}
    return QuantConfig(scheme=scheme, group_size=group_size, modules=modules, shapes=shapes, calibration=calibration,
                       extra=extra)
