"""The ExecuTorch lowering: torch.export -> XNNPACK partitioning -> one `.pte` following ExecuTorch's LLM runner
contract.

    forward(tokens int64 [1, T], start_pos int64 [1]) -> logits fp32 [1, T, vocab]     (T dynamic, 1..max_context)
    get_bos_id, get_eos_ids, get_max_seq_len, get_max_context_len, get_vocab_size, use_kv_cache,
    enable_dynamic_shape                                                                 (constant methods)

KV caches and lightning states are mutable buffers inside the program (they persist across `forward` calls).
Lowering choices: the module swaps in swaps.py (llama::update_cache / llama::custom_sdpa, bf16 tables); pocketllm ops
stay single custom ops on our kernels (ops.py): any4 layers (pocketllm::any4_linear, or any4_linear_w4a8 for
`--quant any4-w4a8`), int8 layers and 8-bit LM heads (pocketllm::int8_linear); a packed embedding table gathers its
rows with portable ops (embedding + dequantize) from the same constant a tied head's op reads (stored once);
norms, RoPE and SwiGLU products are pocketllm ops too in those programs (options.elementwise, swaps.py);
float linear layers go to XNNPACK (fp32, or torchao's int8-activation x int4-weight for `8da4w`); int4/nf4
checkpoints (export/quant) dequantize in the graph (portable kernels, slow); MoE layers run only their routed
experts (`pocketllm::moe_ffn` on stacked constants, or `pocketllm::expert_store_moe_ffn` on the bundle's
experts.bin: options.experts), or, with experts "all", every expert with zero weights for unselected ones.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pocketllm.export.spec import ModelSpec
from pocketllm.export.targets.executorch.options import W4A8, ExecutorchOptions
from pocketllm.export.targets.executorch.signature_memo import memoized_signatures
from pocketllm.export.targets.executorch.swaps import (FusedRMSNorm, XnnpackRMSNorm, any4_luts_to_bf16,
                                                      embedding_table_to_bf16, moe_blocks, quantize_torchao,
                                                      use_expert_store, use_fused_elementwise, use_kv_cache_dtype,
                                                      use_llama_ops, use_stacked_experts, use_xnnpack_norms_and_rope)

PTE_FILE = "model.pte"
FORMAT_VERSION = 1  # of the .pte contract above; bumped when methods or inputs change
CUSTOM_OP_NAMESPACES = ("pocketllm::",)  # ops that need our kernel library; llama::* ship with ExecuTorch


# ------------------------------------------------------------------------------------------ export + lower
def metadata(spec: ModelSpec, max_context: int, prefill_chunk: int) -> dict[str, Any]:
    """Constant methods ExecuTorch's LLM runner (and Android LlmModule) read; names as in runner/constants.h.
    get_max_seq_len is the most tokens one forward call takes (the runner prefills longer prompts in chunks),
    get_max_context_len the KV cache size."""
    return {
        "get_bos_id": spec.bos_token_id if spec.bos_token_id is not None else -1,
        "get_eos_ids": list(spec.eos_token_ids),
        "get_max_seq_len": prefill_chunk,
        "get_max_context_len": max_context,
        "get_vocab_size": spec.vocab_size,
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "get_pocketllm_format_version": FORMAT_VERSION,
    }


def export_program(model: nn.Module, max_tokens: int) -> "torch.export.ExportedProgram":
    """torch.export of forward(tokens [1, T], start_pos [1]) with T dynamic in [1, max_tokens]."""
    from torch.export import Dim

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    example_t = min(2, max_tokens)
    tokens = torch.zeros(1, example_t, dtype=torch.long)
    start = torch.zeros(1, dtype=torch.long)
    dims = ({1: Dim("tokens", min=1, max=max_tokens)}, None) if max_tokens > 1 else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_check_is_size.*")
        return torch.export.export(model, (tokens, start), dynamic_shapes=dims, strict=False)


def xnnpack_partitioner(skip_modules: str | None = None, linears_only: bool = False):
    """XNNPACK's partitioner; skip_modules: ops traced inside a module whose path contains this stay out of it. The
    all-experts MoE graph needs that: its ~2000 per-expert elementwise islands between the expert calls grow
    XNNPACK's partition merging past 20 GB on the SmallThinker 4B, so they run on ExecuTorch's own kernels while the
    rest (norms, RoPE, float linears such as an fp32 LM head) stays in XNNPACK. linears_only: XNNPACK takes float
    linears and matmuls alone (a router, an fp32 head); the residual adds and scales between our ops run on
    ExecuTorch's kernels (~1 us a call) instead of as one-op partitions (~10-25 us of delegate dispatch)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    configs = None  # XNNPACK's default: every op it supports
    if linears_only:
        from executorch.backends.xnnpack.partition.config.gemm_configs import AddmmConfig, LinearConfig, MMConfig

        configs = [LinearConfig, AddmmConfig, MMConfig]
    if skip_modules is None:
        return XnnpackPartitioner(configs=configs)

    def inside(node) -> bool:
        return any(skip_modules in str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values())

    class Partitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):  # what XNNPACK will not take must be decomposed as usual (aten.linear)
            ops, keep = super().ops_to_not_decompose(ep)
            return ops, (lambda node: not inside(node) and (keep is None or keep(node)))

        def get_matched_nodes_from_configs(self, ep):
            return [group for group in super().get_matched_nodes_from_configs(ep)
                    if not any(inside(n) for n in group)]

    return Partitioner(configs=configs)


def lower(ep, constants: dict[str, Any], xnnpack: bool = True, skip_modules: str | None = None,
          linears_only: bool = False):
    """XNNPACK partitioning (unless xnnpack is False; none of the ops inside `skip_modules`; float linears alone if
    linears_only), then the ExecuTorch program (mutable buffers stay in it)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_check_is_size.*")
        return to_edge_transform_and_lower(
            ep, partitioner=[xnnpack_partitioner(skip_modules, linears_only)] if xnnpack else [],
            constant_methods=constants,
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))


def embedding_storage(model: nn.Module) -> str:
    """What the embedding gather reads: a packed scheme ("int8", "any4", ...) or the float table's dtype."""
    emb = model.model.embed_tokens
    if hasattr(emb, "scheme"):
        return emb.scheme
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(emb.weight.dtype, "fp32")


def module_kernels(model: nn.Module, xnnpack: bool = True, skip_modules: str | None = None) -> dict[str, str]:
    """What each weight-carrying module runs on in the program: module name -> kernel (custom op, XNNPACK, or a
    portable decomposition). The LM head is listed as `lm_head` also when it is tied to the embedding table."""
    from pocketllm.export.nn.quant_linear import Any4Linear, Any4W4A8Linear, Int4Linear, Int8Linear, QuantEmbedding

    def kernel(m: nn.Module) -> str | None:
        if isinstance(m, Any4W4A8Linear):
            return "pocketllm::any4_linear_w4a8"
        if isinstance(m, Any4Linear):
            return "pocketllm::any4_linear"
        if isinstance(m, Int8Linear):
            return "pocketllm::int8_linear"
        if isinstance(m, Int4Linear):
            return f"{m.scheme}: dequantize in the graph + linear (portable)"
        if isinstance(m, FusedRMSNorm):
            return "pocketllm::rms_norm"
        if isinstance(m, XnnpackRMSNorm):
            return "XNNPACK RMSNorm (mean of squares as a matmul)" if xnnpack else "RMSNorm (portable ops)"
        if isinstance(m, nn.Linear):
            quantized = type(m.weight).__name__ not in ("Parameter", "Tensor")  # torchao's tensor subclass
            return "XNNPACK linear (8da4w, torchao)" if quantized else float_linear
        return None

    float_linear = "XNNPACK linear (fp32)" if xnnpack else "linear (portable, fp32)"
    out = {}
    for name, m in model.named_modules():
        if name == "model.embed_tokens":
            out[name] = (f"gather + dequantize {m.scheme} rows (portable ops)" if isinstance(m, QuantEmbedding)
                         else "gather (portable embedding)")
        elif (k := kernel(m)) is not None:
            out[name] = "linear (portable, fp32)" if k.startswith("XNNPACK linear (fp32)") and skip_modules and \
                skip_modules in name else k
    if model.lm_head is None:
        emb = model.model.embed_tokens
        out["lm_head"] = ({"int8": "pocketllm::int8_linear", "any4": "pocketllm::any4_linear"}.get(
            emb.scheme, f"{emb.scheme}: dequantize in the graph + linear (portable)") if isinstance(emb, QuantEmbedding)
            else float_linear) + " (tied: the embedding table's tensor)"
    return out


def program_delegates(et_program) -> list[str]:
    """The backends the program actually delegates to (none when the partitioner found nothing to take)."""
    return sorted({d.id for p in et_program.executorch_program.execution_plan for d in p.delegates})


def program_operators(et_program) -> list[str]:
    plan = et_program.executorch_program.execution_plan
    names = set()
    for p in plan:
        for op in p.operators:
            names.add(op.name + (f".{op.overload}" if op.overload else ""))
    return sorted(names)


def export_executorch(model: nn.Module, spec: ModelSpec, options: ExecutorchOptions, out_dir: Path,
                      stage: Callable[[str], Any] | None = None) -> dict:
    """Write `out_dir/model.pte`; returns the manifest's `targets.executorch` entry.

    `model` is a loaded CausalLM (quantized already for any4/int4/int8, by export/quant); 8da4w is applied here.
    stage(name) is a context-manager factory for progress display ("export", "lower", "serialize"). The entry's
    `quantization` holds what this target adds to the checkpoint's quantization (8da4w's scheme, LUT dtypes).
    """
    from contextlib import nullcontext

    stage = stage or (lambda name: nullcontext())
    timings: dict[str, float] = {}
    quant_info: dict[str, Any] = {}
    n_swapped = use_llama_ops(model) if options.llama_sdpa else 0
    if options.kv_cache_dtype != "float32":
        use_kv_cache_dtype(model, getattr(torch, options.kv_cache_dtype))
    moe_info, store_info = None, None
    if moe_blocks(model):  # before 8da4w and W4A8: stacked experts keep their own kernels (pocketllm::moe_ffn*)
        moe_info = {"experts": "all", "ops": [], "expert_dtype": [], "all_experts_layers": [i for i, _ in
                                                                                             moe_blocks(model)]}
        if options.experts != "all":
            with stage("experts"):
                t0 = time.perf_counter()
                if options.experts == "inline":
                    moe_info = use_stacked_experts(model)
                else:
                    moe_info, store_info = use_expert_store(model, Path(out_dir), options.expert_cache_mb)
                timings["experts_s"] = time.perf_counter() - t0
    fused = options.fused_elementwise
    if fused:
        use_fused_elementwise(model)
    else:
        use_xnnpack_norms_and_rope(model)
    linears_only = fused and options.quant != "8da4w"  # 8da4w's dynamically quantized linears need the whole set
    if options.quant == W4A8:
        from pocketllm.export.nn.quant_linear import use_w4a8

        swapped = use_w4a8(model)
        quant_info.update(activations="int8 dynamic per token, symmetric (W4A8, docs/quantization.md)",
                          w4a8_layers=len(swapped))
    if options.quant == "8da4w":
        with stage("quantize"):
            t0 = time.perf_counter()
            quant_info = quantize_torchao(model, options.group_size)
            timings["quantize_s"] = time.perf_counter() - t0

    lut_dtypes = any4_luts_to_bf16(model)
    if lut_dtypes:
        quant_info["lut_dtype_layers"] = lut_dtypes
    embedding_dtype = "bf16" if embedding_table_to_bf16(model) else embedding_storage(model)
    all_experts = moe_info is not None and moe_info["experts"] == "all"
    skip_modules = "block_sparse_moe" if all_experts else None  # see xnnpack_partitioner
    quant_info["per_module"] = module_kernels(model, options.xnnpack, skip_modules)
    with memoized_signatures():  # signature lookups per node are quadratic in the constants otherwise
        with stage("export"):
            t0 = time.perf_counter()
            chunk = min(options.prefill_chunk, options.max_context)
            ep = export_program(model, chunk)
            timings["export_s"] = time.perf_counter() - t0
        with stage("lower"):
            t0 = time.perf_counter()
            edge = lower(ep, metadata(spec, options.max_context, chunk), options.xnnpack, skip_modules, linears_only)
            del ep
            et = edge.to_executorch()
            timings["lower_s"] = time.perf_counter() - t0
    with stage("serialize"):
        t0 = time.perf_counter()
        with open(Path(out_dir) / PTE_FILE, "wb") as f:
            et.write_to_file(f)
        timings["serialize_s"] = time.perf_counter() - t0
    ops = program_operators(et)
    custom = [op for op in ops if op.startswith(CUSTOM_OP_NAMESPACES)]
    extra = {}
    if moe_info is not None:
        extra["moe"] = moe_info
    if store_info is not None:
        extra["expert_store"] = store_info
    return {
        "file": PTE_FILE,
        "format_version": FORMAT_VERSION,
        "methods": ["forward", *metadata(spec, options.max_context, chunk)],
        "prefill_chunk": chunk,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"], "T": [1, chunk]},
                   {"name": "start_pos", "dtype": "int64", "shape": [1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", spec.vocab_size]}],
        "mutable_buffers": "KV caches and lightning states, persistent across forward calls",
        "delegates": program_delegates(et),
        "operators": ops,
        "requires_kernels": custom,  # [] = stock ExecuTorch runtimes (pip, Maven AAR, Swift package) run it
        "kernel_library": "libpocketllm_kernels" if custom else None,
        "llama_sdpa_layers": n_swapped,
        "kv_cache_dtype": options.kv_cache_dtype,
        "elementwise": "fused" if fused else "xnnpack",
        "embedding_table_dtype": embedding_dtype,
        "quantization": quant_info,
        **extra,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }

