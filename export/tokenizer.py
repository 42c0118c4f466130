"""Tokenizer files of a checkpoint, as upstream ships them, and the files of checkpoints pocketllm writes.

Reading (`load_tokenizer`): a Hugging Face `tokenizer.json` when there is one, else a SentencePiece `tokenizer.model`
(MiniCPM4 ships one; ExecuTorch's runner reads either kind). Ids beyond the SentencePiece model's pieces are the
checkpoint's added tokens (`added_tokens.json`: `<|im_end|>` 73440, ...). As upstream's tokenizer class does, their
text is split out of the input before the model encodes the pieces in between (so "<|im_start|>" in a chat prompt is
id 73441, never plain text), and they are skipped when decoding, like every control piece. BOS is prepended when
tokenizer_config.json's `add_bos_token` says so (default true). `decode_continuation(prompt, new)` is the text the
new ids add after the prompt (SentencePiece drops the leading space of a decoded text's first piece, so new ids
are decoded in their context, as ExecuTorch's runner does).

Writing (`write_tokenizer`, `write_sentencepiece_tokenizer`): a family's files for init-checkpoint's random
checkpoints: MiniCPM4 a SentencePiece model (+ the equivalent tokenizer.json, + added_tokens.json), the others
byte-level BPE tokenizer.json files; special ids agree with the config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pocketllm.export.errors import PocketllmError

HF_FILE, SP_FILE, ADDED_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer.model", "added_tokens.json", \
    "tokenizer_config.json"
SP_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass
class TextTokenizer:
    """encode(text) -> ids (BOS first when the tokenizer adds it); encode_plain(text) without BOS; decode(ids);
    decode_continuation(prompt_ids, new_ids)."""

    backend: object  # tokenizers.Tokenizer or sentencepiece.SentencePieceProcessor
    bos_id: int | None
    add_bos: bool
    kind: str  # "huggingface" | "sentencepiece"
    added: dict[str, int] = field(default_factory=dict)  # SentencePiece: the checkpoint's added tokens, text -> id

    def __post_init__(self):
        # longest first, so that a token that is a prefix of another never wins
        names = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._added_ids = set(self.added.values())

    def encode_plain(self, text: str) -> list[int]:
        if self.kind != "sentencepiece":
            return self.backend.encode(text, add_special_tokens=False).ids
        if self._split is None:
            return list(self.backend.encode(text))
        ids: list[int] = []
        for part in self._split.split(text):  # odd items are added tokens; each text part is encoded on its own
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                ids.extend(self.backend.encode(part))
        return ids

    def encode(self, text: str) -> list[int]:
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + self.encode_plain(text)

    def decode(self, ids: list[int]) -> str:
        if self.kind == "sentencepiece":  # added tokens and control pieces are special: skipped
            n = self.backend.get_piece_size()
            return self.backend.decode([i for i in ids if i < n and i not in self._added_ids
                                        and not self.backend.is_control(i)])
        return self.backend.decode(ids, skip_special_tokens=True)

    def decode_continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text `new_ids` add after `prompt_ids` (streaming: call it with the ids generated so far)."""
        before = self.decode(list(prompt_ids))
        text = self.decode(list(prompt_ids) + list(new_ids))
        return text[len(before):] if text.startswith(before) else self.decode(list(new_ids))


def added_tokens(d: Path) -> dict[str, int]:
    """text -> id of a checkpoint's added tokens: added_tokens.json, and tokenizer_config.json's
    `added_tokens_decoder` (both as upstream's tokenizer classes write them)."""
    out: dict[str, int] = {}
    for path, read in ((d / CONFIG_FILE, lambda c: {v["content"]: int(k) for k, v in
                                                     c.get("added_tokens_decoder", {}).items()}),
                       (d / ADDED_FILE, lambda c: {k: int(v) for k, v in c.items()})):
        if path.is_file():
            try:
                out.update(read(json.loads(path.read_text(encoding="utf-8"))))
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
                raise PocketllmError(f"{path}: not a valid {path.name} ({e})") from None
    return out


def _add_bos(d: Path) -> bool:
    path = d / CONFIG_FILE
    if not path.is_file():
        return True
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("add_bos_token", True))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(directory: str | Path, bos_id: int | None) -> TextTokenizer:
    d = Path(directory)
    if (d / HF_FILE).is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(d / HF_FILE))
        except Exception as e:  # tokenizers raises its own Exception type with a parse message
            raise PocketllmError(f"{d / HF_FILE}: not a valid tokenizer.json ({e})") from None
        return TextTokenizer(tok, bos_id, _add_bos(d), "huggingface")
    if (d / SP_FILE).is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(d / SP_FILE))
        except (OSError, RuntimeError) as e:
            raise PocketllmError(f"{d / SP_FILE}: not a valid SentencePiece model ({e})") from None
        return TextTokenizer(sp, bos_id, _add_bos(d), "sentencepiece", added_tokens(d))
    raise PocketllmError(f"{d}: no tokenizer found (expected {HF_FILE} or a SentencePiece {SP_FILE})")


# ------------------------------------------------------------------------------------------------- writing
def tokenizer_config(bos: str | None, eos: str, unk: str | None, chat_template: str | None = None,
                     tokenizer_class: str = "PreTrainedTokenizerFast") -> dict:
    cfg = {"tokenizer_class": tokenizer_class, "bos_token": bos, "eos_token": eos, "unk_token": unk,
           "add_bos_token": bos is not None, "model_max_length": 1_000_000}
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg


def _write_configs(out: Path, spec, tokenizer_class: str) -> None:
    cfg = tokenizer_config(spec.bos, spec.eos, spec.unk, spec.chat_template, tokenizer_class)
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {k: v for k, v in {"bos_token": spec.bos, "eos_token": spec.eos, "unk_token": spec.unk}.items() if v}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def write_tokenizer(out: Path, family: str, tokenizer) -> None:
    """Write `tokenizer` (a `tokenizers.Tokenizer` whose specials are the family's) with the family's config files."""
    from pocketllm.export.families import get_family

    tokenizer.save(str(Path(out) / HF_FILE))
    _write_configs(Path(out), get_family(family).tokenizer, "PreTrainedTokenizerFast")


def write_sentencepiece_tokenizer(out: Path, family: str, texts: Iterable[str], pieces: int,
                                  added: dict[str, int]) -> None:
    """A SentencePiece BPE model of exactly `pieces` pieces (<unk> 0, <s> 1, </s> 2, byte fallback, pieces learned
    from `texts`, then unused padding pieces), the added tokens at the ids `added` gives (as upstream's
    added_tokens.json), the equivalent tokenizer.json (Llama-style: what HF's converter makes of such a model), and
    the family's config files."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from pocketllm.export.families import get_family

    out = Path(out)
    text_file = out / ".sp-train.txt"
    text_file.write_text("\n".join(texts), encoding="utf-8")
    prefix = out / ".sp"
    learned = min(pieces, 600)
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(prefix), model_type="bpe",
                                   vocab_size=learned, byte_fallback=True, hard_vocab_limit=False,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   # Llama/MiniCPM settings: text kept as is (no NFKC, spaces kept), so that the
                                   # tokenizer.json form below encodes exactly like the model
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, allow_whitespace_only_pieces=True, split_digits=True,
                                   minloglevel=2, num_threads=1)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(Path(f"{prefix}.model").read_bytes())
    for extra in (text_file, Path(f"{prefix}.model"), Path(f"{prefix}.vocab")):
        extra.unlink()
    if len(model.pieces) > pieces:
        raise PocketllmError(f"SentencePiece model needs {len(model.pieces)} pieces, more than {pieces}")
    while len(model.pieces) < pieces:  # unused pieces: never produced, keep the ids of the added tokens fixed
        p = model.pieces.add()
        p.piece, p.score, p.type = f"<unused_{len(model.pieces)}>", 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    (out / SP_FILE).write_bytes(model.SerializeToString())
    (out / ADDED_FILE).write_text(json.dumps(added, indent=2) + "\n")
    hf = sentencepiece_to_tokenizers(model, added)
    hf.save(str(out / HF_FILE))
    _write_llama_configs(out, get_family(family).tokenizer, model, added)


def _write_llama_configs(out: Path, spec, model, added: dict[str, int]) -> None:
    """tokenizer_config.json and special_tokens_map.json as upstream's LlamaTokenizer checkpoints ship them (the
    released MiniCPM4-0.5B's keys): the control pieces and added tokens in `added_tokens_decoder`, the added tokens as
    `additional_special_tokens`, and the first added token (<|im_end|>, the chat turn's end) as `eos_token`."""
    def entry(text: str) -> dict:
        return {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    names = [t for t, _ in sorted(added.items(), key=lambda kv: kv[1])]
    specials = {i: p.piece for i, p in enumerate(model.pieces) if p.type in (2, 3)}  # UNKNOWN, CONTROL
    specials.update({i: t for t, i in added.items()})
    eos = names[0] if names else spec.eos
    cfg = {
        "add_bos_token": spec.bos is not None, "add_eos_token": False, "add_prefix_space": None,
        "added_tokens_decoder": {str(i): {**entry(t), "special": True} for i, t in sorted(specials.items())},
        "additional_special_tokens": names, "bos_token": spec.bos, "chat_template": spec.chat_template,
        "clean_up_tokenization_spaces": False, "eos_token": eos, "legacy": True, "model_max_length": int(1e30),
        "pad_token": None, "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer", "unk_token": spec.unk, "use_default_system_prompt": False,
    }
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    special_map = {"additional_special_tokens": names, "bos_token": entry(spec.bos), "eos_token": entry(eos),
                   "unk_token": entry(spec.unk)}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def sentencepiece_to_tokenizers(model, added: dict[str, int]):
    """The `tokenizers` form of a SentencePiece BPE model with byte fallback (Llama-style normalizer, decoder):
    merges ranked by the merged piece's score, as HF's converter derives them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {p.piece: i for i, p in enumerate(model.pieces)}
    scores = {p.piece: p.score for p in model.pieces}
    normal = [p.piece for p in model.pieces if p.type == 1]  # NORMAL pieces take part in merges
    merges = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((scores[piece], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP_SPACE), normalizers.Replace(" ", SP_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [AddedToken(p.piece, special=True, normalized=False) for p in model.pieces if p.type == 3]  # CONTROL
    tok.add_special_tokens(specials + [AddedToken(t, special=True, normalized=False)
                                       for t, _ in sorted(added.items(), key=lambda kv: kv[1])])
    return tok
