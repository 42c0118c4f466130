"""Tokenizer files of a checkpoint: reading (HF `tokenizer.json`, with the special ids the spec names) and writing
a family's files for checkpoints pocketllm creates (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pocketllm.export.errors import PocketllmError


@dataclass
class TextTokenizer:
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821
    bos_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(directory: str | Path, bos_id: int | None) -> TextTokenizer:
    from tokenizers import Tokenizer

    d = Path(directory)
    path = d / "tokenizer.json"
    if not path.is_file():
        raise PocketllmError(f"{path}: tokenizer not found (pocketllm reads Hugging Face tokenizer.json files)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own Exception type with a parse message
        raise PocketllmError(f"{path}: not a valid tokenizer.json ({e})") from None
    add_bos = True
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            add_bos = bool(json.loads(cfg_path.read_text()).get("add_bos_token", True))
        except json.JSONDecodeError as e:
            raise PocketllmError(f"{cfg_path}: not valid JSON ({e})") from None
    return TextTokenizer(tok, bos_id, add_bos)


def tokenizer_config(bos: str | None, eos: str, unk: str | None, chat_template: str | None = None) -> dict:
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "unk_token": unk,
           "add_bos_token": bos is not None, "model_max_length": 1_000_000}
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


def write_tokenizer(out: Path, family: str, tokenizer) -> None:
    """Write `tokenizer` (a `tokenizers.Tokenizer` whose specials are the family's) with the family's config files."""
    from pocketllm.export.families import get_family

    spec = get_family(family).tokenizer
    tokenizer.save(str(Path(out) / "tokenizer.json"))
    cfg = tokenizer_config(spec.bos, spec.eos, spec.unk, spec.chat_template)
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {k: v for k, v in {"bos_token": spec.bos, "eos_token": spec.eos, "unk_token": spec.unk}.items() if v}
    (Path(out) / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
