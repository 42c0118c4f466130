"""ModelSpec: the typed, validated description of a checkpoint. The single source of truth downstream.

`spec_from_config(config_dict, where)` turns an upstream `config.json` into a `ModelSpec` and rejects bad or
conflicting values before any weight is read. Everything downstream (torch model, numpy reference, exporters,
bundles) reads the spec, never the raw dict. Key names are exactly upstream's (see shared/docs/MODELS.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from export.errors import PocketllmError

FAMILIES = ("minicpm4", "smallthinker", "minimax")
MODEL_TYPE_TO_FAMILY = {"minicpm": "minicpm4", "minicpm4": "minicpm4", "smallthinker": "smallthinker"}


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

    def factors(self, max_context: int) -> tuple[float, ...] | None:
        """LongRoPE divisors for a cache of `max_context` tokens: the long list once it exceeds the original length.

        Upstream switches per call on the current sequence length; with a static cache we decide once, from the
        cache size, so that keys already in the cache never change rotation.
        """
        if self.short_factor is None:
            return None
        long = self.original_max_position_embeddings is not None and max_context > self.original_max_position_embeddings
        return self.long_factor if long else self.short_factor

    @property
    def attention_scaling(self) -> float:
        n = self.original_max_position_embeddings
        if self.short_factor is None or not n or self.max_position_embeddings <= n:
            return 1.0
        return math.sqrt(1.0 + math.log(self.max_position_embeddings / n) / math.log(n))

    def inv_freq(self, max_context: int) -> list[float]:
        base = [1.0 / (self.theta ** (2 * i / self.dim)) for i in range(self.dim // 2)]
        factors = self.factors(max_context)
        if factors is not None:
            base = [f / s for f, s in zip(base, factors)]
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
    activation: str = "silu"  # applied to q, k and v


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    top_k: int
    ffn_hidden_size: int
    router_softmax: bool  # True: softmax over the top-k logits; False: sigmoid of them, renormalised
    router_input: str = "layer_input"  # SmallThinker: the layer input, before norm and attention;
    # MiniMax: "post_attention_norm", the same normed tensor the experts read
    activation: str = "reglu"  # "reglu" (SmallThinker) | "swiglu" (MiniMax)


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
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

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
        d = asdict(self)
        d.pop("extra")
        return d


# ---------------------------------------------------------------------------------------------- config parsing
class _Config:
    """Typed access to a config dict; every failure names the file and key."""

    def __init__(self, raw: dict[str, Any], where: str):
        self.raw, self.where = raw, where

    def fail(self, key: str, expected: str, got: Any = None) -> PocketllmError:
        shown = "missing" if got is _MISSING else f"got {got!r}"
        return PocketllmError(f"{self.where}: key '{key}' must be {expected} ({shown})")

    def get(self, key: str, kind: str, default: Any = None, required: bool = True) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise self.fail(key, _KIND_TEXT[kind], _MISSING)
            return default
        value = self.raw[key]
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(key, "an integer", value)
        elif kind == "posint":
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise self.fail(key, "a positive integer", value)
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self.fail(key, "a number", value)
            value = float(value)
        elif kind == "posfloat":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise self.fail(key, "a positive number", value)
            value = float(value)
        elif kind == "bool":
            if not isinstance(value, bool):
                raise self.fail(key, "true or false", value)
        elif kind == "dict":
            if not isinstance(value, dict):
                raise self.fail(key, "an object", value)
        elif kind == "str":
            if not isinstance(value, str):
                raise self.fail(key, "a string", value)
        return value

    def layout(self, key: str, n: int, default: int | None = None) -> list[int]:
        if key not in self.raw and default is not None:
            return [default] * n
        value = self.get(key, "list")
        if not isinstance(value, list) or len(value) != n or any(v not in (0, 1) or isinstance(v, float) for v in value):
            raise self.fail(key, f"a list of {n} entries, each 0 or 1", value)
        return [int(v) for v in value]


class _Missing:
    pass


_MISSING = _Missing()
_KIND_TEXT = {"int": "an integer", "posint": "a positive integer", "float": "a number", "posfloat": "a positive number",
              "bool": "true or false", "dict": "an object", "str": "a string", "list": "a list"}


def _eos_ids(cfg: _Config, default: list[int]) -> tuple[int, ...]:
    eos = cfg.raw.get("eos_token_id", default)
    if eos is None:
        return ()
    eos = eos if isinstance(eos, list) else [eos]
    if any(isinstance(e, bool) or not isinstance(e, int) for e in eos):
        raise cfg.fail("eos_token_id", "an integer or a list of integers", cfg.raw.get("eos_token_id"))
    return tuple(eos)


def _rope(cfg: _Config, head_dim: int, max_pos: int, default_theta: float) -> RopeSpec:
    theta = cfg.get("rope_theta", "posfloat", default_theta, required=False)
    scaling = cfg.raw.get("rope_scaling")
    if scaling is None:
        return RopeSpec(theta=theta, dim=head_dim, max_position_embeddings=max_pos)
    if not isinstance(scaling, dict):
        raise cfg.fail("rope_scaling", "an object or null", scaling)
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "longrope":
        raise cfg.fail("rope_scaling.rope_type", "'longrope' (the only scaling MiniCPM4 uses)", rope_type)
    factors = {}
    for name in ("short_factor", "long_factor"):
        f = scaling.get(name)
        if (not isinstance(f, list) or len(f) != head_dim // 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in f)):
            raise cfg.fail(f"rope_scaling.{name}", f"a list of {head_dim // 2} positive numbers (head_dim / 2)", f)
        factors[name] = tuple(float(x) for x in f)
    orig = scaling.get("original_max_position_embeddings")
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 1:
        raise cfg.fail("rope_scaling.original_max_position_embeddings", "an integer > 1", orig)
    return RopeSpec(theta=theta, dim=head_dim, short_factor=factors["short_factor"], long_factor=factors["long_factor"],
                    original_max_position_embeddings=orig, max_position_embeddings=max_pos)


def _sparse(cfg: _Config) -> SparseSpec | None:
    raw = cfg.raw.get("sparse_config")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise cfg.fail("sparse_config", "an object or null", raw)
    sub = _Config(raw, cfg.where)
    vals = {}
    defaults = SparseSpec()
    for key in ("kernel_size", "kernel_stride", "block_size"):
        vals[key] = sub.get(key, "posint", getattr(defaults, key), required=False)
    for key in ("init_blocks", "window_size", "topk", "dense_len"):
        vals[key] = sub.get(key, "int", getattr(defaults, key), required=False)
    vals["use_nope"] = sub.get("use_nope", "bool", False, required=False)
    spec = SparseSpec(**vals)
    if spec.init_blocks < 0 or spec.topk < 0 or spec.window_size < 0:
        raise cfg.fail("sparse_config", "non-negative init_blocks, topk and window_size", raw)
    if spec.window_size % spec.block_size:
        raise cfg.fail("sparse_config.window_size", f"a multiple of block_size ({spec.block_size})", spec.window_size)
    if spec.dense_len < -1:
        raise cfg.fail("sparse_config.dense_len", "-1 (always sparse) or a non-negative length", spec.dense_len)
    if spec.use_nope:
        raise cfg.fail("sparse_config.use_nope", "false (block selection on pre-RoPE keys is not supported yet)", True)
    if spec.budget <= 0:
        raise cfg.fail("sparse_config.topk", "such that topk + window_size / block_size > 0", spec.topk)
    return spec


def _common(cfg: _Config) -> dict[str, Any]:
    hidden = cfg.get("hidden_size", "posint")
    heads = cfg.get("num_attention_heads", "posint")
    kv_heads = cfg.get("num_key_value_heads", "posint", heads, required=False)
    if heads % kv_heads:
        raise cfg.fail("num_key_value_heads", f"a divisor of num_attention_heads ({heads})", kv_heads)
    return dict(
        vocab_size=cfg.get("vocab_size", "posint"),
        hidden_size=hidden,
        num_layers=cfg.get("num_hidden_layers", "posint"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", "posfloat", 1e-6, required=False),
        max_position_embeddings=cfg.get("max_position_embeddings", "posint"),
        torch_dtype=str(cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "float32"),
    )


def _minicpm4(cfg: _Config) -> ModelSpec:
    c = _common(cfg)
    hidden, heads, n_layers = c["hidden_size"], c["num_heads"], c["num_layers"]
    head_dim = cfg.get("head_dim", "posint", None, required=False)
    if head_dim is None:
        if hidden % heads:
            raise cfg.fail("head_dim", f"given when hidden_size ({hidden}) is not a multiple of num_attention_heads", None)
        head_dim = hidden // heads
    if head_dim % 2:
        raise cfg.fail("head_dim", "even (rotate-half RoPE)", head_dim)
    scale_depth = cfg.get("scale_depth", "float")
    dim_model_base = cfg.get("dim_model_base", "posfloat")
    sparse = _sparse(cfg)
    layer = LayerSpec(attention="infllm" if sparse else "dense", use_rope=True, mlp="swiglu")
    return ModelSpec(
        family="minicpm4", model_type=cfg.raw["model_type"], head_dim=head_dim,
        intermediate_size=cfg.get("intermediate_size", "posint"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", True, required=False),
        rope=_rope(cfg, head_dim, c["max_position_embeddings"], 10000.0),
        layers=tuple([layer] * n_layers),
        scale_emb=cfg.get("scale_emb", "float"),
        residual_scale=scale_depth / math.sqrt(n_layers),
        logit_scale=1.0 / (hidden / dim_model_base),
        sparse=sparse,
        bos_token_id=cfg.get("bos_token_id", "int", 1, required=False),
        eos_token_ids=_eos_ids(cfg, [2]),
        **c,
    )


def _smallthinker(cfg: _Config) -> ModelSpec:
    c = _common(cfg)
    n_layers = c["num_layers"]
    head_dim = cfg.get("head_dim", "posint")
    if head_dim % 2:
        raise cfg.fail("head_dim", "even (rotate-half RoPE)", head_dim)
    rope_layout = cfg.layout("rope_layout", n_layers, default=1)
    swa_layout = cfg.layout("sliding_window_layout", n_layers, default=0)
    window = cfg.get("sliding_window_size", "posint", None, required=any(swa_layout))
    experts = cfg.get("moe_num_primary_experts", "posint")
    active = cfg.get("moe_num_active_primary_experts", "posint")
    if active > experts:
        raise cfg.fail("moe_num_active_primary_experts", f"at most moe_num_primary_experts ({experts})", active)
    if cfg.raw.get("moe_shared_primary_experts") or cfg.raw.get("moe_enable_secondary_experts"):
        raise cfg.fail("moe_shared_primary_experts", "0 (shared/secondary experts are not in released SmallThinker)",
                       cfg.raw.get("moe_shared_primary_experts"))
    moe = MoESpec(num_experts=experts, top_k=active, ffn_hidden_size=cfg.get("moe_ffn_hidden_size", "posint"),
                  router_softmax=cfg.get("moe_primary_router_apply_softmax", "bool", False, required=False))
    layers = tuple(
        LayerSpec(attention="sliding" if swa else "dense", use_rope=bool(rope),
                  sliding_window=window if swa else None, mlp="moe")
        for rope, swa in zip(rope_layout, swa_layout)
    )
    return ModelSpec(
        family="smallthinker", model_type="smallthinker", head_dim=head_dim,
        intermediate_size=moe.ffn_hidden_size,
        tie_word_embeddings=cfg.get("tie_word_embeddings", "bool", True, required=False),
        rope=_rope(cfg, head_dim, c["max_position_embeddings"], 1.5e6),
        layers=layers, moe=moe,
        bos_token_id=cfg.get("bos_token_id", "int", None, required=False),
        eos_token_ids=_eos_ids(cfg, []),
        **c,
    )


_BUILDERS = {"minicpm4": _minicpm4, "smallthinker": _smallthinker}


def register_family(model_types: tuple[str, ...], family: str, builder) -> None:
    """Hook for further families (lightning-attention models add theirs here)."""
    for t in model_types:
        MODEL_TYPE_TO_FAMILY[t] = family
    _BUILDERS[family] = builder


def spec_from_config(raw: Any, where: str = "config.json") -> ModelSpec:
    if not isinstance(raw, dict):
        raise PocketllmError(f"{where}: expected a JSON object at the top level")
    cfg = _Config(raw, where)
    model_type = raw.get("model_type")
    family = MODEL_TYPE_TO_FAMILY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        known = ", ".join(sorted(MODEL_TYPE_TO_FAMILY))
        raise PocketllmError(f"{where}: unknown model_type {model_type!r} (supported: {known})")
    return _BUILDERS[family](cfg)


# Families that live in their own module register themselves through `register_family` on import.
from export.families import minimax as _minimax  # noqa: E402,F401  (model_type "minimax": lightning hybrids)
