"""The export pipeline: checkpoint -> (quantize) -> model -> target(s) -> bundle. Plain functions; the CLI only
parses flags.

    request = ExportRequest(...)      every argument checked before any weight is read (`plan`)
    manifest = run_export(request)    one atomic bundle directory with every target's artifact

Quantization: `--quant any4|int4|int8` writes a quantized checkpoint (export/quant) straight into the bundle's
`reference/` folder; every target exports those weights and parity runs the numpy reference on them. `8da4w` is
torchao's in-graph scheme (ExecuTorch only); the reference then holds the floating-point weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pocketllm.export.atomic import atomic_directory
from pocketllm.export.defaults import DEFAULT_PREFILL_CHUNK, resolve_max_context
from pocketllm.export.errors import PocketllmError
from pocketllm.export.quant.format import SCHEMES

PROJECT_SCHEMES = SCHEMES  # written as quantized checkpoints by export/quant


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path
    out: Path
    targets: str = "executorch"  # comma-separated target names
    quant: str = "none"
    max_context: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    group_size: int | None = None
    calibration: Path | None = None
    force: bool = False
    experts: str | None = None  # MoE experts: inline | file | all (ExecuTorch); None: file with a cache, else inline
    expert_cache_mb: int | None = None  # the expert store's default budget (implies experts file)


@dataclass
class ExportPlan:
    """A validated request: the opened checkpoint, the targets and their options."""

    request: ExportRequest
    ckpt: Any  # export.checkpoint.Checkpoint
    max_context: int
    targets: list  # [(Target, options)]


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plan(request: ExportRequest) -> ExportPlan:
    """Check every argument against the targets and the checkpoint's config (no weight data is read)."""
    from pocketllm.export.checkpoint import open_checkpoint
    from pocketllm.export.targets import parse_targets

    targets = parse_targets(request.targets)
    if request.quant == "8da4w" and [t.name for t in targets] != ["executorch"]:
        raise PocketllmError("--quant 8da4w is ExecuTorch's in-graph scheme: use it with --target executorch alone")
    out = Path(request.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not request.force:
        raise PocketllmError(f"{out}: already exists and is not empty (pass --force to replace it)")
    if request.calibration is not None and not Path(request.calibration).is_file():
        raise PocketllmError(f"{request.calibration}: calibration text file not found")
    ckpt = open_checkpoint(request.checkpoint)
    have = ckpt.quantization.scheme if ckpt.quantization is not None else None
    if have is not None and request.quant not in ("none", have):
        raise PocketllmError(f"{ckpt.dir} is already quantized with {have}; export it with --quant {have} "
                             "(or quantize the floating-point checkpoint)")
    max_context = resolve_max_context(ckpt.spec, request.max_context)
    quant = have or request.quant
    moe_options = {}  # target options only MoE exports set (a target without them refuses them)
    experts = request.experts or ("file" if request.expert_cache_mb is not None else None)
    if experts is not None or request.expert_cache_mb is not None:
        if not any(layer.mlp == "moe" for layer in ckpt.spec.layers):
            flag = "--expert-cache-mb" if request.experts is None else f"--experts {request.experts}"
            raise PocketllmError(f"{flag}: {ckpt.dir.name} has no mixture-of-experts layers")
        moe_options = {"experts": experts or "inline", "expert_cache_mb": request.expert_cache_mb}
    chosen = []
    for target in targets:
        options = target.options(max_context=max_context, quant=quant, prefill_chunk=request.prefill_chunk,
                                 group_size=request.group_size, **moe_options)
        target.check_sdk()
        chosen.append((target, options))
    return ExportPlan(request=request, ckpt=ckpt, max_context=max_context, targets=chosen)


def quant_summary(ckpt) -> dict:
    q = ckpt.quantization
    if q is None:
        return {"scheme": "none", "bits_per_weight": 32}
    return {"scheme": q.scheme, "group_size": q.group_size, "bits_per_weight": round(q.bits_per_weight(), 4),
            "modules": len(q.modules), "calibration": q.calibration,
            "lm_head": "fp32" if not any(m == "lm_head" for m in q.modules) else q.scheme}


@contextlib.contextmanager
def no_stages(name: str):
    yield


def run_export(request: ExportRequest, stage: Callable[[str], Any] = no_stages) -> dict:
    """Write the bundle `request.out` atomically; returns its manifest. stage(name) is a context-manager factory
    for progress display ("quantize", "load", "export", "lower", ...)."""
    from pocketllm.export.bundle.chat import chat_for_manifest
    from pocketllm.export.bundle.manifest import write_manifest
    from pocketllm.export.bundle.reference import REFERENCE_DIR, copy_reference
    from pocketllm.export.bundle.tokenizer import copy_tokenizer
    from pocketllm.export.checkpoint import open_checkpoint
    from pocketllm.export.nn.load import load_model

    p = plan(request)
    ckpt, spec, out = p.ckpt, p.ckpt.spec, Path(request.out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with atomic_directory(out, force=request.force) as tmp:
        reference = tmp / REFERENCE_DIR
        if ckpt.quantization is None and request.quant in PROJECT_SCHEMES:
            from pocketllm.export.quant.quantize import quantize_checkpoint

            t0 = time.perf_counter()
            with stage("quantize"):
                text = Path(request.calibration).read_text(encoding="utf-8") if request.calibration else None
                quantize_checkpoint(ckpt, reference, request.quant, group_size=request.group_size, calibration=text)
            timings["quantize_s"] = time.perf_counter() - t0
        else:
            copy_reference(ckpt, reference)
        weights = open_checkpoint(reference)  # the weights every target exports and parity checks
        quant = quant_summary(weights)
        entries = {}
        for target, options in p.targets:
            with stage("load"):
                model, _ = load_model(weights, max_context=p.max_context, dtype="fp32")
            entry = target.export(model, spec, options, tmp, stage)
            del model
            timings.update({f"{target.name}.{k}": v for k, v in entry.pop("timings", {}).items()})
            if options.quant == "8da4w":
                quant = entry["quantization"]
            entries[target.name] = entry
        tok_files = copy_tokenizer(ckpt.tokenizer_files, tmp, spec.bos_token_id)
        config_sha = hashlib.sha256((ckpt.dir / "config.json").read_bytes()).hexdigest()
        timings["total_s"] = time.perf_counter() - t_start
        manifest = write_manifest(
            tmp, name=out.name, spec=spec, max_context=p.max_context, tokenizer_files=tok_files, quant=quant,
            targets=entries, chat=chat_for_manifest(tmp, spec.eos_token_ids)[1],
            source={"checkpoint": Path(request.checkpoint).resolve().name, "weight_dtype": ckpt.weight_dtype,
                    "config_sha256": config_sha,
                    "calibration": Path(request.calibration).name if request.calibration else None},
            extra={"export": {"timings": {k: round(v, 2) for k, v in timings.items()},
                              "peak_rss_mib": peak_rss_mib()}})
    return manifest


