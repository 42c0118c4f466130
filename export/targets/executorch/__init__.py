"""ExecuTorch: one `.pte` that ExecuTorch's LLM runner (C++, Android `LlmModule`, iOS) drives, with our C++ kernels
for pocketllm's ops (kernels/). Folder: options.py, swaps.py (module swaps), ops.py (op lowerings), lower.py.
Runner: runtime_py/runners/executorch.py."""

from __future__ import annotations

from pocketllm.export.errors import PocketllmError
from pocketllm.export.targets.base import Target
from pocketllm.export.targets.executorch.ops import LOWERINGS
from pocketllm.export.targets.executorch.options import IN_GRAPH_DEQUANT, QUANT_SCHEMES, ExecutorchOptions


class ExecutorchTarget(Target):
    name = "executorch"
    summary = "ExecuTorch .pte (XNNPACK + pocketllm kernels), LLM-runner contract"
    artifact = "model.pte"
    quant_schemes = QUANT_SCHEMES
    sdk = "executorch==1.5.1"
    options_class = ExecutorchOptions
    lowerings = LOWERINGS

    def check_sdk(self) -> None:
        try:
            import executorch.exir  # noqa: F401
        except ImportError:
            raise PocketllmError(f"--target executorch needs the ExecuTorch SDK: pip install {self.sdk}") from None

    def warnings(self, options) -> list[str]:
        if options.quant in IN_GRAPH_DEQUANT:
            return [f"{options.quant} weights: ExecuTorch dequantizes them inside the graph on every call (portable "
                    "kernels): correct, but decoding is many times slower than fp32 (~40x on tiny-austen); any4 "
                    "(pocketllm's kernel) or 8da4w (XNNPACK) are the fast 4-bit choices"]
        return []

    def export(self, model, spec, options, out_dir, stage):
        from pocketllm.export.targets.executorch.lower import export_executorch

        return export_executorch(model, spec, options, out_dir, stage=stage)


TARGET = ExecutorchTarget()
