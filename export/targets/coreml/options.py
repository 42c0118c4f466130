"""Core ML target options: defaults and validation (no coremltools import here).

Every bad value is one `PocketllmError` line naming the option, the value and what was expected, raised by the
pipeline's `plan()` before any weight is read or any file written. Options beyond the common ones are set with
`pocketllm export --target-option coreml.KEY=VALUE`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets.base import CommonOptions

DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18")  # what coremltools 9 can target; states need iOS18
STATE_TARGET = "iOS18"
COMPUTE_PRECISIONS = ("float16", "float32")
# Weight schemes the package stores compressed (docs/coreml.md): none -> fp16 weights, int8 and int4 ->
# constexpr_blockwise_shift_scale, any4 and nf4 -> constexpr_lut_to_dense (+ group scales on partial sums).
QUANT_SCHEMES = ("none", "any4", "int4", "nf4", "int8")
REFUSED_SCHEMES = {"8da4w": "8da4w is torchao/XNNPACK's dynamic int8-activation scheme; Core ML has no int8 "
                            "activation path for it (use --quant any4 or int4)"}
DEFAULT_PREFILL_CHUNK = 64  # tokens per `prefill` call: a fixed shape, padded; small enough for the Neural Engine
MAX_WEIGHT_FILE_BYTES = 2 * 1024**3  # one weight file per package; the Neural Engine refuses larger (TARGETS.md)


@dataclass(frozen=True)
class CoreMLOptions(CommonOptions):
    """max_context: rows of every KV-cache state (the most tokens a sequence can hold).
    prefill_chunk: tokens per `prefill` call (fixed shape; the app pads the last chunk with token id -1); capped at
    max_context. deployment_target: the package's minimum OS (states need iOS18). compute_precision: "float16" (what
    phones run) or "float32" (debugging). max_weight_file_bytes: the largest weight file written (default 2 GiB)."""

    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    deployment_target: str = STATE_TARGET
    compute_precision: str = "float16"
    max_weight_file_bytes: int = MAX_WEIGHT_FILE_BYTES

    def __post_init__(self):
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            raise PocketllmError(f"coreml.deployment_target {self.deployment_target!r} is unknown "
                                 f"(expected one of: {', '.join(DEPLOYMENT_TARGETS)})")
        if self.deployment_target != STATE_TARGET:
            raise PocketllmError(f"coreml.deployment_target {self.deployment_target}: the Core ML package keeps its "
                                 f"KV caches as states (ct.StateType), which need {STATE_TARGET} or later")
        if self.quant in REFUSED_SCHEMES:
            raise PocketllmError(f"--quant {self.quant} cannot be stored by --target coreml: {REFUSED_SCHEMES[self.quant]}")
        if self.quant not in QUANT_SCHEMES:
            raise PocketllmError(f"--quant {self.quant!r}: Core ML stores only {', '.join(QUANT_SCHEMES)}")
        if self.compute_precision not in COMPUTE_PRECISIONS:
            raise PocketllmError(f"coreml.compute_precision {self.compute_precision!r} must be one of "
                                 f"{', '.join(COMPUTE_PRECISIONS)}")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2:
            raise PocketllmError(f"--max-context must be an integer >= 2 for --target coreml (got {self.max_context!r})")
        if isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 2:
            raise PocketllmError(f"--prefill-chunk must be at least 2 for --target coreml (got {self.prefill_chunk!r}); "
                                 "one-token calls use the decode function")
        if self.max_weight_file_bytes < 1:
            raise PocketllmError(f"coreml.max_weight_file_bytes must be positive (got {self.max_weight_file_bytes})")

    @property
    def chunk(self) -> int:
        """Tokens per prefill call as exported: prefill_chunk capped at max_context."""
        return min(self.prefill_chunk, self.max_context)
