"""Feed-forward blocks: SwiGLU (MiniCPM4), SmallThinker's ReGLU mixture of experts with a pre-attention router, and
MiniMax's softmax top-k mixture of SwiGLU experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pocketllm.export.spec import MoESpec


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """ReGLU expert: down(relu(gate(u)) * up(u))."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.gate(u)) * self.up(u))


class MoE(nn.Module):
    """Top-k routing on the layer input (before its norm and attention), experts applied to the post-attention norm.

    Routing weights: softmax over the k selected logits, or sigmoid of them renormalised to sum 1.
    Eager runs only the experts some token chose; under export every expert runs on every token and unselected
    ones get weight 0 (static shapes; same result).
    """

    def __init__(self, hidden: int, moe: MoESpec):
        super().__init__()
        self.moe = moe
        self.primary_router = nn.Linear(hidden, moe.num_experts, bias=False)
        self.experts = nn.ModuleList([Expert(hidden, moe.ffn_hidden_size) for _ in range(moe.num_experts)])

    def routing(self, router_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_input: [N, hidden] -> (weights [N, k] fp32, expert ids [N, k])."""
        logits = self.primary_router(router_input).float()
        top, ids = torch.topk(logits, self.moe.top_k, dim=-1)
        if self.moe.router_softmax:
            w = torch.softmax(top, dim=-1)
        else:
            w = torch.sigmoid(top)
            w = w / w.sum(dim=-1, keepdim=True)
        return w, ids

    def forward(self, router_input: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        shape = u.shape
        u = u.reshape(-1, shape[-1])
        w, ids = self.routing(router_input.reshape(-1, shape[-1]))
        out = torch.zeros_like(u, dtype=torch.float32)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            dense_w = torch.zeros(u.shape[0], self.moe.num_experts, dtype=torch.float32).scatter(1, ids, w)
            for e, expert in enumerate(self.experts):
                out = out + expert(u).float() * dense_w[:, e:e + 1]
        else:
            for e in torch.unique(ids).tolist():
                rows, slot = torch.where(ids == e)
                out.index_add_(0, rows, self.experts[e](u[rows]).float() * w[rows, slot, None])
        return out.to(u.dtype).reshape(shape)


class SwiGLUExpert(nn.Module):
    """MiniMax expert under upstream names: w2(silu(w1(u)) * w3(u))."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn, bias=False)  # gate
        self.w3 = nn.Linear(hidden, ffn, bias=False)  # up
        self.w2 = nn.Linear(ffn, hidden, bias=False)  # down

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(u)) * self.w3(u))


class SoftmaxTopKMoE(nn.Module):
    """MiniMax's MoE: router `gate` on the post-attention norm output, softmax over all experts in fp32, top-k,
    weights renormalised to sum 1 (= softmax over the k chosen logits), SwiGLU experts.

    Same execution strategy as MoE: eager runs only chosen experts; export runs all of them with zero weights.
    """

    def __init__(self, hidden: int, moe: MoESpec):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(hidden, moe.ffn_hidden_size) for _ in range(moe.num_experts)])

    def routing(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u: [N, hidden] -> (weights [N, k] fp32, expert ids [N, k])."""
        probs = torch.softmax(self.gate(u).float(), dim=-1)
        top, ids = torch.topk(probs, self.moe.top_k, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), ids

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        shape = u.shape
        u = u.reshape(-1, shape[-1])
        w, ids = self.routing(u)
        out = torch.zeros_like(u, dtype=torch.float32)
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            dense_w = torch.zeros(u.shape[0], self.moe.num_experts, dtype=torch.float32).scatter(1, ids, w)
            for e, expert in enumerate(self.experts):
                out = out + expert(u).float() * dense_w[:, e:e + 1]
        else:
            for e in torch.unique(ids).tolist():
                rows, slot = torch.where(ids == e)
                # index_put_ rather than index_add_: the latter takes ~50 ms per call on a busy 2-core CPU
                out.index_put_((rows,), self.experts[e](u[rows]).float() * w[rows, slot, None], accumulate=True)
        return out.to(u.dtype).reshape(shape)
