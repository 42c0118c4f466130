"""Mixture of experts = a router + experts (GatedMLP, export/nn/mlp.py) + a dispatch that runs them.

Routers (nn.Linear subclasses registered under the family's upstream name, e.g. `block_sparse_moe.primary_router`):
- PreAttentionRouter (SmallThinker): logits of the layer input, before its norm and attention; top-k, then softmax
  over the k logits or sigmoid of them renormalised to sum 1.
- SoftmaxTopKRouter (MiniMax): softmax over all experts of the post-attention norm output (fp32), top-k,
  renormalised to sum 1.
Dispatch (swappable by targets): RoutedDispatch runs, in eager mode, only the experts some token chose; under
torch.export it runs every expert with zero weight for unselected ones (static shapes, same result).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketllm.export.nn.mlp import GatedMLP
from pocketllm.export.spec import MoESpec


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

    def forward(self, u: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
        """u: [..., hidden] post-attention norm output (what the experts read); layer_input: the decoder layer's
        input (what a pre-attention router reads). Returns [..., hidden] in u's dtype."""
        shape = u.shape
        u = u.reshape(-1, shape[-1])
        x = layer_input.reshape(-1, shape[-1]) if self.moe.router == "pre_attention" else u
        weights, ids = self.router.route(x)
        return self.dispatch(u, weights, ids, self.experts).to(u.dtype).reshape(shape)
