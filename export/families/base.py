"""What one model family knows, as data: the `Family` record each `export/families/<name>/` package registers.

A family turns an upstream config.json into a ModelSpec, lists the tensors a checkpoint must hold, names its
modules the way upstream's state dict does, offers presets for `init-checkpoint`, and says which special tokens
its tokenizer has and which modules stay in floating point when quantizing. Everything downstream (checkpoint
reader, torch model, quantizer, init-checkpoint, CLI choices, tests) reads these records from the registry in
`export/families/__init__.py`; nothing else hard-codes a family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pocketllm.export.families.config import ConfigReader
from pocketllm.export.spec import ModelSpec

TensorTable = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class TokenizerSpec:
    """The family's tokenizer as upstream ships it; init-checkpoint writes random checkpoints' tokenizers like it.

    kind "bpe": byte-level BPE files (tokenizer.json, vocab.json, merges.txt); `specials` occupy consecutive ids
      (at 0 for small test vocabularies, or where the config's bos/eos ids put them, e.g. Qwen2's 151643..).
    kind "sentencepiece": a SentencePiece tokenizer.model whose first pieces are `specials` (<unk>, <s>, </s>) and
      `added` tokens appended after the model's pieces at the end of the vocabulary (added_tokens.json).
    """

    specials: tuple[str, ...]
    bos: str | None
    eos: str
    unk: str | None
    chat_template: str | None = None
    kind: str = "bpe"
    added: tuple[str, ...] = ()


@dataclass(frozen=True)
class MoENames:
    """Upstream module names of a mixture-of-experts block: `block_sparse_moe.<router>`,
    `block_sparse_moe.experts.{e}.<gate|up|down>`."""

    router: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Family:
    name: str  # "minicpm4": what --arch, manifests and ModelSpec.family say
    model_types: tuple[str, ...]  # config.json `model_type` values that mean this family
    architectures: tuple[str, ...]  # config.json `architectures` entries that mean it (when model_type is absent)
    parse: Callable[[ConfigReader], ModelSpec]  # config.json -> ModelSpec (upstream keys and defaults)
    layer_tensors: Callable[[ModelSpec, int], TensorTable]  # tensors of decoder layer i, upstream names
    presets: dict[str, Callable[[], dict]]  # init-checkpoint presets: name -> config.json dict
    tokenizer: TokenizerSpec
    float_modules: tuple[str, ...] = ()  # module-name patterns (fnmatch) kept in floating point by quantizers
    moe_names: MoENames | None = None
    # Buffers upstream saves although the config determines them: shape-checked when present, never loaded;
    # init-checkpoint writes their values (computed as upstream does) so upstream loads our checkpoints.
    derived_tensors: Callable[[ModelSpec], TensorTable] = field(default=lambda spec: {})
    derived_values: Callable[[ModelSpec], dict] = field(default=lambda spec: {})

    def expected_tensors(self, spec: ModelSpec) -> TensorTable:
        """Every tensor the checkpoint must hold, with its shape, in upstream naming."""
        V, H = spec.vocab_size, spec.hidden_size
        t = {"model.embed_tokens.weight": (V, H)}
        for i in range(spec.num_layers):
            t.update(self.layer_tensors(spec, i))
        t["model.norm.weight"] = (H,)
        if not spec.tie_word_embeddings:
            t["lm_head.weight"] = (V, H)
        return t


def attention_tensors(spec: ModelSpec, prefix: str) -> TensorTable:
    """q/k/v/o projections of a softmax attention block (GQA), upstream's `self_attn.*_proj` names."""
    H, a = spec.hidden_size, prefix + "self_attn."
    return {a + "q_proj.weight": (spec.q_width, H), a + "k_proj.weight": (spec.kv_width, H),
            a + "v_proj.weight": (spec.kv_width, H), a + "o_proj.weight": (H, spec.q_width)}


def moe_tensors(spec: ModelSpec, prefix: str, names: MoENames) -> TensorTable:
    """Router and per-expert gate/up/down of a `block_sparse_moe` block."""
    H, moe, q = spec.hidden_size, spec.moe, prefix + "block_sparse_moe."
    t = {f"{q}{names.router}.weight": (moe.num_experts, H)}
    for e in range(moe.num_experts):
        t[f"{q}experts.{e}.{names.gate}.weight"] = (moe.ffn_hidden_size, H)
        t[f"{q}experts.{e}.{names.up}.weight"] = (moe.ffn_hidden_size, H)
        t[f"{q}experts.{e}.{names.down}.weight"] = (H, moe.ffn_hidden_size)
    return t
