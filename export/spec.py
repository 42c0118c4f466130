"""ModelSpec: the typed description of a checkpoint, the single source of truth downstream. Dataclasses only.

Each family package (export/families/<name>/) turns an upstream config.json into a ModelSpec and rejects bad or
conflicting values before any weight is read (`export.families.spec_from_config`). Everything downstream (torch
model, numpy reference, exporters, bundles) reads the spec, never the raw dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pocketllm.export.errors import PocketllmError


# How InfLLM v2 scores a compressed key (docs/infllm_v2.md step 3):
#   "upstream": exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))) with the coarse keys Kc2 (4x kernel and stride), the rule
#               MiniCPM4 was trained and is served with;
#   "exact":    softmax of q.Kc1/sqrt(d) over the visible Kc1 (the paper's ablation).
SCORE_RULES = ("upstream", "exact")


@dataclass(frozen=True)
class SparseSpec:
    """InfLLM v2 parameters (`sparse_config`). Selection math: docs/infllm_v2.md.

    `score_rule` is not an upstream config key: it is ours (an export option), and defaults to upstream's rule.
    """

    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192  # total length below which attention is dense; -1 = always sparse
    score_rule: str = "upstream"

    def __post_init__(self):
        if self.score_rule not in SCORE_RULES:
            raise PocketllmError(f"InfLLM v2 score_rule must be one of {', '.join(SCORE_RULES)} "
                                 f"(got {self.score_rule!r})")

    @property
    def coarse_kernel_size(self) -> int:
        """Kernel of the coarse compressed keys Kc2 whose log-sum-exp normalises the upstream scores (4x)."""
        return 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return 4 * self.kernel_stride

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def budget(self) -> int:
        """Blocks each query attends to, forced ones included (topk + window / block)."""
        return self.topk + self.local_blocks


@dataclass(frozen=True)
class RopeSpec:
    """Rotate-half RoPE over the first `dim` channels of each head, with optional LongRoPE factors."""

    theta: float
    dim: int
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 0

    @property
    def factors(self) -> tuple[float, ...] | None:
        """LongRoPE divisors, chosen from the config alone as upstream's remote code does: the long list whenever
        max_position_embeddings > original_max_position_embeddings, else the short one (never from the current
        length or a cache size)."""
        if self.short_factor is None:
            return None
        return self.long_factor if self.max_position_embeddings > self.original_max_position_embeddings else \
            self.short_factor

    @property
    def attention_scaling(self) -> float:
        """cos/sin magnitude: sqrt(1 + ln(max_pos / original) / ln(original)) with LongRoPE, unclamped (below 1 when
        max_pos < original, 1 when equal); 1 without."""
        if self.short_factor is None:
            return 1.0
        n = self.original_max_position_embeddings
        return math.sqrt(1.0 + math.log(self.max_position_embeddings / n) / math.log(n))

    def inv_freq(self) -> list[float]:
        base = [1.0 / (self.theta ** (2 * i / self.dim)) for i in range(self.dim // 2)]
        if self.factors is not None:
            base = [f / s for f, s in zip(base, self.factors)]
        return base


RESIDUAL_FORMS = ("pre_norm", "post_norm")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: how it mixes tokens, how its MLP looks, and how the residual stream is formed.

    residual "pre_norm" (MiniCPM4, SmallThinker): h = h + f(norm(h)) * residual_scale, for both sublayers.
    residual "post_norm" (MiniMax, DeepNorm-style): x = norm(h); h = x * alpha + f(x) * beta, for both sublayers,
    with (attn_alpha, attn_beta) around the token mixer and (mlp_alpha, mlp_beta) around the MLP.
    """

    attention: str  # "dense" | "infllm" | "sliding" | "lightning"
    use_rope: bool = True
    sliding_window: int | None = None  # keys j with i - j < window are visible
    mlp: str = "swiglu"  # "swiglu" | "moe"
    residual: str = "pre_norm"  # "pre_norm" | "post_norm"
    attn_alpha: float = 1.0  # post_norm only: weight of the normed input around the token mixer
    attn_beta: float = 1.0  # post_norm only: weight of the token mixer's output
    mlp_alpha: float = 1.0
    mlp_beta: float = 1.0

    def __post_init__(self):
        if self.residual not in RESIDUAL_FORMS:
            raise PocketllmError(f"LayerSpec: residual must be one of {', '.join(RESIDUAL_FORMS)} "
                                 f"(got {self.residual!r})")
        weights = (self.attn_alpha, self.attn_beta, self.mlp_alpha, self.mlp_beta)
        if self.residual == "pre_norm" and weights != (1, 1, 1, 1):
            raise PocketllmError("LayerSpec: residual alphas/betas apply to residual 'post_norm' only")
        if self.attention == "lightning" and self.use_rope:
            raise PocketllmError("LayerSpec: lightning attention layers take no RoPE (set use_rope=False)")


@dataclass(frozen=True)
class LightningSpec:
    """Lightning attention (linear attention with per-head exponential decay). Math: docs/lightning.md.

    Layer l of L, head h of H: decay rate s = 2^(-8(h+1)/H) * (1 - l / (L - 1 + 1e-5) + 1e-5), lambda = exp(-s).
    State per layer: [heads, head_dim, head_dim] fp32, constant in sequence length.
    """

    block_size: int = 256  # prefill block length B (upstream `block_size`)
    norm_eps: float = 1e-6  # RMSNorm over the concatenated heads (upstream hard-codes its default)


MOE_ROUTERS = ("pre_attention", "post_attention")
GATE_ACTIVATIONS = ("relu", "silu")


@dataclass(frozen=True)
class MoESpec:
    """Top-k mixture of gated experts: out = sum over the k chosen experts of w * down(act(gate(u)) * up(u)).

    router "pre_attention" (SmallThinker): routes on the layer input, before its norm and attention; top-k of the
      logits, then softmax over the k (router_softmax) or sigmoid of them renormalised to sum 1.
    router "post_attention" (MiniMax): routes on the post-attention norm output u, the tensor the experts read;
      softmax over all experts, top-k, renormalised to sum 1 (router_softmax must be true).
    activation: the gate's, "relu" (ReGLU, SmallThinker) or "silu" (SwiGLU, MiniMax).
    """

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    router_softmax: bool
    router: str = "pre_attention"
    activation: str = "relu"

    def __post_init__(self):
        if self.router not in MOE_ROUTERS:
            raise PocketllmError(f"MoESpec: router must be one of {', '.join(MOE_ROUTERS)} (got {self.router!r})")
        if self.activation not in GATE_ACTIVATIONS:
            raise PocketllmError(f"MoESpec: activation must be one of {', '.join(GATE_ACTIVATIONS)} "
                                 f"(got {self.activation!r})")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeSpec
    layers: tuple[LayerSpec, ...]
    # muP (MiniCPM4); 1.0 elsewhere
    scale_emb: float = 1.0
    residual_scale: float = 1.0  # scale_depth / sqrt(num_hidden_layers)
    logit_scale: float = 1.0  # 1 / (hidden_size / dim_model_base)
    sparse: SparseSpec | None = None
    moe: MoESpec | None = None
    lightning: LightningSpec | None = None  # set when some layer has attention "lightning"
    lm_head_fp32: bool = False  # MiniMax computes the LM head in fp32 whatever the weight dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self):
        if any(layer.attention == "lightning" for layer in self.layers) and self.lightning is None:
            raise PocketllmError("ModelSpec: lightning attention layers need a LightningSpec (spec.lightning)")

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, embedded in artifacts so runtimes never guess."""
        return asdict(self)
