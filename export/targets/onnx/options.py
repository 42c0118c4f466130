"""ONNX target options: defaults and validation (no onnx / onnxruntime import here).

Every bad value is one `PocketllmError` line naming the option, the value and what was expected, raised by the
pipeline's `plan()` before any weight is read or any file written. Options beyond the common ones are set with
`pocketllm export --target-option onnx.KEY=VALUE`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets.base import CommonOptions

QUANT_SCHEMES = ("none", "int8", "int4", "any4")  # what the checkpoint holds (export/quant writes it)
ANY4_FORMS = ("lut", "int4", "dequant")
EXTERNAL_DATA = ("auto", "always", "never")
REFUSED_SCHEMES = {
    "8da4w": "8da4w is torchao/XNNPACK's ExecuTorch-only scheme (dynamic int8 activations inside XNNPACK); "
             "for ONNX use --quant int4 (MatMulNBits) or any4",
    "any4-w4a8": "any4 with int8 activations runs on pocketllm's ExecuTorch kernel (any4_linear_w4a8); ONNX has no LUT "
                 "op and MatMulInteger needs affine weights: use --quant any4 (exact) or int4 (MatMulNBits)",
    "nf4": "nf4 has no exact ONNX Runtime kernel (MatMulNBits is affine per block, NF4 needs a codebook); "
           "use --quant int4 (MatMulNBits) or any4",
}
DEFAULT_PREFILL_CHUNK = 256  # genai search.chunk_size: prompts longer than this are prefilled in chunks
MIN_OPSET, MAX_OPSET = 18, 23  # what onnxruntime 1.3x runs
ANY4_LUT_OPSET = 21  # 4-bit DequantizeLinear (UINT4 initializers)


@dataclass(frozen=True)
class OnnxOptions(CommonOptions):
    """max_context: genai's context_length / max_length (RoPE tables are built for it).
    quant: the checkpoint's scheme (none, int8, int4, any4).
    prefill_chunk: genai `search.chunk_size` (prompts longer than this are prefilled in chunks; 0 = one call).
    any4_form: "lut" exact per-call dequantization (default, 4-bit memory); "int4" requantize to MatMulNBits
        (fast, NOT exact: parity runs against the any4 checkpoint and shows the error); "dequant" fp32 weights
        (exact and fast, 8x the memory).
    accuracy_level: MatMulNBits' compute type: 0 = fp32 (exact, default), 4 = int8 activations (faster, inexact).
    external_data: "auto" (model.onnx.data once weights exceed external_data_threshold_mib), "always", "never"
        ("never" is refused above protobuf's 2 GiB).
    opset: ai.onnx opset of the graph."""

    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    any4_form: str = "lut"
    accuracy_level: int = 0
    external_data: str = "auto"
    external_data_threshold_mib: int = 64
    opset: int = 21

    def __post_init__(self):
        if self.quant in REFUSED_SCHEMES:
            raise PocketllmError(f"--quant {self.quant} is not supported by --target onnx: {REFUSED_SCHEMES[self.quant]}")
        if self.quant not in QUANT_SCHEMES:
            raise PocketllmError(f"unknown --quant {self.quant!r} for --target onnx (expected one of: "
                                 f"{', '.join(QUANT_SCHEMES)})")
        if self.any4_form not in ANY4_FORMS:
            raise PocketllmError(f"onnx.any4_form {self.any4_form!r} is not one of {', '.join(ANY4_FORMS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PocketllmError(f"onnx.accuracy_level {self.accuracy_level} must be 0..4 (MatMulNBits)")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0:
            raise PocketllmError(f"--prefill-chunk must be >= 0 for --target onnx (got {self.prefill_chunk!r}; "
                                 "0 = whole prompts in one call)")
        if self.external_data not in EXTERNAL_DATA:
            raise PocketllmError(f"onnx.external_data {self.external_data!r} is not one of {', '.join(EXTERNAL_DATA)}")
        if self.external_data_threshold_mib < 0:
            raise PocketllmError(f"onnx.external_data_threshold_mib must be >= 0 (got {self.external_data_threshold_mib})")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 1:
            raise PocketllmError(f"--max-context must be a positive integer (got {self.max_context!r})")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise PocketllmError(f"onnx.opset {self.opset} must be between {MIN_OPSET} and {MAX_OPSET} "
                                 "(onnxruntime 1.3x)")
        if self.quant == "any4" and self.any4_form == "lut" and self.opset < ANY4_LUT_OPSET:
            raise PocketllmError(f"onnx.opset {self.opset}: the exact any4 form needs opset >= {ANY4_LUT_OPSET} "
                                 "(4-bit DequantizeLinear); use onnx.opset=21 or onnx.any4_form=dequant")

    @property
    def chunk(self) -> int | None:
        """Tokens per prefill call (None: one call), capped at max_context."""
        return min(self.prefill_chunk, self.max_context) if self.prefill_chunk else None
