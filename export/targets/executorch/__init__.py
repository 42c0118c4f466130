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

    def check(self, ckpt, options) -> None:
        """An fp16 KV cache needs every cached layer on pocketllm::infllm_attention (which widens fp16 keys and
        values); a dense or sliding-window layer's core reads one dtype for q and the cache."""
        if options.kv_cache_dtype == "float32":
            return
        for i, layer in enumerate(ckpt.spec.layers):
            if layer.attention not in ("infllm", "lightning"):
                raise PocketllmError(f"{ckpt.dir}: executorch.kv_cache_dtype={options.kv_cache_dtype} needs InfLLM v2 "
                                     f"attention in every softmax layer (MiniCPM4 with a sparse_config); layer {i} "
                                     f"attends with {layer.attention!r}")

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
