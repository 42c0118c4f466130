"""Module swaps of the Core ML target (how the exported model differs from the eager one; no coremltools here).

Core ML runs fixed shapes, keeps every cache as an fp16 state and has no custom kernels, so parts of the model are
swapped in place for parts with the same contract (as the ExecuTorch target swaps its cache and core); no block's
forward (Attention, LightningAttention, MoE, DecoderLayer) is re-implemented:

- `CoreMLCausalLM` (class swap of CausalLM): the signature an app calls, `(tokens int32 [1, T], position int32
  [1]) -> logits`. Token id -1 marks padding after the real tokens of a prefill chunk: it is fed to the model as
  id 0 and its count is put in a `CallContext` for the parts whose rule depends on the real length (InfLLM v2's
  dense_len). Then CausalLM.forward, unchanged.
- `RescaledRMSNorm` (class swap of every RMSNorm): overflow-free in fp16.
- Attention cores (`Attention.core`, export/nn/attention_core.py): `StaticDenseCore` / `StaticSlidingWindowCore`
  attend over the WHOLE cache with a causal (sliding-window) mask, grouping the query heads of a KV head instead of
  `scaled_dot_product_attention(enable_gqa=True)` (which coremltools 9 converts wrongly: it tiles the KV heads).
  `CoreMLInfLLMCore` keeps InfLLM v2's compressed keys in a buffer of its own (`kc_cache`, a Core ML state) and
  calls `pocketllm_coreml::infllm_attention` (composite MIL in converters.py). The KV cache itself is export/nn's
  KVCache unchanged: its slice assignment becomes `slice_update` on the state.
- MoE (`MoE.dispatch`, export/nn/moe.py): `CoreMLDispatch` runs one-token calls through
  `pocketllm_coreml::moe_routed_experts` (one `cond` per expert in MIL: only the routed experts run) and longer
  calls through RoutedDispatch's export path (every expert, weight 0 when not routed).
- int8 / int4 / nf4 linears (export/nn/quant_linear.py's Int8Linear / Int4Linear dequantize with aten ops, which
  coremltools would fold into dense fp16 weights): `CoreMLQuantLinear` over the same packed buffers, calling
  `pocketllm_coreml::quantized_linear`, stored as constexpr ops. any4 linears already call `pocketllm::any4_linear`.
- Lightning layers (MiniMax) are unchanged: `RecurrentState` (`state_cache`) becomes a Core ML state as is. The
  op cannot tell padding from tokens, so a bundle with lightning layers is never padded (manifest entry
  `pads_prefill: false`: the tail of a prompt runs through `decode`).

The `pocketllm_coreml::*` ops are lowering markers of this target: their eager implementations delegate to the
shared references (export/ops, export/nn/quant_linear.py), so the swapped model stays checkable in eager mode
(tests/targets/test_coreml_export.py runs it against the eager model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import pocketllm.export.ops  # noqa: F401  (registers pocketllm custom ops)
from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.attention import Attention
from pocketllm.export.nn.attention_core import DenseCore, InfLLMCore, SlidingWindowCore
from pocketllm.export.nn.decoder import CausalLM
from pocketllm.export.nn.lightning import LightningAttention
from pocketllm.export.nn.moe import MoE, RoutedDispatch
from pocketllm.export.nn.norm import RMSNorm
from pocketllm.export.nn.quant_linear import Any4Linear, Int4Linear, Int8Linear, _Packed, dequantize_packed
from pocketllm.export.ops.infllm_attention import SCORE_RULE_CODES, infllm_attention_reference

PAD_TOKEN_ID = -1
NAMESPACE = "pocketllm_coreml"
MASKED = -30000.0  # finite "minus infinity": representable in fp16, exp() of it is 0, no NaN for empty rows
PACKED_NAMES = {"any4": ("qweight", "lut", "scales", "zeros"), "int4": ("qweight", "scales", "zeros"),
                "nf4": ("qweight", "scales"), "int8": ("qweight", "scales")}
TENSORS_PER_SCHEME = {"none": 1, **{k: len(v) for k, v in PACKED_NAMES.items()}}


# ---------------------------------------------------------------------------------------------- entry point
class CallContext:
    """Per-call facts the entry point computes once and the swapped parts read: `n_valid` (int32 0-d tensor, the
    number of real tokens; the rest of the chunk is padding)."""

    n_valid: torch.Tensor | None = None


class CoreMLCausalLM(CausalLM):
    """What both Core ML functions compute: forward(tokens int32 [1, T], position int32 [1]) -> logits fp32 [1, T, V].

    `position` is the absolute position of tokens[0, 0]; real tokens come first, padding (id -1) after them. Padded
    rows get meaningless logits and write cache rows beyond the real ones, which later calls overwrite before any
    query can see them (causal masks)."""

    coreml_call: CallContext

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        self.coreml_call.n_valid = (tokens[0] >= 0).to(torch.int32).sum()
        return super().forward(torch.clamp(tokens, min=0).to(torch.int64), position)


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


# ---------------------------------------------------------------------------------------------- attention cores
def masked_attention(q, keys, values, positions, window: int | None):
    """Causal (optionally sliding-window) attention of q [1, T, Hq, D] over the WHOLE cache [1, S, Hkv, D]: fixed
    shapes, cost O(T * S) whatever the position. GQA without repeating K/V: the query heads of a KV head are
    stacked as rows (t * G + g)."""
    _, T, Hq, D = q.shape
    S, Hkv = keys.shape[1], keys.shape[2]
    G = Hq // Hkv
    key_pos = torch.arange(S)
    mask = key_pos[None, :] <= positions[:, None]  # [T, S]
    if window is not None:  # torch.logical_and: aten.__and__ has no coremltools converter
        mask = torch.logical_and(mask, positions[:, None] - key_pos[None, :] < window)
    qg = q[0].reshape(T, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, T * G, D)
    k = keys[0].transpose(0, 1)  # [Hkv, S, D]
    v = values[0].transpose(0, 1)
    scores = (qg * (1.0 / math.sqrt(D))) @ k.transpose(1, 2)  # [Hkv, T*G, S]
    row_mask = mask[:, None, :].expand(T, G, S).reshape(1, T * G, S)
    scores = scores.masked_fill(~row_mask, MASKED)
    out = torch.softmax(scores, dim=-1) @ v  # [Hkv, T*G, D]
    return out.reshape(Hkv, T, G, D).permute(1, 0, 2, 3).reshape(1, T, Hq, D)


class StaticDenseCore(DenseCore):
    """DenseCore over the whole fixed-size cache with a causal mask (see masked_attention)."""

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return super().forward(q, keys, values, start_pos, positions)
        return masked_attention(q, keys, values, positions, None)


class StaticSlidingWindowCore(SlidingWindowCore):
    """SlidingWindowCore over the whole fixed-size cache with a causal window mask (see masked_attention)."""

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return super().forward(q, keys, values, start_pos, positions)
        return masked_attention(q, keys, values, positions, self.window)


def kernel_count(max_context: int, kernel_size: int, kernel_stride: int) -> int:
    """Compressed keys that fit in a cache of max_context rows (kernels are complete windows)."""
    return (max_context - kernel_size) // kernel_stride + 1 if max_context >= kernel_size else 0


class CoreMLInfLLMCore(InfLLMCore):
    """InfLLMCore with its compressed keys kept between calls in the buffer `kc_cache` [1, NK, Hkv, D] (a Core ML
    state; NK = kernels that fit in the cache): each call recomputes only the kernels its tokens may complete and
    writes them back, so decode never re-reads the whole K cache to score blocks. The composite (selection +
    attention) is `pocketllm_coreml::infllm_attention`; the dense fallback is decided from the real token count."""

    def __init__(self, sparse, kc_cache: torch.Tensor, call: CallContext):
        super().__init__(sparse)
        self.call = call
        self.register_buffer("kc_cache", kc_cache, persistent=False)

    def forward(self, q, keys, values, start_pos, positions):
        if start_pos is None:
            return super().forward(q, keys, values, start_pos, positions)
        s = self.sparse
        out, new_kc = torch.ops.pocketllm_coreml.infllm_attention(
            q, keys, values, self.kc_cache, start_pos, self.call.n_valid, s.kernel_size, s.kernel_stride,
            s.block_size, s.init_blocks, s.window_size, s.topk, s.dense_len, SCORE_RULE_CODES[s.score_rule])
        self.kc_cache.copy_(new_kc)
        return out


def swap_core(module: Attention, call: CallContext) -> str:
    """Swap `module.core` for its Core ML twin; returns which ("dense", "sliding", "infllm", "infllm_dense")."""
    core, S = module.core, module.cache.max_context
    if isinstance(core, InfLLMCore):
        s = core.sparse
        if s.dense_len != -1 and S < s.dense_len:
            # every call holds at most S < dense_len tokens: InfLLM v2 always takes its dense fallback here
            module.core = StaticDenseCore()
            return "infllm_dense"
        nk = kernel_count(S, s.kernel_size, s.kernel_stride)
        if nk == 0:
            raise PocketllmError(f"--max-context {S} is shorter than one InfLLM v2 kernel ({s.kernel_size} tokens)")
        kc = torch.zeros(1, nk, module.num_kv_heads, module.head_dim, dtype=module.cache.k_cache.dtype)
        module.core = CoreMLInfLLMCore(s, kc, call)
        return "infllm"
    if isinstance(core, SlidingWindowCore):
        module.core = StaticSlidingWindowCore(core.window)
        return "sliding"
    if type(core) is DenseCore:
        module.core = StaticDenseCore()
        return "dense"
    raise PocketllmError(f"Core ML: no swap for attention core {type(core).__name__}")


# ---------------------------------------------------------------------------------------------- MoE
def linear_tensors(linear: nn.Module) -> tuple[str, list[torch.Tensor]]:
    """(storage descriptor "scheme:group", tensors) of a Linear or packed linear, in the order converters read them."""
    if isinstance(linear, nn.Linear):
        return "none:0", [linear.weight]
    if isinstance(linear, (_Packed, CoreMLQuantLinear)):
        return (f"{linear.scheme}:{linear.group_size}",
                [getattr(linear, n) for n in PACKED_NAMES[linear.scheme]])
    raise PocketllmError(f"Core ML: cannot store a linear layer of type {type(linear).__name__}")


ACTIVATIONS = {"silu": "swiglu", "relu": "reglu"}


def expert_layout(experts: nn.ModuleList) -> tuple[str, list[torch.Tensor]]:
    """("swiglu|any4:128,any4:128,...", tensors): every expert's gate, up, down projections, in order."""
    layout, tensors, activations = [], [], set()
    for expert in experts:
        activations.add(ACTIVATIONS[expert.activation])
        for linear in expert.projections():
            desc, ts = linear_tensors(linear)
            layout.append(desc)
            tensors.extend(ts)
    if len(activations) != 1:
        raise PocketllmError(f"Core ML: experts of one layer mix activations {sorted(activations)}")
    return f"{activations.pop()}|{','.join(layout)}", tensors


class CoreMLDispatch(RoutedDispatch):
    """RoutedDispatch whose one-token calls run only the routed experts (`pocketllm_coreml::moe_routed_experts`,
    one `cond` per expert in MIL). Longer calls take RoutedDispatch's export path: every expert, weight 0 when not
    routed (static shapes; a 64-token chunk routes to nearly every expert anyway)."""

    def forward(self, u, weights, ids, experts):
        if u.shape[0] != 1:
            return super().forward(u, weights, ids, experts)
        layout, tensors = expert_layout(experts)
        return torch.ops.pocketllm_coreml.moe_routed_experts(u, ids, weights, tensors, layout).float()


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
        return torch.ops.pocketllm_coreml.quantized_linear(x, self.qweight, self.scales, getattr(self, "zeros", None),
                                                            self.scheme, self.group_size)


# ---------------------------------------------------------------------------------------------- apply
def apply_swaps(model: CausalLM) -> dict[str, int]:
    """Swap the model (in place) into what the Core ML functions compute. Returns counts per swap."""
    if model.lm_head is not None and not isinstance(model.lm_head, nn.Linear):
        raise PocketllmError("Core ML stores the LM head in fp16; export a checkpoint quantized without "
                             "--quantize-lm-head")
    call = CallContext()
    counts = {"norms": 0, "dense": 0, "sliding": 0, "infllm": 0, "infllm_dense": 0, "lightning": 0, "moe": 0,
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
        elif isinstance(module, Attention):
            counts[swap_core(module, call)] += 1
        elif isinstance(module, LightningAttention):
            counts["lightning"] += 1
        elif isinstance(module, MoE):
            module.dispatch = CoreMLDispatch()
            counts["moe"] += 1
    model.__class__ = CoreMLCausalLM
    model.coreml_call = call
    return counts


# ---------------------------------------------------------------------------------------------- marker ops
LIB = torch.library.Library(NAMESPACE, "DEF")
LIB.define("quantized_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, str scheme, int group_size)"
           " -> Tensor")
LIB.define("infllm_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kc_cache, SymInt start_pos, "
           "Tensor n_valid, int kernel_size, int kernel_stride, int block_size, int init_blocks, int window_size, "
           "int topk, int dense_len, int score_rule) -> (Tensor, Tensor)")
LIB.define("moe_routed_experts(Tensor u, Tensor ids, Tensor weights, Tensor[] tensors, str layout) -> Tensor")


def packed_weight(scheme: str, group: int, tensors: list[torch.Tensor], in_features: int) -> torch.Tensor:
    """fp32 [N, K] weight of one linear from its tensors (linear_tensors order)."""
    from pocketllm.export.quant.format import TensorQuant

    if scheme == "none":
        return tensors[0].float()
    quant = TensorQuant(scheme, 0 if group == in_features else group)
    return dequantize_packed(quant, dict(zip(PACKED_NAMES[scheme], tensors)), in_features)


@torch.library.impl(LIB, "quantized_linear", "CompositeExplicitAutograd")
def _quantized_linear(x, qweight, scales, zeros, scheme, group_size):
    tensors = [qweight, scales] + ([zeros] if zeros is not None else [])
    return F.linear(x, packed_weight(scheme, group_size, tensors, x.shape[-1]).to(x.dtype))


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
    n = int(n_valid)
    out = torch.zeros_like(q)
    if n > 0:
        out[:, :n] = infllm_attention_reference(q[:, :n], k_cache, v_cache, int(start_pos), kernel_size,
                                                kernel_stride, block_size, init_blocks, window_size, topk, dense_len,
                                                score_rule)
    kc = update_compressed_keys(k_cache, kc_cache, start_pos, q.shape[1], kernel_size, kernel_stride)
    return out, kc


@torch.library.register_fake(f"{NAMESPACE}::infllm_attention")
def _infllm_attention_fake(q, k_cache, v_cache, kc_cache, start_pos, n_valid, kernel_size, kernel_stride,
                           block_size, init_blocks, window_size, topk, dense_len, score_rule):
    return torch.empty_like(q), torch.empty_like(kc_cache)


def parse_layout(layout: str) -> tuple[str, list[tuple[str, int]]]:
    """"reglu|any4:128,any4:128,..." -> ("reglu", [("any4", 128), ...]) (three linears per expert)."""
    activation, _, specs = layout.partition("|")
    out = []
    for spec in specs.split(","):
        scheme, _, group = spec.partition(":")
        out.append((scheme, int(group)))
    return activation, out


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
            h = act(F.linear(x, packed_weight(*gate, K))) * F.linear(x, packed_weight(*up, K))
            out[t] += F.linear(h, packed_weight(*down, h.shape[-1]))[0] * weights[t, slot]
    return out.to(u.dtype)


@torch.library.register_fake(f"{NAMESPACE}::moe_routed_experts")
def _moe_routed_experts_fake(u, ids, weights, tensors, layout):
    return torch.empty_like(u)
