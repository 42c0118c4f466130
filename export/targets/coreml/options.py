"""Core ML target options: defaults and validation (no coremltools import here).

Every bad value is one `PocketllmError` line naming the option, the value and what was expected, raised before any
weight is read or any file written.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.errors import PocketllmError

DEPLOYMENT_TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18")  # what coremltools 9 can target; states need iOS18
STATE_TARGET = "iOS18"
COMPUTE_PRECISIONS = ("float16", "float32")
# Weight schemes the package can store compressed (docs/coreml.md): none -> fp16 weights, int8 and int4 ->
# constexpr_blockwise_shift_scale, any4 and nf4 -> constexpr_lut_to_dense (+ group scales on partial sums).
STORABLE_SCHEMES = ("none", "int8", "int4", "nf4", "any4")
REFUSED_SCHEMES = {"8da4w": "8da4w is torchao/XNNPACK's dynamic int8-activation scheme; Core ML has no int8 "
                            "activation path for it (use --quant int4 or any4)"}
SCORE_RULES = ("exact_softmax", "upstream_lse")
DEFAULT_PREFILL_CHUNK = 64
MAX_WEIGHT_FILE_BYTES = 2 * 1024**3  # one weight file per package; the ANE refuses larger (TARGETS.md)


@dataclass(frozen=True)
class CoreMLOptions:
    """max_context: rows of every KV-cache state (the most tokens a sequence can hold).
    prefill_chunk: tokens per `prefill` call (fixed shape; the app pads the last chunk with token id -1).
    infllm_score_rule: how InfLLM v2 scores compressed keys (export/targets/coreml/ops.py `kernel_scores`):
    "exact_softmax" (today's reference, docs/infllm_v2.md) or "upstream_lse" (MODELS.md section 2: normaliser
    from the coarse kernels)."""

    max_context: int
    quant: str = "none"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    deployment_target: str = STATE_TARGET
    compute_precision: str = "float16"
    infllm_score_rule: str = "exact_softmax"
    max_weight_file_bytes: int = MAX_WEIGHT_FILE_BYTES

    def __post_init__(self):
        if self.deployment_target not in DEPLOYMENT_TARGETS:
            raise PocketllmError(f"--deployment-target {self.deployment_target!r} is unknown "
                                 f"(expected one of: {', '.join(DEPLOYMENT_TARGETS)})")
        if self.deployment_target != STATE_TARGET:
            raise PocketllmError(f"--deployment-target {self.deployment_target}: the Core ML package keeps its KV "
                                 f"caches as states (ct.StateType), which need {STATE_TARGET} or later")
        if self.quant in REFUSED_SCHEMES:
            raise PocketllmError(f"--quant {self.quant}: {REFUSED_SCHEMES[self.quant]}")
        if self.quant not in STORABLE_SCHEMES:
            raise PocketllmError(f"--quant {self.quant!r}: Core ML stores only {', '.join(STORABLE_SCHEMES)}")
        if self.compute_precision not in COMPUTE_PRECISIONS:
            raise PocketllmError(f"--compute-precision {self.compute_precision!r} must be one of "
                                 f"{', '.join(COMPUTE_PRECISIONS)}")
        if self.infllm_score_rule not in SCORE_RULES:
            raise PocketllmError(f"infllm_score_rule {self.infllm_score_rule!r} must be one of "
                                 f"{', '.join(SCORE_RULES)}")
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2:
            raise PocketllmError(f"--max-context must be an integer >= 2 (got {self.max_context!r})")
        if (isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int)
                or not 2 <= self.prefill_chunk <= self.max_context):
            raise PocketllmError(f"--prefill-chunk must be between 2 and --max-context ({self.max_context}) "
                                 f"(got {self.prefill_chunk!r}); one-token calls use the decode function")
