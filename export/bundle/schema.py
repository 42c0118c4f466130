"""manifest.json against its JSON Schema (`manifest.schema.json`, draft 2020-12) plus the rules a schema cannot state.

`validate_manifest(manifest)` raises one PocketllmError line naming the key path, the value and what was expected.
The same rules are mirrored by android_demo/core (ManifestParser.kt); tests feed both the same broken manifests
(the expert store's rules, newer than the app, are checked here only: tests/bundle/test_schema.py).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

from pocketllm.export.errors import PocketllmError

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
SCHEMA_VERSION = 2

# Strings that are absolute paths or home-relative ones: a bundle must not name the machine it was made on.
ABSOLUTE_PATH = re.compile(r"^(/|~/|[A-Za-z]:[\\/]|\\\\)")
FREE_TEXT = {("tokenizer", "chat_template"), ("chat",), ("parity",)}  # prose and templates, not paths


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def relpath_pattern() -> re.Pattern[str]:
    """The schema's pattern for paths inside a bundle (shared with `pocketllm push`)."""
    return re.compile(load_schema()["$defs"]["relpath"]["pattern"])


def _where(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _schema_error(error) -> str:
    """One line for a jsonschema ValidationError: where, what was found, what was expected."""
    where = _where(error.absolute_path)
    v = error.validator
    if v == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return f"{where}: missing key {missing[0]!r}"
    if v == "additionalProperties" and error.validator_value is False:
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(error.schema.get('properties', {}))})"
    if v == "const":
        return f"{where}: expected {_short(error.validator_value)}, got {_short(error.instance)}"
    if v == "enum":
        return f"{where}: expected one of {', '.join(map(str, error.validator_value))}, got {_short(error.instance)}"
    if v == "pattern":
        return f"{where}: {_short(error.instance)} does not match {error.validator_value}"
    if v == "type":
        return f"{where}: expected {error.validator_value}, got {_short(error.instance)}"
    if v == "oneOf":
        return f"{where}: expected {' or '.join(_branch_types(error.validator_value))}, got {_short(error.instance)}"
    if v == "contains" and "const" in error.validator_value:
        return f"{where}: does not contain {_short(error.validator_value['const'])}"
    return f"{where}: {error.message}"


def _branch_types(branches: list[dict[str, Any]]) -> list[str]:
    defs = load_schema()["$defs"]
    types = []
    for b in branches:
        b = defs[b["$ref"].rsplit("/", 1)[1]] if "$ref" in b else b
        types.append(str(b.get("type", "value")))
    return types


def _strings(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str]]:
    if any(path[:len(p)] == p for p in FREE_TEXT):
        return
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield path + (k,), k  # keys too: files are keyed by path
            yield from _strings(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, path + (i,))


def semantic_errors(m: dict[str, Any]) -> Iterator[str]:
    """Rules across keys (run after the schema passed)."""
    files = m["files"]
    tok = m["tokenizer"]
    if tok["file"] not in tok["files"]:
        yield f"tokenizer.file: {tok['file']!r} is not one of tokenizer.files ({', '.join(tok['files'])})"
    for name in tok["files"]:
        if name not in files:
            yield f"tokenizer.files: {name!r} is not listed in files"
    for target, entry in m["targets"].items():  # a file, or a directory (.mlpackage) with files listed under it
        if entry["file"] not in files and not any(f.startswith(entry["file"] + "/") for f in files):
            yield f"targets.{target}.file: {entry['file']!r} is not listed in files"
        store = entry.get("expert_store")
        if store is not None:
            if store["file"] not in files:
                yield f"targets.{target}.expert_store.file: {store['file']!r} is not listed in files"
            elif files[store["file"]]["size"] != store["bytes"]:
                yield (f"targets.{target}.expert_store.bytes: {store['bytes']} is not the size of "
                       f"{store['file']} in files ({files[store['file']]['size']})")
    if m["chat"] is not None:
        extra = [i for i in m["chat"]["stop_ids"] if i not in tok["eos_ids"]]
        if extra:
            yield f"chat.stop_ids: {extra[0]} is not one of tokenizer.eos_ids {tok['eos_ids']}"
    ref = m["reference"]
    for name in ref["files"]:
        if not name.startswith(ref["dir"] + "/"):
            yield f"reference.files: {name!r} is not inside reference.dir {ref['dir']!r}"
    n = m["model"]["num_layers"]
    for key in ("per_layer", "rope_per_layer", "sliding_window_per_layer"):
        if len(m["attention"][key]) != n:
            yield f"attention.{key}: {len(m['attention'][key])} entries for model.num_layers {n}"
    for path, text in _strings(m):
        if ABSOLUTE_PATH.match(text):
            yield f"{_where(path)}: {_short(text)} is an absolute path (bundles are relocatable: names, not paths)"


def validate_manifest(manifest: Any, where: str = "manifest.json") -> None:
    """Raise a PocketllmError (one line: `where: key.path: problem`) unless `manifest` is a valid schema-2
    manifest. The first problem is reported, in document order."""
    if not isinstance(manifest, dict):
        raise PocketllmError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PocketllmError(f"{where}: unknown schema_version {version!r} (this pocketllm reads {SCHEMA_VERSION}); "
                             "re-export the bundle")
    from jsonschema.exceptions import best_match

    error = best_match(_validator().iter_errors(manifest))
    if error is not None:
        raise PocketllmError(f"{where}: {_schema_error(error)}")
    for problem in semantic_errors(manifest):
        raise PocketllmError(f"{where}: {problem}")
