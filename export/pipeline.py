"""The export pipeline: checkpoint -> (quantize) -> model -> target(s) -> bundle. Plain functions; the CLI only
parses flags.

    request = ExportRequest(...)      every argument checked before any weight is read (`plan`)
    manifest = run_export(request)    one atomic bundle directory with every target's artifact

Quantization: `--quant any4|int4|nf4|int8` writes a quantized checkpoint (export/quant) straight into the bundle's
`reference/` folder; every target exports those weights and parity runs the numpy reference on them. The LM head
(and the embedding table) follow `lm_head` / `embedding` (default: 8 bits per channel; a tied head is the embedding
table, stored once). `any4-w4a8` is the same any4 checkpoint run with int8 activations in the decoder layers
(pocketllm::any4_linear_w4a8; the reference reproduces those numerics). `8da4w` is torchao's in-graph scheme
(ExecuTorch only); the reference then holds the floating-point weights.
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
W4A8 = "any4-w4a8"  # any4 weights, int8 activations in the decoder layers
CHECKPOINT_SCHEME = {W4A8: "any4"}  # --quant values that are a checkpoint scheme run differently


def checkpoint_scheme(quant: str) -> str:
    """The quantized checkpoint a --quant value exports (any4-w4a8 -> any4; others as given)."""
    return CHECKPOINT_SCHEME.get(quant, quant)


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
    lm_head: str = "auto"  # "auto" (int8 per channel), "none" (float) or a scheme: export/quant/recipe.resolve_head
    embedding: str = "auto"  # untied models' embedding table ("auto": as the head)
    quantize_lm_head: bool = False  # --quantize-lm-head: the LM head (tied: the one table) in the layers' 4-bit scheme


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
    wanted = checkpoint_scheme(request.quant)
    if have is not None and wanted not in ("none", have):
        raise PocketllmError(f"{ckpt.dir} is already quantized with {have}; export it with --quant {have} "
                             "(or quantize the floating-point checkpoint)")
    if (request.lm_head, request.embedding) != ("auto", "auto") or request.quantize_lm_head:
        if have is not None:
            raise PocketllmError(f"{ckpt.dir} is already quantized: its LM head and embedding are what they are; "
                                 "--lm-head / --embedding / --quantize-lm-head apply when exporting a floating-point "
                                 "checkpoint")
        if request.quantize_lm_head and request.lm_head not in ("auto", wanted):
            raise PocketllmError(f"--quantize-lm-head means --lm-head {wanted}; it contradicts --lm-head "
                                 f"{request.lm_head}")
        if wanted not in PROJECT_SCHEMES:
            raise PocketllmError(f"--lm-head / --embedding / --quantize-lm-head need a quantizing --quant "
                                 f"({', '.join(PROJECT_SCHEMES)}, {W4A8}); got --quant {request.quant}")
    if wanted in PROJECT_SCHEMES and have is None:  # fail now, not after the layers are quantized
        from pocketllm.export.quant.recipe import resolve_head

        resolve_head(request.lm_head, request.embedding, wanted, ckpt.spec.tie_word_embeddings,
                     request.quantize_lm_head)
    max_context = resolve_max_context(ckpt.spec, request.max_context)
    quant = request.quant if request.quant == W4A8 else (have or request.quant)
    chosen = []
    for target in targets:
        options = target.options(max_context=max_context, quant=quant, prefill_chunk=request.prefill_chunk,
                                 group_size=request.group_size)
        target.check_sdk()
        chosen.append((target, options))
    return ExportPlan(request=request, ckpt=ckpt, max_context=max_context, targets=chosen)


def quant_summary(ckpt, quant: str = "none") -> dict:
    """The manifest's `quantization`: the checkpoint's scheme, what the LM head and the embedding table are stored
    in (a scheme, or the float dtype the artifact computes in), whether they are one tied tensor, and the
    activations the decoder layers run with (int8 for W4A8)."""
    q = ckpt.quantization
    spec = ckpt.spec
    activations = "int8" if quant == W4A8 else "fp32"
    tied = bool(spec.tie_word_embeddings)
    if q is None:
        return {"scheme": "none", "bits_per_weight": 32, "variant": quant, "activations": activations,
                "lm_head": "fp32", "embedding": "fp32", "tied_embedding": tied}
    emb = q.modules.get("model.embed_tokens")
    head = emb if tied else q.modules.get("lm_head")
    return {"scheme": q.scheme, "group_size": q.group_size or None, "bits_per_weight": round(q.bits_per_weight(), 4),
            "modules": len(q.modules), "calibration": q.calibration, "variant": quant, "activations": activations,
            "lm_head": head.scheme if head else "fp32", "embedding": emb.scheme if emb else "fp32",
            "tied_embedding": tied}


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
        if ckpt.quantization is None and checkpoint_scheme(request.quant) in PROJECT_SCHEMES:
            from pocketllm.export.quant.quantize import quantize_checkpoint

            t0 = time.perf_counter()
            with stage("quantize"):
                text = Path(request.calibration).read_text(encoding="utf-8") if request.calibration else None
                quantize_checkpoint(ckpt, reference, checkpoint_scheme(request.quant), group_size=request.group_size,
                                    calibration=text, lm_head=request.lm_head, embedding=request.embedding,
                                    quantize_lm_head=request.quantize_lm_head)
            timings["quantize_s"] = time.perf_counter() - t0
        else:
            copy_reference(ckpt, reference)
        weights = open_checkpoint(reference)  # the weights every target exports and parity checks
        quant = quant_summary(weights, p.targets[0][1].quant)
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


