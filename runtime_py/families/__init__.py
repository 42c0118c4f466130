"""The reference model of each family, one module per family, named like the family (export/families/<name>/).
Each module exposes `Model` with `from_weights(spec, weights, max_context)`; runtime_py/model.py picks it by
`spec.family`. Modules are discovered, not listed."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache


@cache
def reference_families() -> dict[str, str]:
    """family name -> module path of its reference model."""
    return {info.name: f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__) if not info.ispkg}


def model_class(family: str):
    module = reference_families().get(family)
    if module is None:
        from pocketllm.runtime_py.errors import PocketllmError

        raise PocketllmError(f"reference model: no numpy model for family {family!r} "
                             f"(have: {', '.join(reference_families())})")
    return importlib.import_module(module).Model
