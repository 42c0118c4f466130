"""Read Hugging Face style checkpoint directories: config.json, safetensors shards, tokenizer files.

`open_checkpoint(dir)` validates everything that can be checked without reading weight data (config keys, index,
shards, tensor names and shapes from the safetensors headers) and fails with one `PocketllmError` line naming the
file, key or tensor. Weight data is read lazily, shard by shard, through safetensors' memory map; non-finite values
are caught as each tensor is read.

The expected tensor names are each family's table (`export/families/<name>/`): mapping to our torch modules is the
identity, because `export/nn` mirrors upstream module names. Buffers some upstream models save although they are pure
functions of the config (MiniMax's lightning decay tables) are `derived_tensors`: shape-checked when present, never
required, never loaded (every engine recomputes them from the spec).
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pocketllm.export.errors import PocketllmError
from pocketllm.export.families import get_family, spec_from_config
from pocketllm.export.paths import require_dir
from pocketllm.export.spec import ModelSpec

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "added_tokens.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt")
# Safetensors metadata pocketllm's writer (export/checkpoint_writer.py) adds to every shard beside {"format": "pt"}:
# how `--force` recognises a checkpoint pocketllm wrote (export/outputs.py). Loaders ignore extra metadata.
CHECKPOINT_MARK = {"generator": "pocketllm"}
# Tensors some exporters save that carry no weights of their own.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ------------------------------------------------------------------------------------------ expected tensors
def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape, in upstream naming (the family's table)."""
    return get_family(spec.family).expected_tensors(spec)


def derived_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Buffers upstream saves that are functions of the config alone: allowed (shape-checked), never loaded."""
    return get_family(spec.family).derived_tensors(spec)


def optional_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Tensors that may be present without being required (tied checkpoints sometimes save lm_head anyway)."""
    t = {"lm_head.weight": (spec.vocab_size, spec.hidden_size)} if spec.tie_word_embeddings else {}
    t.update(derived_tensors(spec))
    return t


# ------------------------------------------------------------------------------------------------ checkpoint
@dataclass
class Checkpoint:
    dir: Path
    config: dict
    spec: ModelSpec
    weight_map: dict[str, str]  # tensor name -> shard file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype strings: "BF16", "F32", ...
    quantization: "QuantConfig | None" = None  # noqa: F821  (export/quant/format.py; None = not quantized)

    @property
    def shard_files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.dir / f for f in TOKENIZER_FILES if (self.dir / f).is_file()]

    @property
    def weight_dtype(self) -> str:
        """The dtype most weight bytes are stored in ("BF16", "F32", "F16")."""
        counts: dict[str, int] = defaultdict(int)
        for name, dt in self.dtypes.items():
            if self.quantization is not None and self.quantization.is_packed(name):  # codes, scales: not compute
                continue
            n = 1
            for s in self.shapes[name]:
                n *= s
            counts[dt] += n
        return max(counts, key=counts.get) if counts else "F32"

    def iter_tensors(self, names=None, dtype=None, check_finite: bool = True) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield (name, torch tensor) shard by shard; each shard's memory map is closed before the next opens."""
        import torch
        from safetensors import safe_open, SafetensorError

        wanted = set(self.weight_map) if names is None else set(names)
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in wanted:
            by_shard[self.weight_map[name]].append(name)
        for shard in sorted(by_shard):
            path = self.dir / shard
            try:
                with safe_open(path, framework="pt") as f:
                    for name in sorted(by_shard[shard]):
                        t = f.get_tensor(name)
                        if dtype is not None and t.dtype != dtype and not (
                                self.quantization is not None and self.quantization.is_packed(name)):
                            t = t.to(dtype)
                        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            bad = int((~torch.isfinite(t)).sum())
                            raise PocketllmError(f"{path}: tensor '{name}' has {bad} non-finite values (NaN or inf)")
                        yield name, t
            except SafetensorError as e:
                raise PocketllmError(f"{path}: corrupt safetensors file ({e})") from None


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise PocketllmError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PocketllmError(f"{path}: expected a JSON object at the top level")
    return data


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size (catches truncation cheaply)."""
    if not path.is_file():
        raise PocketllmError(f"{path}: shard not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PocketllmError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise PocketllmError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise PocketllmError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise PocketllmError(f"{path}: corrupt safetensors file (header is not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise PocketllmError(f"{path}: corrupt safetensors file (bad entry for '{name}')") from None
    if 8 + n + end > size:
        raise PocketllmError(f"{path}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")
    return header


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory and return its spec and lazy tensor index. No weight data is read."""
    d = require_dir(Path(path), "checkpoint directory")
    config = _read_json(d / CONFIG, "config.json")
    spec = spec_from_config(config, str(d / CONFIG))

    index_path = d / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, INDEX_FILE)
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise PocketllmError(f"{index_path}: key 'weight_map' must map tensor names to shard file names")
        weight_map = dict(wm)
    elif (d / SINGLE_FILE).is_file():
        weight_map = None
    else:
        raise PocketllmError(f"{d}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    shard_names = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
    found: dict[str, str] = {}
    for shard in shard_names:
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise PocketllmError(f"{index_path}: shard name {shard!r} must be a plain file name in the checkpoint")
        header = read_safetensors_header(d / shard)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            found[name] = shard
            shapes[name] = tuple(int(s) for s in info.get("shape", []))
            dtypes[name] = str(info.get("dtype"))
    if weight_map is None:
        weight_map = found
    else:
        for name, shard in weight_map.items():
            if found.get(name) != shard:
                raise PocketllmError(f"{d / shard}: tensor '{name}' listed in {INDEX_FILE} is not in this shard")

    expected = expected_tensors(spec)
    optional = optional_tensors(spec)
    # -- quantization hook: packed tensors replace quantized weights (export/quant/format.py, docs/quantization.md)
    quantization, packed_dtypes = None, {}
    if "quantization_config" in config:
        from pocketllm.export.quant.format import parse_quantization

        quantization = parse_quantization(config["quantization_config"], expected, str(d / CONFIG))
        expected, packed_dtypes = quantization.expected(expected), quantization.packed_dtypes
    # -- end quantization hook
    for name, shape in expected.items():
        if name not in weight_map:
            raise PocketllmError(f"{d}: missing tensor '{name}' (expected shape {list(shape)})")
    for name in weight_map:
        if name.endswith(IGNORED_SUFFIXES):
            continue
        shape = expected.get(name, optional.get(name))
        if shape is None:
            raise PocketllmError(f"{d / weight_map[name]}: unexpected tensor '{name}' for a {spec.family} checkpoint")
        if shapes[name] != shape:
            raise PocketllmError(f"{d / weight_map[name]}: tensor '{name}' has shape {list(shapes[name])}, "
                                 f"expected {list(shape)}")
        if name in packed_dtypes:
            if dtypes[name] != packed_dtypes[name]:
                raise PocketllmError(f"{d / weight_map[name]}: tensor '{name}' has dtype {dtypes[name]}, "
                                     f"expected {packed_dtypes[name]} (quantized checkpoint)")
        elif dtypes[name] not in ("F32", "F16", "BF16"):
            raise PocketllmError(f"{d / weight_map[name]}: tensor '{name}' has dtype {dtypes[name]}, "
                                 "expected F32, F16 or BF16")
    derived = derived_tensors(spec)
    weight_map = {k: v for k, v in weight_map.items() if not k.endswith(IGNORED_SUFFIXES) and k not in derived}
    return Checkpoint(dir=d, config=config, spec=spec, weight_map=weight_map, shapes=shapes, dtypes=dtypes,
                      quantization=quantization)
