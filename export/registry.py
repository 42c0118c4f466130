"""Discovery for the registries (families, targets): every subpackage of a package that exposes a record under one
attribute name, keyed by the record's `name`. Adding a family or a target means adding its folder, nothing else."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def discover(package: str, path, attribute: str) -> dict[str, Any]:
    """name -> record for every subpackage of `package` (its `__path__` is `path`), in folder-name order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        if info.ispkg:
            record = getattr(importlib.import_module(f"{package}.{info.name}"), attribute)
            found[record.name] = record
    return found
