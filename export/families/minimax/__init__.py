"""MiniMax (model_type "minimax", transformers' MiniMaxForCausalLM): lightning-attention layers (linear attention with
per-head decay, a fixed-size state) mixed with softmax-attention layers, post-norm DeepNorm residuals, and a softmax
top-k mixture of SwiGLU experts (`block_sparse_moe.gate`, `experts.{e}.w1/w3/w2`). Math: docs/lightning.md."""

from pocketllm.export.families.base import Family, MoENames, TokenizerSpec, attention_tensors, moe_tensors
from pocketllm.export.families.minicpm4 import CHATML
from pocketllm.export.families.minimax.config import parse
from pocketllm.export.families.minimax.presets import PRESETS
from pocketllm.export.spec import ModelSpec

MOE_NAMES = MoENames(router="gate", gate="w1", up="w3", down="w2")


def layer_tensors(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    """transformers' MiniMaxForCausalLM.save_pretrained layout (experts in the per-expert w1/w2/w3 form)."""
    H, p = spec.hidden_size, f"model.layers.{i}."
    t = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    if spec.layers[i].attention == "lightning":
        W, a = spec.num_heads * spec.head_dim, p + "self_attn."  # no GQA in lightning layers
        t[a + "qkv_proj.weight"] = (3 * W, H)  # per head [q | k | v], head after head
        t[a + "output_gate.weight"] = (W, H)
        t[a + "norm.weight"] = (W,)
        t[a + "out_proj.weight"] = (H, W)
    else:
        t.update(attention_tensors(spec, p))
    t.update(moe_tensors(spec, p, MOE_NAMES))
    return t


def derived_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Lightning layers' decay tables, which transformers saves: slope_rate [H,1,1] and the tables of one prefill
    block B. Functions of the config alone (every engine recomputes them)."""
    t: dict[str, tuple[int, ...]] = {}
    Hh, B = spec.num_heads, spec.lightning.block_size
    for i, layer in enumerate(spec.layers):
        if layer.attention == "lightning":
            a = f"model.layers.{i}.self_attn."
            t[a + "slope_rate"] = (Hh, 1, 1)
            t[a + "query_decay"] = (Hh, B, 1)
            t[a + "key_decay"] = (Hh, B, 1)
            t[a + "diagonal_decay"] = (1, Hh, B, B)
    return t


def derived_values(spec: ModelSpec) -> dict:
    """The values of `derived_tensors`, computed the way upstream does (pocketllm never reads them back): slope_rate
    s [H,1,1]; for r = 1..B: query_decay exp(-s r), key_decay exp(-s (B - r)), diagonal_decay exp(-s (r_i - r_j))
    where r_i >= r_j, else 0."""
    import torch

    from pocketllm.export.ops.lightning_attention import lightning_decay_rates

    out: dict[str, torch.Tensor] = {}
    B = spec.lightning.block_size
    for i, layer in enumerate(spec.layers):
        if layer.attention != "lightning":
            continue
        a = f"model.layers.{i}.self_attn."
        s = lightning_decay_rates(spec.num_heads, i, spec.num_layers)[:, None, None]  # [H, 1, 1]
        r = torch.arange(B) + 1
        gap = (r[:, None] - r[None, :])[None, None] * s  # [1, H, B, B]
        out[a + "slope_rate"] = s
        out[a + "query_decay"] = torch.exp(-s * r[:, None])
        out[a + "key_decay"] = torch.exp(-s * (B - r[:, None]))
        out[a + "diagonal_decay"] = torch.exp(torch.where(gap >= 0, -gap, float("-inf")))
    return out


FAMILY = Family(
    name="minimax",
    model_types=("minimax",),
    architectures=("MiniMaxForCausalLM",),
    parse=parse,
    layer_tensors=layer_tensors,
    derived_tensors=derived_tensors,
    derived_values=derived_values,
    presets=PRESETS,
    # MiniMaxConfig's defaults: bos 1, eos 2
    tokenizer=TokenizerSpec(specials=("<end_of_document>", "<beginning_of_sentence>", "<end_of_sentence>"),
                            bos="<beginning_of_sentence>", eos="<end_of_sentence>", unk=None, chat_template=CHATML),
    float_modules=("*.block_sparse_moe.gate",),  # the router (the experts' gates are experts.{e}.w1)
    moe_names=MOE_NAMES,
)
