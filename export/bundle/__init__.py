"""The artifact bundle: `BUNDLE/` = artifacts + tokenizer files + `manifest.json` (contract: DESIGN.md).

`write_manifest` records every file with its sha256 and size, the spec values a runtime needs, the tokenizer and its
special ids, the quantization, the attention kinds, and per target the artifact's methods and I/O. `read_manifest`
is what runners call first: it refuses an unknown `schema_version` and (with `verify=True`) any file whose size or
sha256 differs from the manifest, with one `PocketllmError` line each.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from export.errors import PocketllmError
from export.spec import ModelSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PARITY_FILE = "parity.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def copy_tokenizer(files: list[Path], out_dir: Path, bos_id: int | None = None) -> list[str]:
    """Copy the tokenizer files. When tokenizer_config.json asks for a BOS token (`add_bos_token`, default true, as
    export/tokenizer.py reads it) and tokenizer.json has no post-processor, the bundle's tokenizer.json gets one
    that prepends it (TemplateProcessing "<bos> $A"): ExecuTorch's C++ tokenizer adds BOS only that way (runner
    `num_bos=1`). pocketllm itself encodes without special tokens and adds BOS from the config, so it is unaffected."""
    names = []
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
        names.append(f.name)
    if bos_id is not None and "tokenizer.json" in names:
        _add_bos_post_processor(out_dir, bos_id)
    return names


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


def attention_summary(spec: ModelSpec) -> dict[str, Any]:
    kinds = [layer.attention for layer in spec.layers]
    summary: dict[str, Any] = {"per_layer": kinds, "rope_per_layer": [layer.use_rope for layer in spec.layers],
                               "sliding_window_per_layer": [layer.sliding_window for layer in spec.layers]}
    if spec.sparse is not None and "infllm" in kinds:
        summary["infllm_v2"] = dict(vars(spec.sparse))
    if spec.lightning is not None and "lightning" in kinds:
        summary["lightning"] = {"layers": [i for i, k in enumerate(kinds) if k == "lightning"],
                                **dict(vars(spec.lightning))}
    return summary


def write_manifest(out_dir: Path, *, spec: ModelSpec, source: dict[str, Any], max_context: int,
                   tokenizer_files: list[str], quant: dict[str, Any], targets: dict[str, dict[str, Any]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `out_dir/manifest.json` describing the files already in `out_dir`. Returns the manifest."""
    out_dir = Path(out_dir)
    files = {p.name: file_entry(p) for p in sorted(out_dir.iterdir())
             if p.is_file() and p.name not in (MANIFEST, PARITY_FILE) and not p.name.startswith(".")}
    for target in targets.values():
        name = target["file"]
        if name not in files:
            raise PocketllmError(f"{out_dir}: target file {name} was not written")
        target.update(files[name])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "architecture": spec.family,
        "model_type": spec.model_type,
        "source": source,
        "model": {
            "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size, "num_layers": spec.num_layers,
            "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "max_context": max_context, "max_position_embeddings": spec.max_position_embeddings,
            "prefill_chunk": min(t.get("prefill_chunk", max_context) for t in targets.values()),
        },
        "tokenizer": {
            "files": tokenizer_files,
            "bos_id": spec.bos_token_id,
            "eos_ids": list(spec.eos_token_ids),
            # ExecuTorch's runner: GenerationConfig(num_bos=...) so that the prompt starts like pocketllm's
            "num_bos": 1 if spec.bos_token_id is not None and _adds_bos(out_dir) else 0,
        },
        "quantization": quant,
        "attention": attention_summary(spec),
        "targets": targets,
        "files": files,
        "spec": spec.to_dict(),
    }
    if extra:
        manifest.update(extra)
    chat = _chat_template(out_dir)
    if chat:
        manifest["tokenizer"]["chat_template"] = chat
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _adds_bos(out_dir: Path) -> bool:
    path = out_dir / "tokenizer.json"
    return path.is_file() and json.loads(path.read_text()).get("post_processor") is not None


def _chat_template(out_dir: Path) -> str | None:
    cfg = out_dir / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("chat_template")
    except json.JSONDecodeError:
        return None


def write_json(path: Path, data: Any) -> None:
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(bundle: str | Path, verify: bool = True) -> dict[str, Any]:
    """Load and check `bundle/manifest.json`. verify: recompute every listed file's size and sha256."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise PocketllmError(f"{bundle}: bundle directory not found")
    if not path.is_file():
        raise PocketllmError(f"{path}: manifest not found (is {bundle} a bundle written by `pocketllm export`?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise PocketllmError(f"{path}: unknown schema_version {version!r} (this pocketllm reads {SCHEMA_VERSION}); "
                             "re-export the bundle")
    if verify:
        for name, entry in manifest.get("files", {}).items():
            f = bundle / name
            if not f.is_file():
                raise PocketllmError(f"{f}: listed in manifest.json but missing")
            if f.stat().st_size != entry["size"]:
                raise PocketllmError(f"{f}: size {f.stat().st_size} does not match manifest.json ({entry['size']}); "
                                     "the bundle is corrupt or was modified, re-export it")
            digest = sha256_file(f)
            if digest != entry["sha256"]:
                raise PocketllmError(f"{f}: sha256 {digest[:12]}... does not match manifest.json "
                                     f"({entry['sha256'][:12]}...); the bundle is corrupt or was modified, re-export it")
    return manifest


def add_parity(bundle: Path, summary: dict[str, Any]) -> None:
    """Record a parity summary in the manifest (parity.json itself is not hashed: it is a report, not an input)."""
    path = Path(bundle) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["parity"] = summary
    write_json(path, manifest)


class BundleSource:
    """A bundle seen by the run commands (`--engine executorch --bundle DIR`) where they expect a checkpoint:
    `.dir` holds the tokenizer, `.spec` the few spec values they read (from the verified manifest)."""

    def __init__(self, bundle: Path, manifest: dict[str, Any], threads: int | None = None):
        from types import SimpleNamespace

        self.dir, self.manifest, self.threads = Path(bundle), manifest, threads
        model, tok = manifest["model"], manifest["tokenizer"]
        self.spec = SimpleNamespace(vocab_size=model["vocab_size"], max_position_embeddings=model["max_context"],
                                    bos_token_id=tok["bos_id"], eos_token_ids=tuple(tok["eos_ids"]),
                                    family=manifest["architecture"])

    @classmethod
    def open(cls, bundle: str | Path, threads: int | None = None) -> "BundleSource":
        return cls(Path(bundle), read_manifest(bundle, verify=True), threads)
