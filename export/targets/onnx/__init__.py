"""ONNX: `BUNDLE/onnx/` = model.onnx (+ model.onnx.data), genai_config.json and the tokenizer files, a folder
onnxruntime-genai's `og.Model(folder)` loads and generates from, with standard ONNX ops plus ONNX Runtime's own
`com.microsoft::MatMulNBits` (no pocketllm kernel).

Folder: options.py (defaults, validation), swaps.py (module swaps: past/present KV cache, standard-op attention
cores, lightning state I/O, routed MoE dispatch, MatMulNBits / any4 linears), ops.py (how each pocketllm op runs),
decompose.py (InfLLM v2 and lightning in standard ops), contrib.py (MatMulNBits and the exact any4 form),
lower.py (torch.export -> torch.onnx.export -> files, manifest entry), genai_config.py. onnx, onnxscript and
onnxruntime are imported only when exporting or running.
Runner: runtime_py/runners/onnx.py (onnxruntime, the engine protocol).
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets.base import Target, weight_bytes
from pocketllm.export.targets.onnx.ops import LOWERINGS
from pocketllm.export.targets.onnx.options import QUANT_SCHEMES, REFUSED_SCHEMES, OnnxOptions

ONNX_DIR = "onnx"
PROTOBUF_LIMIT = 2 * 1024**3  # one ModelProto cannot be serialised above this


class OnnxTarget(Target):
    name = "onnx"
    summary = "ONNX folder for onnxruntime / onnxruntime-genai (standard ops + MatMulNBits, past/present KV I/O)"
    artifact = ONNX_DIR
    quant_schemes = QUANT_SCHEMES
    quantized_lm_head = False  # the graph reads the head's weight as an fp32 tensor (check() below)
    sdk = "onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1"
    options_class = OnnxOptions
    lowerings = LOWERINGS

    def options(self, **values):
        quant = values.get("quant", "none")
        if quant in REFUSED_SCHEMES:
            raise PocketllmError(f"--quant {quant} is not supported by --target onnx: {REFUSED_SCHEMES[quant]}")
        return super().options(**values)

    def check_sdk(self) -> None:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise PocketllmError(f"--target onnx needs {', '.join(missing)}: pip install {self.sdk}")

    def check(self, ckpt, options) -> None:
        """A quantized LM head is refused (the graph reads the head's weight as a tensor: it would be dequantized
        into an fp32 initializer); so is external_data 'never' when the weights need more than protobuf's 2 GiB
        (estimated from the tensor table: floating-point tensors as fp32, packed tensors as packed)."""
        q = ckpt.quantization
        if q is not None and "lm_head" in q.modules:
            raise PocketllmError(f"{ckpt.dir}: the LM head is quantized ({q.modules['lm_head'].scheme}); --target "
                                 "onnx keeps it in fp32: quantize without --quantize-lm-head")
        if options.external_data != "never":
            return
        total = weight_bytes(ckpt, float_bytes=4)
        if total >= PROTOBUF_LIMIT:
            raise PocketllmError(f"--target onnx: the weights take about {total / 2**30:.2f} GiB, over protobuf's 2 GiB "
                                 "limit for one model.onnx; use onnx.external_data=auto or always (model.onnx.data)")

    def export(self, model, spec, options, out_dir, stage):
        from pocketllm.export.targets.onnx.lower import export_onnx

        return export_onnx(model, spec, options, out_dir, stage=stage)

    def add_tokenizer(self, out_dir: Path, names: list[str]) -> None:
        """onnxruntime-genai reads the tokenizer from the model folder: copy the bundle's tokenizer files there."""
        for name in names:
            shutil.copyfile(Path(out_dir) / name, Path(out_dir) / ONNX_DIR / name)


TARGET = OnnxTarget()
