"""Tokenizer files of a checkpoint (HF `tokenizer.json`), with the special ids the spec names."""

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
