"""ExecuTorch target: one `.pte` following ExecuTorch's LLM runner contract.

    forward(tokens int64 [1, T], start_pos int64 [1]) -> logits fp32 [1, T, vocab]     (T dynamic, 1..max_context)
    get_bos_id, get_eos_ids, get_max_seq_len, get_max_context_len, get_vocab_size, use_kv_cache,
    enable_dynamic_shape                                                                 (constant methods)

KV caches and lightning states are mutable buffers inside the program (they persist across `forward` calls).
Lowering choices (what differs from the eager model):
- softmax layers write their KV cache in place with `llama::update_cache` (slice assignment would copy the whole
  cache every call), and dense, non-windowed ones attend with `llama::custom_sdpa` (ExecuTorch's fused kernels,
  shipped in the wheel and in the Android/iOS runtimes);
- `pocketllm::infllm_attention`, `pocketllm::lightning_attention` and `pocketllm::any4_linear` stay single custom ops
  (no decomposition): at run time they need our kernel library (kernels/, `runtime_py.executorch_runner`);
- linear layers go to XNNPACK (fp32, or torchao's int8-activation x int4-weight for `8da4w`); any4 linears call
  `pocketllm::any4_linear`; int4/int8 checkpoints (export/quant) dequantize in the graph (portable kernels, slow).
- MoE layers run every expert with zero weights for unselected ones (export/nn/mlp.py, static shapes).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from export.errors import PocketllmError
from export.nn.attention import Attention
from export.ops.infllm_attention import infllm_op_args
from export.spec import ModelSpec

PTE_FILE = "model.pte"
QUANT_SCHEMES = ("none", "int8", "int4", "any4", "8da4w")
FORMAT_VERSION = 1  # of the .pte contract above; bumped when methods or inputs change
CUSTOM_OP_NAMESPACES = ("pocketllm::",)


DEFAULT_PREFILL_CHUNK = 256


@dataclass(frozen=True)
class ExecutorchOptions:
    """max_context: KV cache positions (get_max_context_len). prefill_chunk: most tokens per forward call
    (get_max_seq_len, the dynamic T's upper bound): memory planning sizes activations, logits included, for it."""

    max_context: int
    quant: str = "none"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    llama_sdpa: bool = True  # dense layers through llama::update_cache / llama::custom_sdpa
    group_size: int = 128  # 8da4w / int4 group along K (falls back to the largest of 128/64/32 dividing K)

    def __post_init__(self):
        if self.prefill_chunk < 1:
            raise PocketllmError(f"--prefill-chunk must be positive (got {self.prefill_chunk})")
        if self.quant not in QUANT_SCHEMES:
            raise PocketllmError(f"unknown --quant {self.quant!r} (expected one of: {', '.join(QUANT_SCHEMES)})")


# ------------------------------------------------------------------------------------------ attention swap
class LlamaOpsAttention(Attention):
    """Export twin of Attention for every softmax layer with a cache.

    Differs from the eager block only in how the cache is written and read:
    - `llama::update_cache` writes k/v at start_pos in place (slice assignment lowers to slice_scatter + copy_,
      which copies the whole cache buffer on every call: 400 MB per token for a 0.5B model at 16K context);
    - dense layers: `llama::custom_sdpa`, causal attention of the T queries over cache[0:start_pos+T] (GQA, scale
      1/sqrt(D), fp32 softmax);
    - InfLLM v2 layers: `pocketllm::infllm_attention` on the updated cache, as in eager;
    - sliding-window layers: the eager masked SDPA over cache[0:start_pos+T].
    The cache-free path is unchanged.
    """

    def forward(self, x, rotary, positions, start_pos):
        if start_pos is None:
            return super().forward(x, rotary, positions, start_pos)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.layer.use_rope:
            q, k = rotary(q, positions), rotary(k, positions)
        torch.ops.llama.update_cache(k, self.k_cache, start_pos)
        torch.ops.llama.update_cache(v, self.v_cache, start_pos)
        if self.sparse is not None:
            out = torch.ops.pocketllm.infllm_attention(q, self.k_cache, self.v_cache, start_pos,
                                                       *infllm_op_args(self.sparse))
        elif self.layer.sliding_window is not None:
            keys, values = self.k_cache[:, :start_pos + T], self.v_cache[:, :start_pos + T]
            key_pos = torch.arange(start_pos + T)
            mask = (key_pos[None, :] <= positions[:, None]) & (
                positions[:, None] - key_pos[None, :] < self.layer.sliding_window)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                                 attn_mask=mask, enable_gqa=True).transpose(1, 2)
        else:
            out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0.0, True, None)
        return self.o_proj(out.reshape(B, T, -1))


def use_llama_ops(model: nn.Module) -> int:
    """Swap softmax attention blocks to LlamaOpsAttention in place. Returns how many were swapped."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::* for export)

    n = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = LlamaOpsAttention
            n += 1
    return n


# ------------------------------------------------------------------------------------------ quantization
def _group_for(k: int, preferred: int) -> int:
    for g in (preferred, 128, 64, 32):
        if g <= k and k % g == 0:
            return g
    raise PocketllmError(f"8da4w: input width {k} is not a multiple of 32; use --quant none or int8")


def quantize_torchao(model: nn.Module, group_size: int) -> dict[str, Any]:
    """8da4w: XNNPACK's dynamically quantized linears via torchao, int8 activations (asymmetric, per token) x int4
    symmetric groupwise weights (fp32 scales). Embeddings and a tied LM head stay fp32 (as for any4)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups, numel, bits = set(), 0, 0.0
    for m in linears:
        g = _group_for(m.in_features, group_size)
        groups.add(g)
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(g)),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
        numel += m.in_features * m.out_features
        bits += m.in_features * m.out_features * (4 + 32 / g)  # fp32 scale per group (XNNPACK converts to bf16)
    return {"scheme": "8da4w", "weights": "int4 symmetric groupwise", "activations": "int8 dynamic per token",
            "group_size": max(groups) if groups else None, "layers": len(linears),
            "bits_per_weight": round(bits / numel, 3) if numel else None, "kernel": "XNNPACK (torchao)"}


def any4_luts_to_bf16(model: nn.Module) -> dict[str, int]:
    """Carry each any4 LUT as bf16 when that is lossless (always for LUTs `pocketllm quantize` writes, see
    export/quant/any4.lut_grid): the kernel then widens entries with a shift instead of vcvtph2ps (1.4x faster
    decode on x86). Other LUTs stay fp16 (the kernel's slower fp16 path). Returns {dtype: layers}."""
    from export.nn.quant_linear import Any4Linear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Any4Linear):
            as_bf16 = m.lut.to(torch.bfloat16)
            exact = torch.equal(as_bf16.to(torch.float32), m.lut.to(torch.float32))
            if exact:
                m.lut = as_bf16  # replaces the registered buffer
            key = "bf16" if exact else {torch.float16: "fp16", torch.float32: "fp32"}.get(m.lut.dtype, str(m.lut.dtype))
            counts[key] = counts.get(key, 0) + 1
    return counts


class Bf16Embedding(nn.Module):
    """Token embedding whose gather table is stored in bf16; gathered rows are widened to fp32 (exact)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight).to(torch.float32)


def embedding_table_to_bf16(model: nn.Module) -> bool:
    """bf16 checkpoints (every released MiniCPM4 / SmallThinker / MiniMax) load into fp32 values that are exact in
    bf16: the `.pte` keeps the embedding gather table in bf16, half its bytes (0.5b: 150 of 770 MiB). A tied LM head
    keeps the fp32 table as its own weight, which XNNPACK packs anyway. Call after any quantization of nn.Linear
    layers (8da4w must not see the LM head). Returns whether the table was converted."""
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(emb, nn.Embedding) or emb.weight.dtype != torch.float32:
        return False
    w = emb.weight.detach()
    if not torch.equal(w.to(torch.bfloat16).to(torch.float32), w):
        return False
    if model.lm_head is None:  # tied: give the head its own reference to the fp32 table
        head = nn.Linear(w.shape[1], w.shape[0], bias=False)
        head.weight = nn.Parameter(w, requires_grad=False)
        model.lm_head = head
    model.model.embed_tokens = Bf16Embedding(w)
    return True


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


def lower(ep, constants: dict[str, Any]):
    """XNNPACK partitioning, then the ExecuTorch program (mutable buffers stay in the program)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*_check_is_size.*")
        return to_edge_transform_and_lower(
            ep, partitioner=[XnnpackPartitioner()], constant_methods=constants,
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))


def program_operators(et_program) -> list[str]:
    plan = et_program.executorch_program.execution_plan
    names = set()
    for p in plan:
        for op in p.operators:
            names.add(op.name + (f".{op.overload}" if op.overload else ""))
    return sorted(names)


def export_executorch(model: nn.Module, spec: ModelSpec, options: ExecutorchOptions, out_dir: Path,
                      stage: Callable[[str], Any] | None = None, quant_info: dict[str, Any] | None = None) -> dict:
    """Write `out_dir/model.pte`; returns the manifest's `targets.executorch` entry.

    `model` is a loaded CausalLM (quantized already for any4/int4, by export/quant); 8da4w/int8 are applied here.
    stage(name) is a context-manager factory for progress display ("export", "lower", "serialize").
    """
    from contextlib import nullcontext

    stage = stage or (lambda name: nullcontext())
    timings: dict[str, float] = {}
    quant_info = dict(quant_info or {"scheme": "none"})
    n_swapped = use_llama_ops(model) if options.llama_sdpa else 0
    if options.quant == "8da4w":
        with stage("quantize"):
            t0 = time.perf_counter()
            quant_info = quantize_torchao(model, options.group_size)
            timings["quantize_s"] = time.perf_counter() - t0

    lut_dtypes = any4_luts_to_bf16(model)
    if lut_dtypes:
        quant_info["lut_dtype_layers"] = lut_dtypes
    embedding_dtype = "bf16" if embedding_table_to_bf16(model) else "fp32"
    with stage("export"):
        t0 = time.perf_counter()
        chunk = min(options.prefill_chunk, options.max_context)
        ep = export_program(model, chunk)
        timings["export_s"] = time.perf_counter() - t0
    with stage("lower"):
        t0 = time.perf_counter()
        edge = lower(ep, metadata(spec, options.max_context, chunk))
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
    return {
        "file": PTE_FILE,
        "format_version": FORMAT_VERSION,
        "methods": ["forward", *metadata(spec, options.max_context, chunk)],
        "prefill_chunk": chunk,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": [1, "T"], "T": [1, chunk]},
                   {"name": "start_pos", "dtype": "int64", "shape": [1]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "T", spec.vocab_size]}],
        "mutable_buffers": "KV caches and lightning states, persistent across forward calls",
        "delegates": ["XnnpackBackend"],
        "operators": ops,
        "custom_ops": custom,
        "kernel_library": "libpocketllm_kernels" if custom else None,
        "llama_sdpa_layers": n_swapped,
        "embedding_table_dtype": embedding_dtype,
        "quantization": quant_info,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }

