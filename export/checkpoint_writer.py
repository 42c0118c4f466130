"""Write checkpoints in the exact upstream layout: safetensors shards (+ `model.safetensors.index.json`) and
config.json. Used by init-checkpoint (random weights), the quantizer and the tiny-austen training script; callers
write into an `atomic_directory` so a failure leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from pocketllm.export.checkpoint import CHECKPOINT_MARK, CONFIG, INDEX_FILE, SINGLE_FILE

DEFAULT_SHARD_BYTES = 2 * 1024**3


def write_config(out: Path, config: dict) -> None:
    (Path(out) / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _sort_metadata(path: Path) -> None:
    """Put the header's `__metadata__` keys in sorted order, in place: safetensors serialises metadata from a hash
    map, so two writes of the same tensors would differ in bytes (and checksums) by the order of its keys."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        if len(new) <= size:  # the same keys and values: the same length unless escaping differs (then leave it)
            f.seek(8)
            f.write(new + b" " * (size - len(new)))


def write_weights(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = DEFAULT_SHARD_BYTES,
                  total_bytes: int | None = None, progress=None) -> None:
    """Save tensors as model.safetensors, or as numbered shards + index when they exceed `shard_bytes`; every
    shard's metadata carries CHECKPOINT_MARK (what `--force` recognises as a checkpoint pocketllm wrote)."""
    from safetensors.torch import save_file

    single = total_bytes is not None and total_bytes <= shard_bytes
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    tmp_names: list[str] = []

    def flush():
        nonlocal pending, pending_bytes
        if not pending:
            return
        name = f"shard-{len(tmp_names):05d}.tmp"
        save_file(pending, str(out / name), metadata={"format": "pt", **CHECKPOINT_MARK})
        _sort_metadata(out / name)
        tmp_names.append(name)
        shards.append(list(pending))
        pending, pending_bytes = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if pending and pending_bytes + nbytes > shard_bytes and not single:
            flush()
        pending[name] = t.contiguous()
        pending_bytes += nbytes
        if progress is not None:
            progress(nbytes)
    flush()

    if len(tmp_names) == 1:
        os.replace(out / tmp_names[0], out / SINGLE_FILE)
        return
    n = len(tmp_names)
    total = 0
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({name: final for name in names})
        total += (out / final).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
