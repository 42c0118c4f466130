"""Core ML: a stateful iOS 18 ML Program (`model.mlpackage`) with a `prefill` and a `decode` function sharing
weights and states, that an app drives with token ids and a position only (docs/coreml.md).

Folder: options.py (defaults, validation), swaps.py (module swaps), ops.py (how each pocketllm op runs),
converters.py (the coremltools converters), lower.py (torch.export -> ct.convert -> multifunction package, manifest
entry). coremltools is imported only by converters.py and lower.py, when exporting.
Runner: runtime_py/runners/coreml/ (a numpy interpreter of the saved package, fp32 and fp16-emulating modes).
"""

from __future__ import annotations

import importlib.util

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets.base import Target, weight_bytes
from pocketllm.export.targets.coreml.ops import LOWERINGS
from pocketllm.export.targets.coreml.options import QUANT_SCHEMES, CoreMLOptions


class CoreMLTarget(Target):
    name = "coreml"
    summary = "Core ML .mlpackage (iOS 18, fp16, states, prefill + decode functions)"
    artifact = "model.mlpackage"
    quant_schemes = QUANT_SCHEMES
    quantized_lm_head = False  # the head and the embedding table stay in floating point (fp16 in the package)
    sdk = "coremltools==9.0"
    options_class = CoreMLOptions
    lowerings = LOWERINGS

    def check_sdk(self) -> None:
        if importlib.util.find_spec("coremltools") is None:  # importing it takes ~10-30 s: only look for it
            raise PocketllmError(f"--target coreml needs coremltools: pip install {self.sdk}")

    def check(self, ckpt, options) -> None:
        """A quantized LM head is refused (the package keeps the head in fp16), and so is a checkpoint whose
        weights need more than options.max_weight_file_bytes in the weight file (estimated from the tensor table:
        floating-point tensors in fp16, packed tensors as packed; a checkpoint the export quantizes first is
        checked after quantizing, before converting)."""
        q = ckpt.quantization
        if q is not None and "lm_head" in q.modules:
            raise PocketllmError(f"{ckpt.dir}: the LM head is quantized ({q.modules['lm_head'].scheme}); Core ML keeps "
                                 "it in fp16: quantize without --quantize-lm-head")
        if q is None and options.quant != "none":
            return
        total = weight_bytes(ckpt, float_bytes=2)
        if total > options.max_weight_file_bytes:
            from pocketllm.export.targets.coreml.lower import size_text  # (no coremltools import at module level)

            raise PocketllmError(f"--target coreml: the weights need about {size_text(total)} in the package's one "
                                 f"weight file, over the {size_text(options.max_weight_file_bytes)} it may hold (the "
                                 "Neural Engine refuses larger files; splitting is not supported): quantize (--quant "
                                 "any4 or int4)")

    def export(self, model, spec, options, out_dir, stage):
        from pocketllm.export.targets.coreml.lower import export_coreml

        return export_coreml(model, spec, options, out_dir, stage=stage)


TARGET = CoreMLTarget()
