"""Core ML target: a stateful iOS 18 ML Program (`model.mlpackage`) with a prefill and a decode function.

The target object is importable without coremltools (`--help`, option validation); coremltools is imported only
when lowering (lower.py, ops.py). Pieces: options.py (defaults, validation), swaps.py (module swaps), ops.py (one
converter per pocketllm op), lower.py (torch.export -> ct.convert -> multifunction save, manifest entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from export.targets.coreml.options import CoreMLOptions

NAME = "coreml"
ARTIFACT = "model.mlpackage"


class CoreMLTarget:
    name = NAME
    artifact = ARTIFACT
    Options = CoreMLOptions

    @staticmethod
    def export(model, spec, options: CoreMLOptions, out_dir: Path, stage: Callable[[str], Any] | None = None,
               quant_info: dict | None = None) -> dict:
        from export.targets.coreml.lower import export_coreml

        return export_coreml(model, spec, options, out_dir, stage=stage, quant_info=quant_info)

    @staticmethod
    def lowering() -> dict[str, str]:
        """pocketllm op -> how Core ML runs it (needs coremltools: the converters register on import)."""
        from export.targets.coreml.ops import LOWERING

        return dict(LOWERING)


TARGET = CoreMLTarget()
export = TARGET.export

__all__ = ["CoreMLOptions", "CoreMLTarget", "TARGET", "export"]
