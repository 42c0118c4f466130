"""SmallThinker (SJTU-IPADS): a mixture of ReGLU experts routed BEFORE attention (the router reads the layer input),
with per-layer NoPE / sliding-window layouts. Checkpoint names: `block_sparse_moe.primary_router`,
`block_sparse_moe.experts.{e}.{gate,up,down}`."""

from pocketllm.export.families.base import Family, MoENames, TokenizerSpec, attention_tensors, moe_tensors
from pocketllm.export.families.minicpm4 import CHATML
from pocketllm.export.families.smallthinker.config import parse
from pocketllm.export.families.smallthinker.presets import PRESETS
from pocketllm.export.spec import ModelSpec

MOE_NAMES = MoENames(router="primary_router", gate="gate", up="up", down="down")


def layer_tensors(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    H, p = spec.hidden_size, f"model.layers.{i}."
    return {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            **attention_tensors(spec, p), **moe_tensors(spec, p, MOE_NAMES)}


FAMILY = Family(
    name="smallthinker",
    model_types=("smallthinker",),
    architectures=("SmallThinkerForCausalLM",),
    parse=parse,
    layer_tensors=layer_tensors,
    presets=PRESETS,
    tokenizer=TokenizerSpec(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None, eos="<|im_end|>",
                            unk=None, chat_template=CHATML),
    float_modules=("*.primary_router",),  # tiny, and routing flips are costly
    moe_names=MOE_NAMES,
)
