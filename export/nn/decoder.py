"""The decoder: one export-friendly torch model built from a ModelSpec.

Module names mirror upstream (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, `lm_head`, ...), so an
upstream state dict loads without a renaming table. Input `tokens [1, T]` int64 and `start_pos` (python int,
SymInt, or int64 tensor [1]); output fp32 logits [1, T, vocab]. KV caches are non-persistent buffers of
`max_context` positions; lightning layers keep a fixed-size fp32 state buffer instead (export/nn/lightning.py).

Two residual forms, chosen per layer by the spec: pre-norm (MiniCPM4, SmallThinker) and MiniMax's post-norm
`x = norm(h); h = x * alpha + f(x) * beta` (see LayerSpec).
"""

from __future__ import annotations

import torch
from torch import nn

from pocketllm.export.families import get_family
from pocketllm.export.nn.attention import Attention
from pocketllm.export.nn.kv_cache import KVCache
from pocketllm.export.nn.lightning import LightningAttention, RecurrentState
from pocketllm.export.nn.mlp import GatedMLP
from pocketllm.export.nn.moe import MoE
from pocketllm.export.nn.norm import RMSNorm
from pocketllm.export.nn.rope import RotaryTable
from pocketllm.export.spec import ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, max_context: int):
        super().__init__()
        layer = spec.layers[index]
        self.layer = layer
        self.residual_scale = spec.residual_scale
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if layer.attention == "lightning":
            self.self_attn = LightningAttention(spec, index)
        else:
            self.self_attn = Attention(spec, layer, max_context)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        if layer.mlp == "moe":
            self.block_sparse_moe = MoE(spec.hidden_size, spec.moe, get_family(spec.family).moe_names)
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, "silu")

    def feed_forward(self, u: torch.Tensor, layer_input: torch.Tensor, route=None) -> torch.Tensor:
        if self.layer.mlp == "moe":
            return self.block_sparse_moe(u, layer_input, route)
        return self.mlp(u)

    def forward(self, h, rotary, positions, start_pos):
        layer_input = h  # what SmallThinker's pre-attention router reads
        route = None
        if self.layer.mlp == "moe" and self.block_sparse_moe.pre_attention:
            # routed before attention (same result): an expert store loads the chosen experts while attention runs
            route = self.block_sparse_moe.route(layer_input)
        if self.layer.residual == "post_norm":  # MiniMax: the normed input is the residual, weighted by alpha
            layer = self.layer
            x = self.input_layernorm(h)
            h = x * layer.attn_alpha + self.self_attn(x, rotary, positions, start_pos) * layer.attn_beta
            u = self.post_attention_layernorm(h)
            return u * layer.mlp_alpha + self.feed_forward(u, layer_input, route) * layer.mlp_beta
        h = h + self.self_attn(self.input_layernorm(h), rotary, positions, start_pos) * self.residual_scale
        u = self.post_attention_layernorm(h)
        return h + self.feed_forward(u, layer_input, route) * self.residual_scale


class DecoderStack(nn.Module):
    def __init__(self, spec: ModelSpec, max_context: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(spec, i, max_context) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary = RotaryTable(spec.rope, max_context)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_context: int):
        super().__init__()
        self.spec, self.max_context = spec, max_context
        self.model = DecoderStack(spec, max_context)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, start_pos=None) -> torch.Tensor:
        """tokens [1, T] int64 -> logits [1, T, vocab] fp32.

        start_pos None: cache-free causal pass from position 0 (any batch size; used for training and scoring).
        """
        T = tokens.shape[1]
        if isinstance(start_pos, torch.Tensor):
            start_pos = start_pos.reshape(-1)[0].item()
            torch._check_is_size(start_pos)
            torch._check(start_pos + T <= self.max_context)
        base = 0 if start_pos is None else start_pos
        positions = base + torch.arange(T)
        h = self.model.embed_tokens(tokens) * self.spec.scale_emb
        rotary = self.model.rotary.at(positions)  # cos/sin rows gathered once for every layer
        for layer in self.model.layers:
            h = layer(h, rotary, positions, start_pos)
        h = self.model.norm(h) * self.spec.logit_scale
        return self.head(h.float() if self.spec.lm_head_fp32 else h).float()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head: an nn.Linear (or the float embedding table, tied), a packed linear (export/nn/quant_linear),
        or for a tied packed table the table's own linear over the same buffers (stored once)."""
        emb = self.model.embed_tokens
        if self.lm_head is None and hasattr(emb, "linear"):
            return emb.linear(h)
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            return self.lm_head(h)
        w = self.output_weight()
        return torch.nn.functional.linear(h, w.float() if self.spec.lm_head_fp32 else w)

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Zero every KV cache and recurrent state."""
        for module in self.modules():
            if isinstance(module, (KVCache, RecurrentState)):
                module.reset()
