"""Module swaps of the ExecuTorch target (how the exported model differs from the eager one).

- Softmax layers with a cache write it in place with `llama::update_cache` (slice assignment lowers to
  slice_scatter + copy_, which copies the whole cache buffer on every call: 400 MB per token for a 0.5B model at 16K
  context): LlamaKVCache.
- Dense, non-windowed layers attend with `llama::custom_sdpa` (ExecuTorch's fused kernel, shipped in the wheel and
  in the Android/iOS runtimes): CustomSdpaCore. InfLLM v2 and sliding-window cores are unchanged.
- The embedding gather table is stored in bf16 when that is exact; any4 LUTs are carried as bf16 when lossless.
- RMSNorm and RoPE are written with ops XNNPACK takes, so that each stays inside one XNNPACK partition instead of
  being cut by portable kernels (a partition boundary costs a delegate call, and XNNPACK re-plans every partition
  for the dynamic token count on every call): the mean of squares as a matmul by a [1, H] vector of 1/H (XNNPACK
  delegates `mean` only over the last two dims of 4-D tensors), and rotate-half as a matmul by a signed
  permutation (no slice_copy / cat on portable kernels). Same values up to the summation order of the mean;
  rotate-half is exact.
- MoE layers (SmallThinker, MiniMax) run only their routed experts (ExecutorchOptions.experts): "inline" stacks each
  layer's experts once into constants of the program and calls `pocketllm::moe_ffn` / `moe_ffn_any4`; "file"
  writes them to the bundle's experts.bin and calls `pocketllm::expert_store_moe_ffn` (with
  `pocketllm::expert_store_prefetch` right after a pre-attention router); "all" keeps the graph that runs every
  expert with zero weight for the unchosen ones (for comparison).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.attention_core import DenseCore
from pocketllm.export.nn.kv_cache import KVCache


class LlamaKVCache(KVCache):
    """KVCache written with `llama::update_cache` (in place, layout [1, S, H, D]); same contract as KVCache. Keys and
    values are cast to the cache's dtype first (update_cache copies bytes)."""

    def update(self, k, v, start_pos):
        torch.ops.llama.update_cache(k.to(self.k_cache.dtype), self.k_cache, start_pos)
        torch.ops.llama.update_cache(v.to(self.v_cache.dtype), self.v_cache, start_pos)
        return self.k_cache, self.v_cache


class CustomSdpaCore(DenseCore):
    """Causal attention of the T queries over cache[0:start_pos+T] with `llama::custom_sdpa` (GQA, scale
    1/sqrt(D), fp32 softmax), reading the whole cache buffers. The cache-free path is DenseCore's."""

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return super().forward(q, keys, values, start_pos, positions)
        return torch.ops.llama.custom_sdpa(q, keys, values, start_pos, None, 0.0, True, None)


def use_llama_ops(model: nn.Module) -> int:
    """Swap every KV cache to LlamaKVCache and every dense core to CustomSdpaCore, in place. Returns how many
    attention blocks were swapped to custom_sdpa."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::* for export)

    from pocketllm.export.nn.attention import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.cache = LlamaKVCache.sharing(module.cache)
            if type(module.core) is DenseCore:
                module.core = CustomSdpaCore()
                n += 1
    return n


def use_kv_cache_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Re-allocate every softmax layer's KV cache in `dtype` (ExecutorchOptions.kv_cache_dtype; the target's check
    has made sure every such layer runs InfLLM v2). Returns how many caches."""
    from pocketllm.export.nn.attention import Attention

    n = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.cache.reset(dtype)
            n += 1
    return n


def _group_for(k: int, preferred: int) -> int:
    for g in (preferred, 128, 64, 32):
        if g <= k and k % g == 0:
            return g
    raise PocketllmError(f"8da4w: input width {k} is not a multiple of 32; use --quant none or int8")


def quantize_torchao(model: nn.Module, group_size: int | None) -> dict[str, Any]:
    """8da4w: XNNPACK's dynamically quantized linears via torchao, int8 activations (asymmetric, per token) x int4
    symmetric groupwise weights (fp32 scales). Embeddings and a tied LM head stay fp32 (as for any4)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    group_size = group_size or 128
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    groups, numel, bits = set(), 0, 0.0
    for m in linears:
        g = _group_for(m.in_features, group_size)
        groups.add(g)
        quantize_(m, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(g)),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear))
        numel += m.in_features * m.out_features
        bits += m.in_features * m.out_features * (4 + 32 / g)  # fp32 scale per group (XNNPACK converts to bf16)
    return {"scheme": "8da4w", "weights": "int4 symmetric groupwise", "activations": "int8",
            "activation_quantization": "dynamic per token (XNNPACK)", "variant": "8da4w",
            "group_size": max(groups) if groups else None, "layers": len(linears),
            "bits_per_weight": round(bits / numel, 3) if numel else None, "kernel": "XNNPACK (torchao)"}


def any4_luts_to_bf16(model: nn.Module) -> dict[str, int]:
    """Carry each any4 LUT as bf16 when that is lossless (always for LUTs `pocketllm quantize` writes, see
    export/quant/any4.lut_grid): the kernel then widens entries with a shift instead of vcvtph2ps (1.4x faster
    decode on x86). Other LUTs stay fp16 (the kernel's slower fp16 path). Returns {dtype: layers}."""
    from pocketllm.export.nn.quant_linear import Any4Linear, QuantEmbedding

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, Any4Linear) or (isinstance(m, QuantEmbedding) and m.scheme == "any4"):
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


class XnnpackRMSNorm(nn.Module):
    """RMSNorm with the mean of squares as `linear(x * x, [1/H])`: one XNNPACK partition per norm."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        H = norm.weight.shape[0]
        self.register_buffer("inv_h", torch.full((1, H), 1.0 / H), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        ms = F.linear(xf * xf, self.inv_h)  # [..., 1]
        return (xf * torch.rsqrt(ms + self.eps) * self.weight.float()).to(x.dtype)


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """W with linear(x, W) = cat([-x[half:], x[:half]]): a signed permutation (exact in any float format)."""
    half = dim // 2
    w = torch.zeros(dim, dim)
    idx = torch.arange(half)
    w[idx, idx + half] = -1.0
    w[idx + half, idx] = 1.0
    return w


def use_xnnpack_norms_and_rope(model: nn.Module) -> dict[str, int]:
    """Swap every RMSNorm for XnnpackRMSNorm and give the rotary table a matmul rotate-half, in place."""
    from pocketllm.export.nn.norm import RMSNorm
    from pocketllm.export.nn.rope import RotaryAt, RotaryTable

    norms = 0
    for name, module in list(model.named_modules()):
        if type(module) is RMSNorm:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, XnnpackRMSNorm(module))
            norms += 1
    rotary = getattr(getattr(model, "model", None), "rotary", None)
    if isinstance(rotary, RotaryTable):
        perm = rotate_half_matrix(rotary.rope.dim)
        rotary.register_buffer("rotate_half_w", perm, persistent=False)

        def at(positions, table=rotary):
            return RotaryAt(table.cos[positions][None, :, None, :], table.sin[positions][None, :, None, :],
                            table.rope.dim, rotate_half=lambda x: F.linear(x, table.rotate_half_w))

        rotary.at = at
    return {"rms_norms": norms, "rope_rotate_half": "matmul" if isinstance(rotary, RotaryTable) else "none"}


class FusedRMSNorm(nn.Module):
    """RMSNorm as one pocketllm::rms_norm call (kernels/rms_norm.cpp, which takes an fp32 weight)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float(), requires_grad=False)  # no copy when fp32 already
        self.eps = norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.pocketllm.rms_norm(x, self.weight, self.eps)


def fused_rotary_at(at):
    """RotaryTable.at with its rows gathered as before and the rotation as one pocketllm::rope call."""

    def fused(positions):
        rows = at(positions)
        return lambda x, positions=None: torch.ops.pocketllm.rope(x, rows.cos, rows.sin)

    return fused


def use_fused_elementwise(model: nn.Module) -> dict[str, int]:
    """The decode step's elementwise work on our kernels, one op each: every RMSNorm -> pocketllm::rms_norm, RoPE ->
    pocketllm::rope, SiLU-gated MLPs' act(g) * u -> pocketllm::silu_mul. In place; returns what was swapped.

    Why: a decode step of a 0.5B model does ~100 of these on 1K-4K floats. As XNNPACK partitions each costs ~10 us of
    delegate dispatch on one thread and ~25 us on two (waking the other thread for nothing), 2.4 ms of a 12 ms step
    (benchmarks/profile_decode.py); as ExecuTorch's portable kernels, ~1100 calls (permute_copy + mm, sigmoid, ...).
    """
    import pocketllm.export.ops  # noqa: F401 (registers the ops)
    from pocketllm.export.nn.mlp import GatedMLP
    from pocketllm.export.nn.norm import RMSNorm
    from pocketllm.export.nn.rope import RotaryTable

    swapped = {"rms_norm": 0, "rope": 0, "silu_mul": 0}
    for name, module in list(model.named_modules()):
        if type(module) is RMSNorm:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, FusedRMSNorm(module))
            swapped["rms_norm"] += 1
        elif isinstance(module, GatedMLP) and module.activation == "silu":
            module.glu = torch.ops.pocketllm.silu_mul
            swapped["silu_mul"] += 1
    rotary = getattr(getattr(model, "model", None), "rotary", None)
    if isinstance(rotary, RotaryTable):
        rotary.at = fused_rotary_at(rotary.at)
        swapped["rope"] = 1
    return swapped


# ------------------------------------------------------------------------------------------ MoE experts
def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, MoE) of every mixture-of-experts layer."""
    return [(i, layer.block_sparse_moe) for i, layer in enumerate(model.model.layers)
            if getattr(layer, "block_sparse_moe", None) is not None]


def _release_freed_memory() -> None:
    from pocketllm.export.quant.quantize import _release_freed_memory as release

    release()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8"}[dtype]


def use_stacked_experts(model: nn.Module) -> dict[str, Any]:
    """Every MoE layer's dispatch -> StackedExperts (one pocketllm::moe_ffn / moe_ffn_any4 call), layer by layer;
    each expert's tensors are freed as they are copied into the stacks, and freed heap pages are returned to the OS
    after each layer, so peak memory stays about one model. Layers whose experts cannot be stacked (int4/nf4/int8)
    keep the all-experts graph. Returns the manifest's `moe` entry."""
    from pocketllm.export.nn.moe import stack_experts

    ops, dtypes, kept = set(), set(), []
    for i, moe in moe_blocks(model):
        stacked = stack_experts(moe)
        if stacked is None:
            kept.append(i)
            continue
        moe.dispatch = stacked
        moe.experts = nn.ModuleList()
        ops.add("moe_ffn_any4" if "gate_qweight" in stacked.names else "moe_ffn")
        dtypes.add("any4" if "gate_qweight" in stacked.names else _dtype_name(stacked.gate.dtype))
        _release_freed_memory()
    return {"experts": "inline", "ops": sorted(ops), "expert_dtype": sorted(dtypes), "all_experts_layers": kept}


def use_expert_store(model: nn.Module, out_dir: Path, cache_mb: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every MoE layer's experts -> out_dir/experts.bin, written expert by expert (each freed once written), and
    its dispatch -> StoredExperts. Returns (the manifest's `moe` entry, its `expert_store` entry)."""
    from pocketllm.export.nn.moe import StoredExperts, expert_dtypes, expert_tensors, free_expert
    from pocketllm.export.ops.expert_store import EXPERTS_FILE, ExpertFileWriter
    from pocketllm.runtime_py.ops.expert_store import ALIGNMENT, VERSION, LayerEntry

    plan, kept = [], []
    for i, moe in moe_blocks(model):
        dtypes = expert_dtypes(moe)
        if dtypes is None:
            kept.append(i)
            continue
        kind, t = expert_tensors(moe.experts[0])
        m = moe.moe
        if kind == "any4":
            entry = LayerEntry(i, "any4", m.num_experts, m.ffn_hidden_size, model.spec.hidden_size,
                               t["gate_scales"].shape[1], t["up_scales"].shape[1], t["down_scales"].shape[1],
                               _dtype_name(dtypes["gate_lut"]), _dtype_name(dtypes["gate_scales"]))
        else:
            entry = LayerEntry(i, _dtype_name(dtypes["gate"]), m.num_experts, m.ffn_hidden_size,
                               model.spec.hidden_size)
        plan.append((i, moe, entry, dtypes))
    if not plan:
        raise PocketllmError("--experts file: no MoE layer of this model can keep its experts in a file "
                             "(they are not all float or all any4)")
    writer = ExpertFileWriter(Path(out_dir) / EXPERTS_FILE, [entry for _, _, entry, _ in plan])
    for i, moe, entry, dtypes in plan:
        for e in range(len(moe.experts)):
            _, tensors = expert_tensors(moe.experts[e])
            writer.write_expert(i, e, {n: t.to(dtypes[n]) for n, t in tensors.items()})
            del tensors
            free_expert(moe, e)
        _release_freed_memory()
    store_id = writer.close()
    for i, moe, entry, _ in plan:
        moe.dispatch = StoredExperts(moe.moe.activation, store_id, i, prefetch=moe.pre_attention)
        moe.experts = nn.ModuleList()
    formats = sorted({entry.format for _, _, entry, _ in plan})
    info = {"experts": "file", "ops": ["expert_store_moe_ffn"], "expert_dtype": formats, "all_experts_layers": kept}
    store = {"file": EXPERTS_FILE, "id": store_id, "format_version": VERSION, "alignment": ALIGNMENT,
             "layers": [i for i, *_ in plan], "bytes": writer.size,
             "expert_block_bytes": max(entry.block_bytes for entry in writer.layers),
             "cache_mb": cache_mb or None,
             "prefetch": "pre_attention_router" if any(moe.pre_attention for _, moe, _, _ in plan) else "none"}
    return info, store
