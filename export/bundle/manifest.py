"""manifest.json: what a bundle holds and what a runtime needs to run it (contract: shared/docs/DESIGN.md, JSON
Schema: export/bundle/manifest.schema.json).

`write_manifest` records every file under the bundle with its sha256 and size (relative POSIX paths; the runtime
files under `files`, the reference weights under `reference.files`), the spec values a runtime needs, the tokenizer
and its special ids, the quantization, the attention kinds, and per target the artifact's methods and I/O.
`read_manifest` is what runners call first: it refuses an unknown `schema_version` and (with `verify=True`) any file
whose size or sha256 differs from the manifest, with one `PocketllmError` line each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pocketllm.export import version
from pocketllm.export.atomic import write_json
from pocketllm.export.bundle.reference import REFERENCE_DIR
from pocketllm.export.bundle.schema import SCHEMA_VERSION, validate_manifest
from pocketllm.export.bundle.tokenizer import adds_bos, chat_template
from pocketllm.export.errors import PocketllmError
from pocketllm.export.paths import require_dir
from pocketllm.export.spec import ModelSpec

MANIFEST = "manifest.json"
PARITY_FILE = "parity.json"
GENERATOR = {"name": "pocketllm", "version": version()}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _bundle_files(out_dir: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(runtime files, reference files): every regular file below out_dir by relative POSIX path, except the
    manifest, parity reports and hidden files."""
    runtime, reference = {}, {}
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if not p.is_file() or rel in (MANIFEST, PARITY_FILE) or any(s.startswith(".") for s in rel.split("/")):
            continue
        (reference if rel.startswith(REFERENCE_DIR + "/") else runtime)[rel] = file_entry(p)
    return runtime, reference


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


def write_manifest(out_dir: Path, *, name: str, spec: ModelSpec, source: dict[str, Any], max_context: int,
                   tokenizer_files: list[str], quant: dict[str, Any], targets: dict[str, dict[str, Any]],
                   chat: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `out_dir/manifest.json` describing the files already in `out_dir`. Returns the manifest."""
    out_dir = Path(out_dir)
    files, reference = _bundle_files(out_dir)
    for target in targets.values():
        if target["file"] in files:  # a single-file artifact carries its own sha256 and size
            target.update(files[target["file"]])
        elif not any(f.startswith(target["file"] + "/") for f in files):
            raise PocketllmError(f"{out_dir}: target file {target['file']} was not written")
    tok_kind = "huggingface" if "tokenizer.json" in tokenizer_files else "sentencepiece"
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": GENERATOR,
        "name": name,
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
            "kind": tok_kind,
            "file": "tokenizer.json" if tok_kind == "huggingface" else "tokenizer.model",
            "bos_id": spec.bos_token_id,
            "eos_ids": list(spec.eos_token_ids),
            # ExecuTorch's runner: GenerationConfig(num_bos=...) so that the prompt starts like pocketllm's
            "num_bos": 1 if spec.bos_token_id is not None and adds_bos(out_dir) else 0,
            "chat_template": chat_template(out_dir),
        },
        "chat": chat,
        "quantization": quant,
        "attention": attention_summary(spec),
        "targets": targets,
        "files": files,
        "reference": {"dir": REFERENCE_DIR, "files": reference} if reference else None,
        "spec": spec.to_dict(),
    }
    if extra:
        manifest.update(extra)
    validate_manifest(manifest, str(out_dir / MANIFEST))  # the contract apps rely on, checked before it is written
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def _verify(bundle: Path, entries: dict[str, dict]) -> None:
    for name, entry in entries.items():
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


def read_manifest(bundle: str | Path, verify: bool = True, verify_reference: bool = False) -> dict[str, Any]:
    """Load and check `bundle/manifest.json`. verify: recompute every runtime file's size and sha256;
    verify_reference: the reference weights' too (parity)."""
    bundle = Path(bundle)
    path = bundle / MANIFEST
    require_dir(bundle, "bundle directory")
    if not path.is_file():
        raise PocketllmError(f"{path}: manifest not found (is {bundle} a bundle written by `pocketllm export`?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise PocketllmError(f"{path}: unknown schema_version {version!r} (this pocketllm reads {SCHEMA_VERSION}); "
                             "re-export the bundle")
    if verify:
        _verify(bundle, manifest.get("files", {}))
    if verify_reference and manifest.get("reference"):
        _verify(bundle, manifest["reference"]["files"])
    return manifest


def add_parity(bundle: Path, target: str, summary: dict[str, Any]) -> None:
    """Record a target's parity summary in the manifest (parity.json itself is not hashed: a report, not an input)."""
    path = Path(bundle) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("parity", {})[target] = summary
    write_json(path, manifest)
