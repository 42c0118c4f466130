"""MiniCPM4 (OpenBMB): Llama-shaped decoder with muP scalars, LongRoPE and InfLLM v2 sparse attention.

Checkpoint layout: upstream's MiniCPMForCausalLM names (`model.layers.{i}.self_attn.q_proj`, `mlp.gate_proj`, ...).
"""

from pocketllm.export.families.base import Family, TokenizerSpec, attention_tensors
from pocketllm.export.families.minicpm4.config import parse
from pocketllm.export.families.minicpm4.presets import PRESETS
from pocketllm.export.spec import ModelSpec

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def layer_tensors(spec: ModelSpec, i: int) -> dict[str, tuple[int, ...]]:
    H, I, p = spec.hidden_size, spec.intermediate_size, f"model.layers.{i}."
    return {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            **attention_tensors(spec, p),
            p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I)}


FAMILY = Family(
    name="minicpm4",
    model_types=("minicpm", "minicpm4"),
    architectures=("MiniCPMForCausalLM",),
    parse=parse,
    layer_tensors=layer_tensors,
    presets=PRESETS,
    # A SentencePiece model plus added tokens from id 73440 on (released 0.5B: <|im_end|> 73440, <|im_start|> 73441,
    # <|tool_call|> 73442, ...; the names after the third are MiniCPM3's, for shape only).
    tokenizer=TokenizerSpec(specials=("<unk>", "<s>", "</s>"), bos="<s>", eos="</s>", unk="<unk>",
                            chat_template=CHATML, kind="sentencepiece",
                            added=("<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>",
                                   "<|execute_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")),
)
