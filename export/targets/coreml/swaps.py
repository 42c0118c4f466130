"""Module swaps the Core ML target applies before torch.export (no coremltools import here).

Core ML runs fixed shapes, keeps every cache as an fp16 state, and has no custom kernels, so the model is adapted
in place (class swaps and replaced children, as the ExecuTorch target does; no forward is re-implemented except in
the adapters marked ADAPTER below):

- `CoreMLCausalLM`: the entry point an app calls, `(tokens int32 [1, T], position int32 [1]) -> logits`. Token id -1
  marks padding after the real tokens of a prefill chunk; `CallContext` carries which tokens are real to the blocks
  whose state must ignore padding (lightning) or whose rule depends on the real length (InfLLM v2 `dense_len`).
- `RescaledRMSNorm`: RMSNorm that is overflow-free in fp16 (divides by max |x| before squaring).
- Attention (ADAPTER: today's `Attention` has no swappable cache/core; the lead ports these into
  `export/nn/kv_cache.py` / `attention_core.py`): `StaticKVCache` writes the new rows into the full fixed-size
  cache; `StaticDenseCore` attends over the whole cache with a causal (and sliding-window) mask;
  `StaticInfLLMCore` keeps InfLLM v2's compressed keys in a state of their own and calls
  `pocketllm_coreml::infllm_attention` (composite MIL in ops.py).
- Lightning (ADAPTER): same block, calling `pocketllm_coreml::lightning_attention`, which leaves padding out of the
  state.
- MoE decode (one token): `pocketllm_coreml::moe_routed_experts` runs only the routed experts (one `cond` per
  expert in MIL). Prefill chunks keep the model's own path (every expert, zero weight when not routed).
- int8 / int4 / nf4 linears: `pocketllm_coreml::quantized_linear`, which the converter stores as constexpr ops.
  any4 linears already call `pocketllm::any4_linear`.

The `pocketllm_coreml::*` ops are lowering markers of this target only: their eager implementations delegate to
the shared references (export/ops, export/nn/quant_linear.py), so the swapped model stays checkable in eager mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import export.ops  # noqa: F401  (registers pocketllm custom ops)
from export.errors import PocketllmError
from export.nn.attention import Attention
from export.nn.decoder import CausalLM
from export.nn.lightning import LightningAttention
from export.nn.mlp import MoE, SoftmaxTopKMoE
from export.nn.norm import RMSNorm
from export.nn.quant_linear import Any4Linear, Int4Linear, Int8Linear, _Packed, dequantize_packed
from export.ops.infllm_attention import infllm_attention_reference
from export.ops.lightning_attention import lightning_attention_reference

PAD_TOKEN_ID = -1
NAMESPACE = "pocketllm_coreml"
LIB = torch.library.Library(NAMESPACE, "DEF")


# ---------------------------------------------------------------------------------------------- entry point
class CallContext:
    """Per-call facts the entry point computes once and the swapped blocks read: `n_valid` (int32 0-d tensor, the
    number of real tokens; the rest of the chunk is padding)."""

    n_valid: torch.Tensor | None = None


class CoreMLCausalLM(CausalLM):
    """What both Core ML functions compute: forward(tokens int32 [1, T], position int32 [1]) -> logits fp32 [1, T, V].

    `position` is the absolute position of tokens[0, 0]; real tokens come first, padding (id -1) after them. Padded
    rows get meaningless logits and write meaningless cache rows beyond the real ones, which later calls overwrite
    before any query can see them (causal masks); states that accumulate (lightning) skip them.
    """

    coreml_call: CallContext

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        valid = tokens[0] >= 0
        self.coreml_call.n_valid = valid.to(torch.int32).sum()
        ids = torch.clamp(tokens, min=0).to(torch.int64)
        return super().forward(ids, position)


# ---------------------------------------------------------------------------------------------- norm
class RescaledRMSNorm(RMSNorm):
    """RMSNorm that cannot overflow in fp16: x / rms(x) is scale-invariant, so the squares are taken of
    x / max|x| (in [-1, 1]) and eps is rescaled to match:

        y = (x / m) * rsqrt(mean((x / m)^2) + eps / m / m) * w,   m = max(max |x|, 2^-14)

    Equal to x * rsqrt(mean(x^2) + eps) * w in exact arithmetic. Naive fp16 overflows once |x| > 256 (x^2 > 65504):
    MiniCPM4's residual stream (embeddings x scale_emb, muP branch scales) gets there on real prompts (ExecuTorch
    issue 15833). Every op stays fp16, so the norm runs on the Neural Engine too (fp32 islands would not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.clamp(x.abs().amax(dim=-1, keepdim=True), min=2.0 ** -14)
        xs = x / m
        return xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + self.eps / m / m) * self.weight


# ---------------------------------------------------------------------------------------------- attention
class StaticKVCache(nn.Module):
    """ADAPTER (contract: export/nn/kv_cache.py). Buffers k_cache, v_cache [1, S, Hkv, D] (Core ML states).
    update(k, v, start_pos) writes rows start_pos .. start_pos+T-1 (slice assignment: MIL slice_update on the state)
    and returns the whole caches: every later op has a static shape."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__()
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)

    def update(self, k, v, start_pos):
        T = k.shape[1]
        self.k_cache[:, start_pos:start_pos + T] = k
        self.v_cache[:, start_pos:start_pos + T] = v
        return self.k_cache, self.v_cache


class StaticDenseCore(nn.Module):
    """ADAPTER (contract: export/nn/attention_core.py DenseCore / SlidingWindowCore). Causal (optionally
    sliding-window) attention of q [1, T, Hq, D] over the WHOLE cache [1, S, Hkv, D] with a mask: fixed shapes, cost
    O(T * S) whatever the position. GQA without repeating K/V (query heads of a group are stacked as rows)."""

    def __init__(self, window: int | None):
        super().__init__()
        self.window = window

    def forward(self, q, k_all, v_all, start_pos, positions):
        _, T, Hq, D = q.shape
        S, Hkv = k_all.shape[1], k_all.shape[2]
        G = Hq // Hkv
        key_pos = torch.arange(S)
        mask = key_pos[None, :] <= positions[:, None]  # [T, S]
        if self.window is not None:
            # torch.logical_and: aten.__and__ has no coremltools converter
            mask = torch.logical_and(mask, positions[:, None] - key_pos[None, :] < self.window)
        qg = q[0].reshape(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, T * G, D)  # row t * G + g
        k = k_all[0].transpose(0, 1)  # [Hkv, S, D]
        v = v_all[0].transpose(0, 1)
        scores = (qg * (1.0 / math.sqrt(D))) @ k.transpose(1, 2)  # [Hkv, T*G, S]
        row_mask = mask[:, None, :].expand(T, G, S).reshape(1, T * G, S)
        scores = scores.masked_fill(~row_mask, MASKED)
        out = torch.softmax(scores, dim=-1) @ v  # [Hkv, T*G, D]
        return out.reshape(Hkv, T, G, D).permute(1, 0, 2, 3).reshape(1, T, Hq, D)


MASKED = -30000.0  # finite "minus infinity": representable in fp16, exp() of it is 0, no NaN for empty rows


class StaticInfLLMCore(nn.Module):
    """ADAPTER (contract: export/nn/attention_core.py InfLLMCore). InfLLM v2 with its compressed keys kept between
    calls in the buffer `kc_cache` [1, NK, Hkv, D] (a Core ML state; NK = kernels that fit in the cache): each call
    recomputes only the kernels its tokens may complete and writes them back, so decode never re-reads the whole K
    cache to score blocks. The composite (selection + attention) is `pocketllm_coreml::infllm_attention`."""

    def __init__(self, sparse, kc_cache: torch.Tensor, call: CallContext, score_rule: str):
        super().__init__()
        self.sparse, self.call, self.score_rule = sparse, call, score_rule
        self.register_buffer("kc_cache", kc_cache, persistent=False)

    def forward(self, q, k_all, v_all, start_pos, positions):
        s = self.sparse
        out, new_kc = torch.ops.pocketllm_coreml.infllm_attention(
            q, k_all, v_all, self.kc_cache, start_pos, self.call.n_valid, s.kernel_size, s.kernel_stride,
            s.block_size, s.init_blocks, s.window_size, s.topk, s.dense_len, self.score_rule)
        self.kc_cache.copy_(new_kc)
        return out


class CoreMLAttention(Attention):
    """ADAPTER: Attention = projections + RoPE + `self.cache` + `self.core` (the layout of the new export/nn); the
    projection/RoPE lines are today's Attention.forward, unchanged."""

    cache: StaticKVCache
    core: nn.Module

    def forward(self, x, rotary, positions, start_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.layer.use_rope:
            q, k = rotary(q, positions), rotary(k, positions)
        k_all, v_all = self.cache.update(k, v, start_pos)
        out = self.core(q, k_all, v_all, start_pos, positions)
        return self.o_proj(out.reshape(B, T, -1))


def kernel_count(max_context: int, kernel_size: int, kernel_stride: int) -> int:
    """Compressed keys that fit in a cache of max_context rows (kernels are complete windows)."""
    return (max_context - kernel_size) // kernel_stride + 1 if max_context >= kernel_size else 0


def swap_attention(module: Attention, call: CallContext, score_rule: str) -> None:
    S = module.k_cache.shape[1]
    cache = StaticKVCache(module.k_cache, module.v_cache)
    del module.k_cache, module.v_cache  # now owned by module.cache (state names: ...self_attn.cache.k_cache)
    module.__class__ = CoreMLAttention
    module.cache = cache
    if module.sparse is not None and module.sparse.dense_len != -1 and S < module.sparse.dense_len:
        # every call has at most S < dense_len tokens: InfLLM v2 always takes its dense fallback at this context
        module.core = StaticDenseCore(None)
    elif module.sparse is not None:
        s = module.sparse
        nk = kernel_count(S, s.kernel_size, s.kernel_stride)
        if nk == 0:
            raise PocketllmError(f"--max-context {S} is shorter than one InfLLM v2 kernel ({s.kernel_size} tokens)")
        kc = torch.zeros(1, nk, module.num_kv_heads, module.head_dim, dtype=cache.k_cache.dtype)
        module.core = StaticInfLLMCore(s, kc, call, score_rule)
    else:
        module.core = StaticDenseCore(module.layer.sliding_window)


# ---------------------------------------------------------------------------------------------- lightning
class CoreMLLightning(LightningAttention):
    """ADAPTER: today's LightningAttention.forward with the op swapped for `pocketllm_coreml::lightning_attention`,
    which also takes the number of real tokens (the state must not decay or accumulate over padding)."""

    call: CallContext

    def forward(self, x, rotary, positions, start_pos):
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D).split(D, dim=-1)
        state = torch.where(positions[:1].view(1, 1, 1, 1) == 0, torch.zeros_like(self.state), self.state)
        out, new_state = torch.ops.pocketllm_coreml.lightning_attention(q, k, v, state, self.decay, self.block_size,
                                                                         self.call.n_valid)
        self.state.copy_(new_state)
        o = self.norm(out.reshape(B, T, H * D))
        o = torch.sigmoid(self.output_gate(x)) * o
        return self.out_proj(o)


# ---------------------------------------------------------------------------------------------- MoE
def linear_tensors(linear: nn.Module) -> tuple[str, list[torch.Tensor]]:
    """(storage descriptor "scheme:group", tensors) of a Linear or packed linear, in the order ops.py reads them."""
    if isinstance(linear, nn.Linear):
        return "none:0", [linear.weight]
    if isinstance(linear, (_Packed, CoreMLQuantLinear)):
        names = {"any4": ("qweight", "lut", "scales", "zeros"), "int4": ("qweight", "scales", "zeros"),
                 "nf4": ("qweight", "scales"), "int8": ("qweight", "scales")}[linear.scheme]
        return f"{linear.scheme}:{linear.group_size}", [getattr(linear, n) for n in names]
    raise PocketllmError(f"Core ML: cannot store a linear layer of type {type(linear).__name__}")


class RoutedExperts(nn.Module):
    """ADAPTER (contract: export/nn/moe.py dispatch). One-token calls run only the routed experts through
    `pocketllm_coreml::moe_routed_experts`; longer calls use the block's own dispatch (every expert, weight 0 when
    not routed: static shapes, and a 64-token chunk routes to nearly every expert anyway)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        first = block.experts[0]
        self.activation = "reglu" if hasattr(first, "gate") else "swiglu"
        names = ("gate", "up", "down") if self.activation == "reglu" else ("w1", "w3", "w2")
        layout, tensors = [], []
        for expert in block.experts:
            for n in names:
                desc, ts = linear_tensors(getattr(expert, n))
                layout.append(desc)
                tensors.extend(ts)
        self.layout = f"{self.activation}|{','.join(layout)}"
        self.tensors = tensors  # references to the experts' own parameters/buffers (no copy)

    def forward(self, u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.ops.pocketllm_coreml.moe_routed_experts(u, ids, weights, self.tensors, self.layout)


class CoreMLMoE(MoE):
    dispatch: RoutedExperts

    def forward(self, router_input, u):
        if u.shape[1] != 1:
            return super().forward(router_input, u)
        w, ids = self.routing(router_input.reshape(-1, u.shape[-1]))
        return self.dispatch(u.reshape(1, -1), ids, w).reshape(u.shape)


class CoreMLSoftmaxTopKMoE(SoftmaxTopKMoE):
    dispatch: RoutedExperts

    def forward(self, u):
        if u.shape[1] != 1:
            return super().forward(u)
        w, ids = self.routing(u.reshape(-1, u.shape[-1]))
        return self.dispatch(u.reshape(1, -1), ids, w).reshape(u.shape)


# ---------------------------------------------------------------------------------------------- linears
class CoreMLQuantLinear(nn.Module):
    """int8 / int4 / nf4 packed linear (buffers as the checkpoint stores them) calling
    `pocketllm_coreml::quantized_linear`, which the converter stores as constexpr ops instead of folding the
    dequantization into dense fp16 weights."""

    def __init__(self, packed: _Packed):
        super().__init__()
        self.quant, self.scheme, self.group_size = packed.quant, packed.scheme, packed.group_size
        self.in_features, self.out_features = packed.in_features, packed.out_features
        for name, buf in packed.named_buffers(recurse=False):
            self.register_buffer(name, buf)

    def forward(self, x):
        zeros = getattr(self, "zeros", None)
        return torch.ops.pocketllm_coreml.quantized_linear(x, self.qweight, self.scales, zeros, self.scheme,
                                                            self.group_size)


# ---------------------------------------------------------------------------------------------- apply
def apply_swaps(model: CausalLM, score_rule: str = "exact_softmax") -> dict[str, int]:
    """Swap the model (in place) into what the Core ML functions compute. Returns counts per swap."""
    if model.lm_head is not None and not isinstance(model.lm_head, nn.Linear):
        raise PocketllmError("Core ML stores the LM head in fp16; export a checkpoint quantized without "
                             "--quantize-lm-head")
    call = CallContext()
    counts = {"norms": 0, "attention": 0, "infllm": 0, "infllm_always_dense": 0, "lightning": 0, "moe": 0,
              "quantized_linears": 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int4Linear, Int8Linear)):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, CoreMLQuantLinear(module))
            counts["quantized_linears"] += 1
        elif isinstance(module, Any4Linear):
            counts["quantized_linears"] += 1
    for module in list(model.modules()):
        if type(module) is RMSNorm:
            module.__class__ = RescaledRMSNorm
            counts["norms"] += 1
        elif type(module) is Attention:
            swap_attention(module, call, score_rule)
            counts["attention"] += 1
            counts["infllm"] += isinstance(module.core, StaticInfLLMCore)
            counts["infllm_always_dense"] += module.sparse is not None and isinstance(module.core, StaticDenseCore)
        elif type(module) is LightningAttention:
            module.__class__ = CoreMLLightning
            module.call = call
            counts["lightning"] += 1
        elif type(module) in (MoE, SoftmaxTopKMoE):
            module.__class__ = CoreMLMoE if type(module) is MoE else CoreMLSoftmaxTopKMoE
            module.dispatch = RoutedExperts(module)
            counts["moe"] += 1
    model.__class__ = CoreMLCausalLM
    model.coreml_call = call
    return counts


# ---------------------------------------------------------------------------------------------- marker ops
LIB.define("quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, str scheme, int group_size)"
           " -> Tensor")
LIB.define("infllm_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kc_cache, SymInt start_pos, "
           "Tensor n_valid, int kernel_size, int kernel_stride, int block_size, int init_blocks, int window_size, "
           "int topk, int dense_len, str score_rule) -> (Tensor, Tensor)")
LIB.define("lightning_attention(Tensor q, Tensor k, Tensor v, Tensor state, Tensor decay, int block_size, "
           "Tensor n_valid) -> (Tensor, Tensor)")
LIB.define("moe_routed_experts(Tensor u, Tensor ids, Tensor weights, Tensor[] tensors, str layout) -> Tensor")


def _packed_weight(scheme: str, group: int, tensors: list[torch.Tensor], in_features: int) -> torch.Tensor:
    from export.quant.format import TensorQuant

    if scheme == "none":
        return tensors[0].float()
    names = {"any4": ("qweight", "lut", "scales", "zeros"), "int4": ("qweight", "scales", "zeros"),
             "nf4": ("qweight", "scales"), "int8": ("qweight", "scales")}[scheme]
    quant = TensorQuant(scheme, 0 if group == in_features else group)
    return dequantize_packed(quant, dict(zip(names, tensors)), in_features)


@torch.library.impl(LIB, "quantized_linear", "CompositeExplicitAutograd")
def _quantized_linear(x, qweight, scales, zeros, scheme, group_size):
    K = x.shape[-1]
    tensors = [qweight, scales] + ([zeros] if zeros is not None else [])
    return F.linear(x, _packed_weight(scheme, group_size, tensors, K).to(x.dtype))


@torch.library.register_fake(f"{NAMESPACE}::quantized_linear")
def _quantized_linear_fake(x, qweight, scales, zeros, scheme, group_size):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def compressed_key_window(T: int, n_kernels: int, kernel_stride: int) -> int:
    """How many kernels one call of T tokens (re)computes: every kernel it can complete, plus one."""
    return min(-(-T // kernel_stride) + 1, n_kernels)


def compressed_key_start(start_pos: int, m: int, n_kernels: int, kernel_size: int, kernel_stride: int) -> int:
    """First kernel a call at start_pos recomputes: the first one not complete before the call (clamped so that the
    window of m kernels stays inside the cache; kernels recomputed early get the same values)."""
    j0 = max(0, (start_pos - kernel_size + kernel_stride) // kernel_stride)  # ceil((start_pos - k + 1) / s)
    return min(j0, n_kernels - m)


def update_compressed_keys(k_cache, kc_cache, start_pos, T, kernel_size, kernel_stride):
    """Eager twin of the MIL update: kernels j0 .. j0+m-1 = mean of cache rows [s*j, s*j + k) (complete or not)."""
    nk = kc_cache.shape[1]
    m = compressed_key_window(T, nk, kernel_stride)
    j0 = compressed_key_start(int(start_pos), m, nk, kernel_size, kernel_stride)
    kc = kc_cache.clone()
    for j in range(j0, j0 + m):
        kc[:, j] = k_cache[:, kernel_stride * j:kernel_stride * j + kernel_size].float().mean(dim=1).to(kc.dtype)
    return kc


@torch.library.impl(LIB, "infllm_attention", "CompositeExplicitAutograd")
def _infllm_attention(q, k_cache, v_cache, kc_cache, start_pos, n_valid, kernel_size, kernel_stride, block_size,
                      init_blocks, window_size, topk, dense_len, score_rule):
    if score_rule != "exact_softmax":
        raise PocketllmError(f"pocketllm_coreml::infllm_attention: no eager reference for score rule {score_rule!r} "
                             "yet (the Core ML program implements it; see ops.py kernel_scores)")
    n = int(n_valid)
    out = torch.zeros_like(q)
    if n > 0:
        out[:, :n] = infllm_attention_reference(q[:, :n], k_cache, v_cache, int(start_pos), kernel_size,
                                                kernel_stride, block_size, init_blocks, window_size, topk, dense_len)
    kc = update_compressed_keys(k_cache, kc_cache, start_pos, q.shape[1], kernel_size, kernel_stride)
    return out, kc


@torch.library.register_fake(f"{NAMESPACE}::infllm_attention")
def _infllm_attention_fake(q, k_cache, v_cache, kc_cache, start_pos, n_valid, kernel_size, kernel_stride,
                           block_size, init_blocks, window_size, topk, dense_len, score_rule):
    return torch.empty_like(q), torch.empty_like(kc_cache)


@torch.library.impl(LIB, "lightning_attention", "CompositeExplicitAutograd")
def _lightning_attention(q, k, v, state, decay, block_size, n_valid):
    n = int(n_valid)
    out = torch.zeros_like(q)
    if n == 0:
        return out, state.clone()
    real, new_state = lightning_attention_reference(q[:, :n], k[:, :n], v[:, :n], state, decay, block_size)
    out[:, :n] = real
    return out, new_state


@torch.library.register_fake(f"{NAMESPACE}::lightning_attention")
def _lightning_attention_fake(q, k, v, state, decay, block_size, n_valid):
    return q.new_empty(q.shape), state.new_empty(state.shape)


def parse_layout(layout: str) -> tuple[str, list[tuple[str, int]]]:
    """"reglu|any4:128,any4:128,..." -> ("reglu", [("any4", 128), ...]) (three linears per expert)."""
    activation, _, specs = layout.partition("|")
    out = []
    for spec in specs.split(","):
        scheme, _, group = spec.partition(":")
        out.append((scheme, int(group)))
    return activation, out


TENSORS_PER_SCHEME = {"none": 1, "any4": 4, "int4": 3, "nf4": 2, "int8": 2}


def split_expert_tensors(layout: str, tensors: list) -> tuple[str, list[list[tuple[str, int, list]]]]:
    """-> (activation, per expert [(scheme, group, tensors) for gate, up, down])."""
    activation, specs = parse_layout(layout)
    experts, i = [], 0
    for e in range(len(specs) // 3):
        linears = []
        for scheme, group in specs[3 * e:3 * e + 3]:
            n = TENSORS_PER_SCHEME[scheme]
            linears.append((scheme, group, list(tensors[i:i + n])))
            i += n
        experts.append(linears)
    return activation, experts


@torch.library.impl(LIB, "moe_routed_experts", "CompositeExplicitAutograd")
def _moe_routed_experts(u, ids, weights, tensors, layout):
    activation, experts = split_expert_tensors(layout, tensors)
    act = F.relu if activation == "reglu" else F.silu
    out = torch.zeros(u.shape, dtype=torch.float32)
    for t in range(u.shape[0]):
        for slot in range(ids.shape[1]):
            gate, up, down = experts[int(ids[t, slot])]
            x = u[t:t + 1].float()
            K = x.shape[-1]
            g = F.linear(x, _packed_weight(gate[0], gate[1], gate[2], K))
            h = act(g) * F.linear(x, _packed_weight(up[0], up[1], up[2], K))
            out[t] += F.linear(h, _packed_weight(down[0], down[1], down[2], h.shape[-1]))[0] * weights[t, slot]
    return out.to(u.dtype)


@torch.library.register_fake(f"{NAMESPACE}::moe_routed_experts")
def _moe_routed_experts_fake(u, ids, weights, tensors, layout):
    return torch.empty_like(u)
