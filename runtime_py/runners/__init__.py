"""Runners: run a bundle's artifact with its own runtime, one module (or package) per target (`runners/<target>`,
exposing `TARGET` and `Runner`). Every runner has the engine protocol of the reference model:

    forward(tokens int64 [T], start_pos) -> logits float32 [T, vocab];  reset()

so that generation (runtime_py/generate.py) and parity (runtime_py/parity.py) treat them alike. Modules are
discovered, not listed; which one runs a bundle is read from its manifest's `targets`.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from pocketllm.export.errors import PocketllmError


@cache
def runner_modules() -> dict[str, str]:
    """target name -> module path, for every runner module in this folder (imported lazily: SDKs load on use)."""
    return {info.name: f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__)}


def open_runner(bundle: str | Path, target: str | None = None, threads: int | None = None, verify: bool = True):
    """The runner of `bundle`'s artifact for `target` (default: the manifest's only target, or its first)."""
    from pocketllm.export.bundle.manifest import read_manifest

    manifest = read_manifest(bundle, verify=verify)
    have = list(manifest.get("targets", {}))
    if target is None:
        if not have:
            raise PocketllmError(f"{bundle}: the manifest lists no target")
        target = have[0]
    if target not in have:
        raise PocketllmError(f"{bundle}: the bundle has no {target} artifact (it has: {', '.join(have) or 'none'})")
    module = runner_modules().get(target)
    if module is None:
        raise PocketllmError(f"no runner for target {target!r} (runners: {', '.join(runner_modules())})")
    return importlib.import_module(module).Runner(bundle, threads=threads, manifest=manifest)
