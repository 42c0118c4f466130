"""Backends, one module each, imported lazily so that `--help` works without any SDK installed.

Each module exposes `export_<target>(model, spec, options, out_dir, progress)` and returns the manifest's
`targets.<target>` entry (file name, methods, inputs/outputs, kernels needed).
"""

from __future__ import annotations

import importlib

from pocketllm.export.errors import PocketllmError

TARGETS = {"executorch": "pocketllm.export.targets.executorch"}


def target_module(name: str):
    if name not in TARGETS:
        raise PocketllmError(f"unknown --target {name!r} (supported: {', '.join(sorted(TARGETS))})")
    return importlib.import_module(TARGETS[name])
