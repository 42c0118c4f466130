"""Module swaps of the ONNX target: what changes in the loaded export/nn model before `torch.onnx.export`.

ONNX Runtime (and onnxruntime-genai) keep no state inside the graph: every call takes the past and returns the
present. So, compared with the eager model, through export/nn's swappable parts (never a re-stated forward):

- `Attention.cache` -> PastPresentKV: this call's `past_key_values.{i}.key/value` [1, Hkv, P, D] (genai's layout)
  in, `present = concat(past, new)` [1, Hkv, P+T, D] out, instead of a static buffer written in place;
- `Attention.core` -> OnnxDenseCore / OnnxSlidingCore / OnnxInfLLMCore: standard-op attention over every present
  row, masked by genai's attention_mask (decompose.py; InfLLM v2 instead of `pocketllm::infllm_attention`);
- `LightningAttention.state_cache` -> StateIO: the recurrent state [1, H, D, D] fp32 is an input
  (`past.{i}.recurrent`) and the new state an output (`present.{i}.recurrent`) instead of a mutable buffer; the op
  itself is decomposed at export (lower.DECOMPOSITIONS);
- `MoE.dispatch` -> OnnxRoutedDispatch: only the routed experts run (per expert NonZero of its tokens, Gather, the
  expert MLP, ScatterND add), where the eager model's export path runs every expert with zero weights;
- packed linears (export/nn/quant_linear.py) -> NBitsLinear (MatMulNBits, int4 / int8) or Any4ExactLinear (contrib.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pocketllm.export.errors import PocketllmError
from pocketllm.export.nn.attention import Attention
from pocketllm.export.nn.attention_core import DenseCore, InfLLMCore, SlidingWindowCore
from pocketllm.export.nn.kv_cache import KVCache
from pocketllm.export.nn.lightning import LightningAttention, RecurrentState
from pocketllm.export.nn.moe import MoE, RoutedDispatch
from pocketllm.export.targets.onnx.contrib import LIB  # noqa: F401  (registers the pocketllm_onnx ops)
from pocketllm.export.targets.onnx.decompose import causal_mask, constants_table, infllm_attention, masked_attention
from pocketllm.export.targets.onnx.options import ANY4_LUT_OPSET


class CallInputs:
    """Per-call graph inputs that swapped modules read (set by the graph wrapper at the start of forward)."""

    key_mask: torch.Tensor | None = None  # bool [L]: attention_mask != 0


# ------------------------------------------------------------------------------------------ KV cache / state I/O
class PastPresentKV(KVCache):
    """A KV cache that is graph I/O (no buffers): update(k, v, start_pos) -> the present keys and values, past ++
    new, kept in genai's [1, Hkv, L, D] as `present` and returned in the cores' [1, L, Hkv, D]."""

    def __init__(self):
        nn.Module.__init__(self)
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, k, v, start_pos):
        past_k, past_v = self.past
        self.present = (torch.cat([past_k, k.transpose(1, 2)], dim=2), torch.cat([past_v, v.transpose(1, 2)], dim=2))
        return self.present[0].transpose(1, 2), self.present[1].transpose(1, 2)

    def reset(self, dtype=None) -> None:
        self.past = self.present = None


class StateIO(RecurrentState):
    """A recurrent state that is graph I/O: `past` in, `present` out, both [1, H, D, D] fp32 (no buffer)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.past: torch.Tensor | None = None
        self.present: torch.Tensor | None = None

    def read(self, positions):
        return self.past  # genai and our runner feed zeros for a new sequence

    def write(self, new_state):
        self.present = new_state

    def reset(self) -> None:
        self.past = self.present = None


# ------------------------------------------------------------------------------------------ attention cores
class OnnxDenseCore(nn.Module):
    """Causal softmax attention over every present key (sliding window when `window`), masked by attention_mask."""

    def __init__(self, inputs: CallInputs, window: int | None = None):
        super().__init__()
        self.inputs, self.window = inputs, window

    def forward(self, q, keys, values, start_pos, positions):
        mask = causal_mask(positions, keys.shape[1], self.window) & self.inputs.key_mask[None, :]
        return masked_attention(q, keys, values, mask).to(q.dtype)


class OnnxInfLLMCore(nn.Module):
    """InfLLM v2 in standard ops (decompose.infllm_attention) with the spec's score rule."""

    def __init__(self, inputs: CallInputs, sparse, head_dim: int):
        super().__init__()
        self.inputs, self.sparse = inputs, sparse
        self.register_buffer("constants", constants_table(head_dim), persistent=False)

    def forward(self, q, keys, values, start_pos, positions):
        return infllm_attention(q, keys, values, positions, self.inputs.key_mask, self.sparse,
                                self.constants).to(q.dtype)


def onnx_core(core: nn.Module, inputs: CallInputs, sparse, head_dim: int) -> nn.Module:
    if isinstance(core, InfLLMCore):
        return OnnxInfLLMCore(inputs, sparse if sparse is not None else core.sparse, head_dim)
    if isinstance(core, SlidingWindowCore):
        return OnnxDenseCore(inputs, core.window)
    if isinstance(core, DenseCore):
        return OnnxDenseCore(inputs)
    raise PocketllmError(f"--target onnx: no ONNX form of the attention core {type(core).__name__}")


# ------------------------------------------------------------------------------------------ MoE: routed experts only
class OnnxRoutedDispatch(RoutedDispatch):
    """sum over each token's k experts of weight * expert(u), running each expert only on the tokens routed to it.

    u: [N, hidden]; weights: [N, k] fp32; ids: [N, k]. In ONNX: per expert Equal/ReduceMax -> NonZero (its rows,
    possibly none) -> Gather -> the expert MLP on those rows -> ScatterND add. An expert no token chose costs a few
    empty-tensor nodes and no weight reads."""

    def forward(self, u, weights, ids, experts):
        out = torch.zeros(u.shape, dtype=torch.float32)
        for e, expert in enumerate(experts):
            hit = ids == e  # [N, k]; a token picks an expert at most once
            rows = torch.nonzero(hit.any(dim=-1)).reshape(-1)  # [n_e]
            w = (weights * hit).sum(dim=-1)[rows]  # [n_e]
            out = out.index_put((rows,), expert(u[rows]).float() * w[:, None], accumulate=True)
        return out


# ------------------------------------------------------------------------------------------ quantized linears
def _block_size(group: int) -> int | None:
    """MatMulNBits block: the largest power of two in [16, 256] dividing the checkpoint's group (scales repeat)."""
    for bs in (256, 128, 64, 32, 16):
        if group % bs == 0:
            return bs
    return None


class NBitsLinear(nn.Module):
    """y = x W^T through com.microsoft::MatMulNBits, with exactly the checkpoint's weights.

    int8 (q * s per row): codes q + 128, MatMulNBits' default 8-bit zero point 128, scale s repeated per block.
    int4 ((c - 8) * s + z per group): codes as stored (MatMulNBits' nibble order is ours), default zero point 8,
    plus `sum_g z[:, g] * sum(x over group g)`: a [.., G] x [G, N] MatMul (zeros_t).
    """

    def __init__(self, b, scales, zeros_t, n: int, k: int, bits: int, block_size: int, group: int,
                 accuracy_level: int):
        super().__init__()
        self.n, self.k, self.bits, self.block_size, self.group = n, k, bits, block_size, group
        self.accuracy_level = accuracy_level
        self.register_buffer("b", b)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros_t", zeros_t)

    def forward(self, x):
        y = torch.ops.pocketllm_onnx.matmul_nbits(x.float(), self.b, self.scales, self.n, self.k, self.bits,
                                                  self.block_size, self.accuracy_level)
        if self.zeros_t is not None:
            xs = x.float().reshape(*x.shape[:-1], self.k // self.group, self.group).sum(dim=-1)
            y = y + xs @ self.zeros_t
        return y.to(x.dtype)

    @classmethod
    def from_int4(cls, qweight, scales, zeros, group: int, accuracy_level: int):
        N, K = qweight.shape[0], 2 * qweight.shape[1]
        bs = _block_size(group)
        reps = group // bs
        b = qweight.reshape(N, K // bs, bs // 2).contiguous()
        s = scales.float().repeat_interleave(reps, dim=1).reshape(-1).contiguous()  # [N * K/bs]
        return cls(b, s, zeros.float().T.contiguous(), N, K, 4, bs, group, accuracy_level)

    @classmethod
    def from_int8(cls, qweight, scales, accuracy_level: int):
        N, K = qweight.shape
        bs = _block_size(K) or 32
        blocks = -(-K // bs)
        codes = (qweight.to(torch.int16) + 128).to(torch.uint8)
        if blocks * bs != K:  # MatMulNBits pads the last block; its padding is never read
            codes = torch.cat([codes, torch.full((N, blocks * bs - K), 128, dtype=torch.uint8)], dim=1)
        s = scales.float().reshape(N, 1).expand(N, blocks).reshape(-1).contiguous()
        return cls(codes.reshape(N, blocks, bs).contiguous(), s, None, N, K, 8, bs, K, accuracy_level)


class Any4ExactLinear(nn.Module):
    """y = x W^T with W[i, j] = lut[i, c] * s + z computed in the graph on every call (ops.any4_matmul): exact,
    4 bits per weight in memory. Also serves int4 groups MatMulNBits cannot take (lut = the int4 table)."""

    def __init__(self, qweight, lut, scales, zeros, group: int):
        super().__init__()
        self.group = group
        self.in_features, self.out_features = 2 * qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("lut", lut.to(torch.float16) if torch.equal(lut.to(torch.float16).float(), lut.float())
                             else lut.float())
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def forward(self, x):
        x2 = x.float().reshape(-1, self.in_features)
        y = torch.ops.pocketllm_onnx.any4_matmul(x2, self.qweight, self.lut, self.scales, self.zeros, self.group)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def requantize_int4(w: torch.Tensor, group: int):
    """Round fp32 weights [N, K] to int4 per group like export/quant/int4 (s = (max - min) / 15, z = min + 8 s,
    fp16): the NOT-exact `any4_form='int4'` path. Returns (qweight, scales, zeros)."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    mn, mx = g.amin(dim=-1), g.amax(dim=-1)
    s = (torch.clamp(mx - mn, min=1e-6) / 15).to(torch.float16)
    z = (mn + 8 * s.float()).to(torch.float16)
    c = torch.clamp(torch.round((g - z.float()[..., None]) / s.float()[..., None]) + 8, 0, 15).to(torch.uint8)
    c = c.reshape(N, K)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), s, z


# ------------------------------------------------------------------------------------------ apply
@dataclass
class SwapReport:
    kv_layers: list[int] = field(default_factory=list)  # layers with past/present key/value
    state_layers: list[int] = field(default_factory=list)  # lightning layers with past/present state
    linears: dict[str, int] = field(default_factory=dict)  # lowering -> count
    moe_layers: int = 0


def swap_linears(model: nn.Module, options, report: SwapReport) -> None:
    from pocketllm.export.nn.quant_linear import Any4Linear, Int4Linear, Int8Linear

    for name, module in list(model.named_modules()):
        if not isinstance(module, (Any4Linear, Int4Linear, Int8Linear)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        g = module.group_size
        if module.scheme == "nf4":
            raise PocketllmError(f"{name}: nf4 weights are not supported by --target onnx (MatMulNBits is affine "
                                 "per block, NF4 needs a codebook); quantize with int4 or any4")
        if isinstance(module, Int8Linear):
            new, kind = NBitsLinear.from_int8(module.qweight, module.scales, options.accuracy_level), "MatMulNBits int8"
        elif isinstance(module, Int4Linear) and _block_size(g):
            new = NBitsLinear.from_int4(module.qweight, module.scales, module.zeros, g, options.accuracy_level)
            kind = "MatMulNBits int4"
        elif isinstance(module, Int4Linear):
            if options.opset < ANY4_LUT_OPSET:
                raise PocketllmError(f"{name}: int4 group {g} is not a multiple of 16 (MatMulNBits); its exact LUT "
                                     f"form needs onnx.opset >= {ANY4_LUT_OPSET} (got {options.opset})")
            table = torch.arange(16, dtype=torch.float32).sub(8).expand(module.out_features, 16)
            new, kind = Any4ExactLinear(module.qweight, table, module.scales, module.zeros, g), "int4 as LUT"
        elif options.any4_form == "lut":
            new, kind = Any4ExactLinear(module.qweight, module.lut, module.scales, module.zeros, g), "any4 LUT"
        elif options.any4_form == "int4":
            bs_group = g if _block_size(g) else module.in_features
            if not _block_size(bs_group):
                raise PocketllmError(f"{name}: onnx.any4_form=int4 needs a group size that is a multiple of 16 "
                                     f"(got {g} for input width {module.in_features})")
            q, s, z = requantize_int4(module.weight, bs_group)
            new = NBitsLinear.from_int4(q, s, z, bs_group, options.accuracy_level)
            kind = "any4 requantized to MatMulNBits int4 (not exact)"
        else:  # "dequant": exact fp32 weights
            new = nn.Linear(module.in_features, module.out_features, bias=False)
            new.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            kind = "any4 dequantized fp32"
        setattr(parent, attr, new)
        report.linears[kind] = report.linears.get(kind, 0) + 1


def apply_swaps(model: nn.Module, spec, options) -> tuple[SwapReport, CallInputs]:
    """Swap `model` (a loaded export/nn CausalLM) in place for ONNX export. Returns what was swapped and the
    CallInputs object the graph wrapper fills on each call. `spec` carries the InfLLM v2 score rule to build in."""
    inputs = CallInputs()
    report = SwapReport()
    swap_linears(model, options, report)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if isinstance(attn, Attention):
            attn.cache = PastPresentKV()
            attn.core = onnx_core(attn.core, inputs, spec.sparse, attn.head_dim)
            report.kv_layers.append(i)
        elif isinstance(attn, LightningAttention):
            attn.state_cache = StateIO()
            report.state_layers.append(i)
        else:
            raise PocketllmError(f"layer {i}: no ONNX lowering for attention module {type(attn).__name__}")
        moe = getattr(layer, "block_sparse_moe", None)
        if isinstance(moe, MoE):
            moe.dispatch = OnnxRoutedDispatch()
            report.moe_layers += 1
    for p in model.parameters():
        p.requires_grad_(False)
    return report, inputs
