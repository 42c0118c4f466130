"""The reference weights inside a bundle (`BUNDLE/reference/`): the checkpoint the artifacts were made from (the
floating-point one, or the quantized one export/quant wrote), in the upstream layout, so that `pocketllm parity`
runs the numpy reference on exactly the artifacts' weights wherever the bundle is copied. Apps never read it and
`pocketllm push` skips it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pocketllm.export.checkpoint import CONFIG, INDEX_FILE, SINGLE_FILE, Checkpoint

REFERENCE_DIR = "reference"


def copy_reference(ckpt: Checkpoint, out: Path) -> Path:
    """Copy config.json, the safetensors shards and the index of `ckpt` into `out` (created)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = ckpt.dir / INDEX_FILE
    if index.is_file():  # every shard the index names (derived buffers may sit in shards of their own)
        names = [INDEX_FILE, *sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        names = [SINGLE_FILE]
    for name in [CONFIG, *names]:
        shutil.copyfile(ckpt.dir / name, out / name)
    return out
