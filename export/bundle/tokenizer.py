"""The tokenizer files of a bundle: copied from the checkpoint as upstream ships them (tokenizer.json and/or a
SentencePiece tokenizer.model, tokenizer_config.json, added_tokens.json, ...), so every runtime finds the kind it
reads, with two additions for ExecuTorch's C++ tokenizers (pocketllm's own reading is unchanged by them):

- tokenizer.json without a post-processor gets one that prepends BOS when the checkpoint adds it (`num_bos=1`);
- a SentencePiece tokenizer.model whose checkpoint has added tokens past the model's pieces (MiniCPM4:
  `<|im_end|>` 73440 .. 73447 after 73440 pieces) gets them appended as user-defined pieces at exactly their ids.
  ExecuTorch's runner samples over its tokenizer's vocabulary only and its SentencePiece tokenizer cannot decode an
  id past the model's pieces: without them the model could never end a turn with `<|im_end|>` (measured: the
  runner emits the best ordinary piece instead). As user-defined pieces they are also found in prompt text, as
  upstream's tokenizer class splits them out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pocketllm.export.errors import PocketllmError


def copy_tokenizer(files: list[Path], out_dir: Path, bos_id: int | None = None) -> list[str]:
    """Copy the tokenizer files. When tokenizer_config.json asks for a BOS token (`add_bos_token`, default true, as
    export/tokenizer.py reads it) and tokenizer.json has no post-processor, the bundle's tokenizer.json gets one
    that prepends it (TemplateProcessing "<bos> $A"): ExecuTorch's C++ tokenizer adds BOS only that way (runner
    `num_bos=1`). pocketllm itself encodes without special tokens and adds BOS from the config, so it is unaffected.
    A SentencePiece tokenizer.model gets the checkpoint's added tokens (module docstring)."""
    names = []
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
        names.append(f.name)
    if bos_id is not None and "tokenizer.json" in names:
        _add_bos_post_processor(out_dir, bos_id)
    if "tokenizer.model" in names:
        append_added_pieces(out_dir)
    return names


def append_added_pieces(out_dir: Path) -> int:
    """Append the added tokens past tokenizer.model's pieces (export/tokenizer.py `added_tokens`) as user-defined
    pieces at their ids; returns how many. Refused when those ids leave a gap (no piece can sit at an id past it)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    from pocketllm.export.tokenizer import added_tokens

    path = Path(out_dir) / "tokenizer.model"
    model = sp_pb.ModelProto()
    model.ParseFromString(path.read_bytes())
    n = len(model.pieces)
    extra = sorted((i, t) for t, i in added_tokens(Path(out_dir)).items() if i >= n)
    if not extra:
        return 0
    if [i for i, _ in extra] != list(range(n, n + len(extra))):
        raise PocketllmError(f"{path}: added tokens at ids {[i for i, _ in extra]} do not follow the model's {n} "
                             "pieces without a gap; ExecuTorch's SentencePiece tokenizer could not decode them")
    for _, text in extra:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, 0.0, sp_pb.ModelProto.SentencePiece.USER_DEFINED
    path.write_bytes(model.SerializeToString())
    return len(extra)


def _add_bos_post_processor(out_dir: Path, bos_id: int) -> bool:
    add_bos = True
    cfg = out_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            add_bos = bool(json.loads(cfg.read_text()).get("add_bos_token", True))
        except json.JSONDecodeError:
            return False
    path = out_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    if not add_bos or tok.get("post_processor") is not None:
        return False
    bos = next((t["content"] for t in tok.get("added_tokens", []) if t.get("id") == bos_id), None)
    if bos is None:
        return False
    special = {"SpecialToken": {"id": bos, "type_id": 0}}
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    path.write_text(json.dumps(tok, ensure_ascii=False))
    return True


def adds_bos(out_dir: Path) -> bool:
    """Whether prompts start with BOS for ExecuTorch's runner (`num_bos=1`): a tokenizer.json that prepends it
    itself (post-processor), or a SentencePiece tokenizer.model alone, which the runner asks for BOS when the
    checkpoint's tokenizer_config.json adds one (add_bos_token, default true)."""
    path = Path(out_dir) / "tokenizer.json"
    if path.is_file():
        return json.loads(path.read_text()).get("post_processor") is not None
    if not (Path(out_dir) / "tokenizer.model").is_file():
        return False
    cfg = Path(out_dir) / "tokenizer_config.json"
    try:
        return not cfg.is_file() or bool(json.loads(cfg.read_text()).get("add_bos_token", True))
    except json.JSONDecodeError:
        return True


def chat_template(out_dir: Path) -> str | None:
    cfg = Path(out_dir) / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("chat_template")
    except json.JSONDecodeError:
        return None
