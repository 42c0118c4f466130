"""Mixture of experts = a router + experts (GatedMLP, export/nn/mlp.py) + a dispatch that runs them.

Routers (nn.Linear subclasses registered under the family's upstream name, e.g. `block_sparse_moe.primary_router`):
- PreAttentionRouter (SmallThinker): logits of the layer input, before its norm and attention; top-k, then softmax
  over the k logits or sigmoid of them renormalised to sum 1.
- SoftmaxTopKRouter (MiniMax): softmax over all experts of the post-attention norm output (fp32), top-k,
  renormalised to sum 1.
Dispatch (swappable by targets): RoutedDispatch runs, in eager mode, only the experts some token chose; under
torch.export it runs every expert with zero weight for unselected ones (static shapes, same result). Targets swap
in StackedExperts (the layer's experts stacked once, one `pocketllm::moe_ffn` / `moe_ffn_any4` call) or
StoredExperts (`pocketllm::expert_store_moe_ffn` on an expert store, with `pocketllm::expert_store_prefetch` after
the router).

A pre-attention router (SmallThinker) is run by the decoder layer *before* attention (`MoE.route`), and the
dispatch's `routed` hook sees its choice there: StoredExperts starts loading the chosen experts while attention
computes. Other routers run just before their experts.
"""

from __future__ import annotations

import torch
from torch import nn

from pocketllm.export.nn.mlp import GatedMLP
from pocketllm.export.spec import MoESpec

import pocketllm.export.ops  # noqa: F401  (registers pocketllm custom ops)


class PreAttentionRouter(nn.Linear):
    def __init__(self, hidden: int, moe: MoESpec):
        super().__init__(hidden, moe.num_experts, bias=False)
        self.top_k, self.softmax = moe.top_k, moe.router_softmax

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (weights [N, k] fp32, expert ids [N, k])."""
        top, ids = torch.topk(self(x).float(), self.top_k, dim=-1)
        if self.softmax:
            return torch.softmax(top, dim=-1), ids
        w = torch.sigmoid(top)
        return w / w.sum(dim=-1, keepdim=True), ids


class SoftmaxTopKRouter(nn.Linear):
    def __init__(self, hidden: int, moe: MoESpec):
        super().__init__(hidden, moe.num_experts, bias=False)
        self.top_k = moe.top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, hidden] -> (weights [N, k] fp32, expert ids [N, k])."""
        probs = torch.softmax(self(x).float(), dim=-1)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), ids


ROUTERS = {"pre_attention": PreAttentionRouter, "post_attention": SoftmaxTopKRouter}


class RoutedDispatch(nn.Module):
    """Runs the chosen experts on their tokens and sums them with the routing weights, in fp32."""

    def routed(self, weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called with the router's choice as soon as it is known (the hook a prefetching dispatch overrides)."""
        return weights, ids

    def forward(self, u: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
        """u: [N, hidden]; weights, ids: [N, k] -> [N, hidden] fp32."""
        out = torch.zeros_like(u, dtype=torch.float32)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # static shapes: every expert runs
            dense_w = torch.zeros(u.shape[0], len(experts), dtype=torch.float32).scatter(1, ids, weights)
            for e, expert in enumerate(experts):
                out = out + expert(u).float() * dense_w[:, e:e + 1]
            return out
        for e in torch.unique(ids).tolist():
            rows, slot = torch.where(ids == e)
            # index_put_ rather than index_add_: the latter takes ~50 ms per call on a busy 2-core CPU
            out.index_put_((rows,), experts[e](u[rows]).float() * weights[rows, slot, None], accumulate=True)
        return out


class MoE(nn.Module):
    """`block_sparse_moe`: router (under the family's name) + experts.{e} (GatedMLP) + dispatch."""

    def __init__(self, hidden: int, moe: MoESpec, names):
        super().__init__()
        self.moe, self.router_name = moe, names.router
        self.add_module(names.router, ROUTERS[moe.router](hidden, moe))
        self.experts = nn.ModuleList([GatedMLP(hidden, moe.ffn_hidden_size, moe.activation,
                                               (names.gate, names.up, names.down)) for _ in range(moe.num_experts)])
        self.dispatch = RoutedDispatch()

    @property
    def router(self) -> nn.Linear:
        return self._modules[self.router_name]

    @property
    def pre_attention(self) -> bool:
        return self.moe.router == "pre_attention"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [..., hidden] the router's input -> (weights [N, k] fp32, expert ids [N, k]), seen by the dispatch."""
        return self.dispatch.routed(*self.router.route(x.reshape(-1, x.shape[-1])))

    def forward(self, u: torch.Tensor, layer_input: torch.Tensor, route=None) -> torch.Tensor:
        """u: [..., hidden] post-attention norm output (what the experts read); layer_input: the decoder layer's
        input (what a pre-attention router reads); route: `route(layer_input)` when the caller ran it already
        (before attention). Returns [..., hidden] in u's dtype."""
        shape = u.shape
        u = u.reshape(-1, shape[-1])
        if route is None:
            route = self.route(layer_input if self.pre_attention else u)
        weights, ids = route
        return self.dispatch(u, weights, ids, self.experts).to(u.dtype).reshape(shape)


# ------------------------------------------------------------------------------------------ export dispatches
FLOAT_STACKS = ("gate", "up", "down_t")
ANY4_STACKS = tuple(f"{p}_{s}" for p in ("gate", "up", "down") for s in ("qweight", "lut", "scales", "zeros"))
OP_ACTIVATIONS = {"relu": "reglu", "silu": "swiglu"}  # MoESpec.activation -> the op's name


class StackedExperts(nn.Module):
    """Dispatch of one `pocketllm::moe_ffn` (float: gate, up, down_t [E, F, H]) or `moe_ffn_any4` (the 12 packed
    any4 stacks) call over the layer's experts stacked once: only the routed experts' weights are read."""

    def __init__(self, activation: str, stacks: dict[str, torch.Tensor]):
        super().__init__()
        self.activation = OP_ACTIVATIONS[activation]
        self.names = tuple(stacks)
        if self.names not in (FLOAT_STACKS, ANY4_STACKS):
            raise ValueError(f"StackedExperts: expected the stacks {FLOAT_STACKS} or {ANY4_STACKS}, got {self.names}")
        for name, t in stacks.items():
            self.register_buffer(name, t)

    def routed(self, weights, ids):
        return weights, ids

    def forward(self, u, weights, ids, experts=None):
        stacks = [getattr(self, n) for n in self.names]
        if self.names == FLOAT_STACKS:
            return torch.ops.pocketllm.moe_ffn(u, ids, weights, *stacks, self.activation)
        return torch.ops.pocketllm.moe_ffn_any4(u, ids, weights, *stacks, self.activation)


class StoredExperts(nn.Module):
    """Dispatch of `pocketllm::expert_store_moe_ffn` on an expert store (a bundle's experts.bin, by id) holding this
    layer's experts; with `prefetch`, `pocketllm::expert_store_prefetch` runs on the router's choice as soon as it is
    known (before attention for SmallThinker)."""

    def __init__(self, activation: str, store: str, layer: int, prefetch: bool):
        super().__init__()
        self.activation, self.store, self.layer, self.prefetch = OP_ACTIVATIONS[activation], store, layer, prefetch

    def routed(self, weights, ids):
        if self.prefetch:
            ids = torch.ops.pocketllm.expert_store_prefetch(ids, self.store, self.layer)
        return weights, ids

    def forward(self, u, weights, ids, experts=None):
        return torch.ops.pocketllm.expert_store_moe_ffn(u, ids, weights, self.store, self.layer, self.activation)


def expert_tensors(expert: GatedMLP) -> tuple[str, dict[str, torch.Tensor]] | None:
    """One expert's weights as a StackedExperts / expert store block takes them: ("float", {gate, up, down_t}) from
    nn.Linear projections (down transposed: [F, H]), ("any4", {gate_qweight, ...}) from Any4Linear ones (the
    checkpoint's packed tensors and orientation); None for anything else (int4/nf4/int8 experts)."""
    from pocketllm.export.nn.quant_linear import Any4Linear

    gate, up, down = expert.projections()
    kinds = {type(m) for m in (gate, up, down)}
    if kinds == {nn.Linear}:
        return "float", {"gate": gate.weight.detach(), "up": up.weight.detach(), "down_t": down.weight.detach().T}
    if kinds == {Any4Linear}:
        return "any4", {f"{p}_{s}": getattr(m, s) for p, m in zip(("gate", "up", "down"), (gate, up, down))
                        for s in ("qweight", "lut", "scales", "zeros")}
    return None


def expert_dtypes(moe: "MoE") -> dict[str, torch.dtype] | None:
    """The storage dtype of each stacked tensor of the layer, or None when its experts cannot be stacked (not all
    float or all any4, or any4 groupings differ between experts). Float weights are stored in bf16 when every value
    is exactly a bf16 number (released checkpoints are bf16), any4 LUTs in bf16 when exact (the kernel's fast
    path), else fp16; any4 scales and zeros in one dtype for all three projections (fp16, or fp32)."""
    kinds, dtypes, lut_bf16, shapes = set(), {}, True, {}
    exact_bf16 = True
    for expert in moe.experts:
        got = expert_tensors(expert)
        if got is None:
            return None
        kind, tensors = got
        kinds.add(kind)
        for name, t in tensors.items():
            if shapes.setdefault(name, tuple(t.shape)) != tuple(t.shape):
                return None
            if kind == "float" and exact_bf16 and t.dtype == torch.float32:
                exact_bf16 = torch.equal(t.to(torch.bfloat16).to(torch.float32), t)
            if kind == "any4" and name.endswith("_lut") and lut_bf16:
                lut_bf16 = torch.equal(t.to(torch.bfloat16).to(torch.float32), t.to(torch.float32))
            dtypes.setdefault(name, set()).add(t.dtype)
    if len(kinds) != 1:
        return None
    if kinds == {"float"}:
        dtype = torch.bfloat16 if exact_bf16 else torch.float32
        return {name: dtype for name in FLOAT_STACKS}
    scale_types = set().union(*(dtypes[n] for n in ANY4_STACKS if n.endswith(("_scales", "_zeros"))))
    scale = torch.float16 if scale_types == {torch.float16} else torch.float32
    lut = torch.bfloat16 if lut_bf16 else torch.float16
    return {n: torch.uint8 if n.endswith("_qweight") else lut if n.endswith("_lut") else scale for n in ANY4_STACKS}


def free_expert(moe: "MoE", e: int) -> None:
    """Drop expert e's modules (and with them its weights, once nothing else holds them)."""
    moe.experts[e] = nn.Module()


def stack_experts(moe: "MoE") -> StackedExperts | None:
    """Stack the layer's experts into a StackedExperts (see expert_dtypes), freeing each expert's tensors as soon as
    they are copied: the stacks never coexist with a second copy of the layer. None (nothing changed) when the
    experts cannot be stacked."""
    dtypes = expert_dtypes(moe)
    if dtypes is None:
        return None
    E = len(moe.experts)
    stacks = None
    for e in range(E):
        _, tensors = expert_tensors(moe.experts[e])
        if stacks is None:
            stacks = {n: torch.empty((E, *tensors[n].shape), dtype=dtypes[n]) for n in dtypes}
        for n, t in tensors.items():
            stacks[n][e].copy_(t)  # exact: bf16 only when every value is, fp16 -> fp32 widens
        del tensors
        free_expert(moe, e)
    return StackedExperts(moe.moe.activation, stacks)
