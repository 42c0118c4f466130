"""Where results may go, checked before any weight is read or anything is written: pocketllm never writes over,
into or around its inputs, and `--force` replaces only what pocketllm itself wrote.

    check_out_dir(out, force=..., inputs={"--checkpoint": ckpt})   a directory result (bundle, checkpoint)
    check_out_file(out, "--json", inputs={"--text": text})          a file result (logits .npy, a JSON report)

Inputs: OUT must not be an input, contain one, or lie inside one (`export --checkpoint X --out X` would replace the
checkpoint with the bundle; `--out X/bundle` would write into it).

What pocketllm wrote, the only non-empty directories `--force` replaces:
- a bundle: OUT/manifest.json is a JSON object whose generator.name is "pocketllm", and every file below OUT is
  manifest.json, parity.json or a file the manifest lists (`files`, `reference.files`);
- a checkpoint: OUT validates as a checkpoint (export/checkpoint.py: config.json and the safetensors headers against
  the family's tensor table), every safetensors file carries pocketllm's mark in its metadata (CHECKPOINT_MARK,
  written by export/checkpoint_writer.py), and OUT holds only the checkpoint's files (config.json, the shards and
  their index, tokenizer files, quantization_report.json).
An empty directory is always usable. Anything else (a file, a folder of the user's, a checkpoint downloaded from the
Hub, a bundle with a file added by hand) is refused with one line, with or without --force.

A file result (`logits --out`, `perplexity --json`) replaces an existing regular file of that name, as `-o` does
everywhere, unless that file is an input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pocketllm.export.errors import PocketllmError
from pocketllm.export.paths import what_is


def _overlap(out: Path, inputs: dict[str, Path | None], option: str) -> None:
    o = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        i = Path(path).resolve()
        if o == i:
            raise PocketllmError(f"{option} {out} is the {name} input itself: pocketllm never writes over its inputs; "
                                 f"choose another {option}")
        if o in i.parents:
            raise PocketllmError(f"{option} {out} contains the {name} input {path}: replacing it would delete that "
                                 f"input; choose another {option}")
        if i in o.parents:
            raise PocketllmError(f"{option} {out} is inside the {name} input {path}: pocketllm never writes into its "
                                 f"inputs; choose a path outside it")


def _writable_parent(out: Path, option: str) -> None:
    """The nearest existing ancestor of `out` must be a directory we may create entries in."""
    parent = Path(out).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PocketllmError(f"{option} {out}: {parent} is {what_is(parent)}, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PocketllmError(f"{option} {out}: cannot write into {parent} (permission denied)")


def _files_below(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def _bundle_files(path: Path) -> set[str] | None:
    """The files of a bundle pocketllm wrote at `path`, or None when it is not one."""
    from pocketllm.export.bundle.manifest import GENERATOR, MANIFEST, PARITY_FILE

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("generator"), dict) or \
            manifest["generator"].get("name") != GENERATOR["name"]:
        return None
    reference = manifest.get("reference") if isinstance(manifest.get("reference"), dict) else {}
    return {MANIFEST, PARITY_FILE, *(manifest.get("files") or {}), *(reference.get("files") or {})}


def _checkpoint_files(path: Path) -> set[str] | None:
    """The files of a checkpoint pocketllm wrote at `path`, or None when it is not one."""
    from pocketllm.export.checkpoint import (CHECKPOINT_MARK, CONFIG, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES,
                                             open_checkpoint, read_safetensors_header)
    from pocketllm.export.quant.format import REPORT_FILE

    try:
        open_checkpoint(path)
        if (path / INDEX_FILE).is_file():
            shards = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
        else:
            shards = [SINGLE_FILE]
        for shard in shards:
            metadata = read_safetensors_header(path / shard).get("__metadata__") or {}
            if any(metadata.get(k) != v for k, v in CHECKPOINT_MARK.items()):
                return None
    except (PocketllmError, OSError, ValueError, KeyError, AttributeError):
        return None
    return {CONFIG, INDEX_FILE, *shards, *TOKENIZER_FILES, REPORT_FILE}


def pocketllm_wrote(path: Path) -> tuple[str | None, list[str]]:
    """("bundle" | "checkpoint" | None, the files below `path` that the bundle/checkpoint does not account for)."""
    path = Path(path)
    for kind, allowed in (("bundle", _bundle_files(path)), ("checkpoint", _checkpoint_files(path))):
        if allowed is not None:
            return kind, [f for f in _files_below(path) if f not in allowed]
    return None, []


def check_out_dir(out: Path, *, force: bool = False, inputs: dict[str, Path | None] | None = None,
                  option: str = "--out") -> None:
    """One line unless `out` may receive a directory result (see the module docstring)."""
    out = Path(out)
    _overlap(out, inputs or {}, option)
    kind = what_is(out)
    if kind == "missing":
        _writable_parent(out, option)
        return
    if kind != "a directory":
        raise PocketllmError(f"{option} {out} is {kind}, not a bundle or checkpoint pocketllm wrote: pocketllm "
                             f"replaces only those, even with --force; remove it yourself or choose another {option}")
    if not any(out.iterdir()):
        _writable_parent(out, option)
        return
    wrote, foreign = pocketllm_wrote(out)
    if wrote is None:
        raise PocketllmError(f"{out}: already exists and was not written by pocketllm (neither a bundle nor a "
                             f"checkpoint pocketllm wrote): --force replaces only those; choose another {option}")
    if foreign:
        more = f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else ""
        raise PocketllmError(f"{out}: a {wrote} pocketllm wrote, but it also holds {foreign[0]}{more} that pocketllm "
                             f"did not write, which --force would delete; move them or choose another {option}")
    if not force:
        raise PocketllmError(f"{out}: already exists and is not empty (a {wrote} pocketllm wrote: pass --force to "
                             "replace it)")
    _writable_parent(out, option)


def check_out_file(out: Path, option: str, inputs: dict[str, Path | None] | None = None) -> None:
    """One line unless `out` may receive a file result: not an input, not a directory, in a writable place."""
    out = Path(out)
    _overlap(out, inputs or {}, option)
    kind = what_is(out)
    if kind not in ("missing", "a file"):
        raise PocketllmError(f"{option} {out} is {kind}; give the path of a file to write")
    if kind == "a file" and not os.access(out, os.W_OK):
        raise PocketllmError(f"{option} {out}: the file exists and is not writable (permission denied)")
    _writable_parent(out, option)
