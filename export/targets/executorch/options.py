"""ExecuTorch target options: defaults and validation (before any model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass

from pocketllm.export.errors import PocketllmError
from pocketllm.export.quant.format import SCHEMES
from pocketllm.export.targets.base import CommonOptions

# packed checkpoints (export/quant: any4 and int8 on our kernels, int4/nf4 dequantized in the graph), any4 run with
# int8 activations (W4A8: the same any4 checkpoint, pocketllm::any4_linear_w4a8 in the decoder layers) and
# torchao's 8da4w
W4A8 = "any4-w4a8"
QUANT_SCHEMES = ("none", *SCHEMES, W4A8, "8da4w")
# no kernel of their own (any4: any4_linear / any4_linear_w4a8, int8: int8_linear): dequantized in the graph
IN_GRAPH_DEQUANT = tuple(s for s in SCHEMES if s not in ("any4", "int8"))
EXPERT_MODES = ("inline", "file", "all")
KV_CACHE_DTYPES = ("float32", "float16")
ELEMENTWISE = ("auto", "fused", "xnnpack")
# schemes whose linear layers all run on our kernels (the program needs the kernel library anyway)
OWN_KERNEL_SCHEMES = ("any4", "int8", W4A8)


@dataclass(frozen=True)
class ExecutorchOptions(CommonOptions):
    """max_context: KV cache positions (get_max_context_len). prefill_chunk: most tokens per forward call
    (get_max_seq_len, the dynamic T's upper bound): memory planning sizes activations, logits included, for it.
    group_size: 8da4w's group along K (default 128, falling back to the largest of 128/64/32 dividing K).
    experts (MoE models): "inline" = each layer's experts stacked into the program, pocketllm::moe_ffn(_any4) reads
    only the routed ones; "file" = experts.bin beside the .pte, read by the kernel library's expert store
    (memory-mapped, or an LRU of experts within expert_cache_mb, prefetched from SmallThinker's pre-attention
    router); "all" = every expert runs with zero weight for the unchosen ones (the graph before moe_ffn, kept for
    comparisons; its MoE blocks' float ops stay out of XNNPACK, lower.xnnpack_partitioner).
    expert_cache_mb: the runtime's default expert budget recorded in the manifest (implies "file").
    xnnpack: False lowers without the XNNPACK partitioner (float ops on ExecuTorch's portable/optimized kernels), for
    checking a delegate-free program; 8da4w needs XNNPACK.
    kv_cache_dtype: "float16" stores keys and values in fp16 (half the cache memory and the bytes long-context decode
    reads; llama.cpp's default), widened exactly to fp32 by pocketllm::infllm_attention; InfLLM v2 layers only
    (ExecuTorch's llama::custom_sdpa takes one dtype for q and the cache). The reference rounds its cache alike.
    elementwise: how norms, RoPE and the SwiGLU product run. "fused": one pocketllm op each (rms_norm, rope, silu_mul:
    swaps.use_fused_elementwise) and XNNPACK takes only float linears; "xnnpack": XNNPACK partitions (the norm's mean
    as a matmul, swaps.use_xnnpack_norms_and_rope), so a float program needs no kernel library; "auto" (default):
    fused for the schemes whose linears are our kernels (OWN_KERNEL_SCHEMES), xnnpack otherwise."""

    llama_sdpa: bool = True  # dense layers through llama::update_cache / llama::custom_sdpa
    experts: str = "inline"
    expert_cache_mb: int | None = None
    xnnpack: bool = True
    kv_cache_dtype: str = "float32"
    elementwise: str = "auto"

    def __post_init__(self):
        if self.experts not in EXPERT_MODES:
            raise PocketllmError(f"unknown --experts {self.experts!r} (expected one of: {', '.join(EXPERT_MODES)})")
        if self.expert_cache_mb is not None:
            if self.expert_cache_mb < 1:
                raise PocketllmError(f"--expert-cache-mb must be a positive number of MiB (got {self.expert_cache_mb})")
            if self.experts != "file":
                raise PocketllmError("--expert-cache-mb bounds the expert store: use it with --experts file")
        if self.prefill_chunk < 1:
            raise PocketllmError(f"--prefill-chunk must be positive (got {self.prefill_chunk})")
        if self.quant not in QUANT_SCHEMES:
            raise PocketllmError(f"unknown --quant {self.quant!r} (expected one of: {', '.join(QUANT_SCHEMES)})")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PocketllmError(f"executorch.kv_cache_dtype={self.kv_cache_dtype!r}: expected one of "
                                 f"{', '.join(KV_CACHE_DTYPES)}")
        if self.elementwise not in ELEMENTWISE:
            raise PocketllmError(f"executorch.elementwise={self.elementwise!r}: expected one of "
                                 f"{', '.join(ELEMENTWISE)}")
        if not self.xnnpack and self.quant == "8da4w":
            raise PocketllmError("--quant 8da4w runs on XNNPACK: it cannot be used with executorch.xnnpack=false")

    @property
    def fused_elementwise(self) -> bool:
        """Norms, RoPE and SwiGLU products on pocketllm ops (see `elementwise`)."""
        if self.elementwise == "auto":
            return self.quant in OWN_KERNEL_SCHEMES
        return self.elementwise == "fused"
