"""The export pipeline: checkpoint -> (quantize) -> model -> target(s) -> bundle. Plain functions; the CLI only
parses flags.

    request = ExportRequest(...)      every argument checked before any weight is read (`plan`)
    manifest = run_export(request)    one atomic bundle directory with every target's artifact

InfLLM v2 scoring: `infllm_scores` ("upstream", the default, or "exact"; docs/infllm_v2.md step 3) is an export
option, not a config key: the plan's spec carries it (SparseSpec.score_rule), the artifacts are built with it, and
the manifest records it (attention.infllm_v2.score_rule), where parity reads it for the reference.

Quantization: `--quant any4|int4|nf4|int8` writes a quantized checkpoint (export/quant) straight into the bundle's
`reference/` folder; every target exports those weights and parity runs the numpy reference on them. The LM head
(and the embedding table) follow `lm_head` / `embedding` / `quantize_lm_head` (default: 8 bits per channel; a tied
head is the embedding table, stored once). `any4-w4a8` is the same any4 checkpoint run with int8 activations in the
decoder layers (pocketllm::any4_linear_w4a8; the reference reproduces those numerics). `8da4w` is torchao's
in-graph scheme (ExecuTorch only); the reference then holds the floating-point weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pocketllm.export.atomic import atomic_directory
from pocketllm.export.defaults import resolve_max_context
from pocketllm.export.errors import PocketllmError
from pocketllm.export.outputs import check_out_dir
from pocketllm.export.quant.format import SCHEMES
from pocketllm.export.spec import SCORE_RULES, ModelSpec

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
    prefill_chunk: int | None = None  # None: each target's default (ExecuTorch 256, Core ML 64)
    group_size: int | None = None
    calibration: str | Path | None = None  # any4 calibration: text, or a path to a UTF-8 text file (as quantize)
    force: bool = False
    lm_head: str = "auto"  # "auto" (int8 per channel), "none" (float) or a scheme: export/quant/recipe.resolve_head
    embedding: str = "auto"  # untied models' embedding table ("auto": as the head)
    quantize_lm_head: bool = False  # --quantize-lm-head: the LM head (tied: the one table) in the layers' 4-bit scheme
    target_options: tuple[str, ...] = ()  # "TARGET.KEY=VALUE": options of one target beyond the common ones
    infllm_scores: str | None = None  # InfLLM v2 score rule (SCORE_RULES); None: "upstream" where InfLLM v2 is used
    experts: str | None = None  # MoE experts: inline | file | all (ExecuTorch); None: file with a cache, else inline
    expert_cache_mb: int | None = None  # the expert store's default budget (implies experts file)


@dataclass
class ExportPlan:
    """A validated request: the opened checkpoint, the spec to export (the checkpoint's, with the export options
    that live in it), the targets and their options."""

    request: ExportRequest
    ckpt: Any  # export.checkpoint.Checkpoint
    max_context: int
    targets: list  # [(Target, options)]
    warnings: list[str]  # one line each, for the user before the export starts (e.g. slow in-graph dequantization)
    spec: ModelSpec | None = None


def with_score_rule(spec: ModelSpec, infllm_scores: str | None) -> ModelSpec:
    """`spec` with its InfLLM v2 score rule set; refused for a model without InfLLM v2 layers (it would be ignored)."""
    if infllm_scores is None:
        return spec
    if infllm_scores not in SCORE_RULES:
        raise PocketllmError(f"--infllm-scores must be one of {', '.join(SCORE_RULES)} (got {infllm_scores!r})")
    if spec.sparse is None or not any(layer.attention == "infllm" for layer in spec.layers):
        raise PocketllmError("--infllm-scores applies to InfLLM v2 attention (a MiniCPM4 config with sparse_config); "
                             "this model has none")
    return dataclasses.replace(spec, sparse=dataclasses.replace(spec.sparse, score_rule=infllm_scores))


def head_choice(request: ExportRequest, targets) -> tuple[str, str, bool]:
    """(lm_head, embedding, quantize_lm_head) to quantize with. A target whose artifact keeps the LM head and the
    embedding table in floating point (Target.quantized_lm_head False: Core ML) turns "auto" into "none" and refuses
    an explicit quantized choice, before any weight is read."""
    float_only = [t.name for t in targets if not t.quantized_lm_head]
    if not float_only:
        return request.lm_head, request.embedding, request.quantize_lm_head
    if request.quantize_lm_head or request.lm_head not in ("auto", "none") or request.embedding not in ("auto", "none"):
        raise PocketllmError(f"--target {float_only[0]} keeps the LM head and the embedding table in floating point: "
                             "leave out --quantize-lm-head / --lm-head / --embedding (or use --lm-head none)")
    return "none", "none", False


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def plan(request: ExportRequest) -> ExportPlan:
    """Check every argument against the targets and the checkpoint's config (no weight data is read)."""
    from pocketllm.export.checkpoint import open_checkpoint
    from pocketllm.export.targets import parse_targets

    targets = parse_targets(request.targets)
    if request.quant == "8da4w" and [t.name for t in targets] != ["executorch"]:
        raise PocketllmError("--quant 8da4w is ExecuTorch's in-graph scheme: use it with --target executorch alone")
    calibration = request.calibration
    calibration_file = Path(calibration) if calibration and Path(calibration).is_file() else None
    check_out_dir(Path(request.out), force=request.force,
                  inputs={"--checkpoint": request.checkpoint, "--calibration": calibration_file})
    ckpt = open_checkpoint(request.checkpoint)
    spec = with_score_rule(ckpt.spec, request.infllm_scores)
    have = ckpt.quantization.scheme if ckpt.quantization is not None else None
    wanted = checkpoint_scheme(request.quant)
    if have is not None and wanted not in ("none", have):
        raise PocketllmError(f"{ckpt.dir} is already quantized with {have}; export it with --quant {have} "
                             "(or quantize the floating-point checkpoint)")
    lm_head, embedding, quantize_lm_head = head_choice(request, targets) if wanted in PROJECT_SCHEMES else (
        request.lm_head, request.embedding, request.quantize_lm_head)
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
    if have is None and wanted in PROJECT_SCHEMES:  # what quantize_checkpoint will check, before any weight
        from pocketllm.export.checkpoint import expected_tensors
        from pocketllm.export.families import get_family
        from pocketllm.export.quant.calibrate import calibration_text
        from pocketllm.export.quant.recipe import default_recipe

        calibration_text(None if calibration is None else str(calibration))
        float_modules = get_family(ckpt.spec.family).float_modules
        default_recipe(wanted, request.group_size, quantize_lm_head, keep_float=float_modules,
                       lm_head=lm_head, embedding=embedding,
                       tied=ckpt.spec.tie_word_embeddings).plan(expected_tensors(ckpt.spec), "--group-size")
    max_context = resolve_max_context(ckpt.spec, request.max_context)
    quant = request.quant if request.quant == W4A8 else (have or request.quant)
    moe_options = {}  # target options only MoE exports set (a target without them refuses them: Target.options)
    experts = request.experts or ("file" if request.expert_cache_mb is not None else None)
    if experts is not None or request.expert_cache_mb is not None:
        if not any(layer.mlp == "moe" for layer in ckpt.spec.layers):
            flag = "--expert-cache-mb" if request.experts is None else f"--experts {request.experts}"
            raise PocketllmError(f"{flag}: {ckpt.dir.name} has no mixture-of-experts layers")
        moe_options = {"experts": experts or "inline", "expert_cache_mb": request.expert_cache_mb}
    extra = parse_target_options(request.target_options, targets)
    common = {"max_context": max_context, "quant": quant, "group_size": request.group_size}
    if request.prefill_chunk is not None:
        common["prefill_chunk"] = request.prefill_chunk
    chosen, warnings = [], []
    for target in targets:
        options = target.options(**common, **moe_options, **extra.get(target.name, {}))
        target.check_sdk()
        target.check(ckpt, options)
        chosen.append((target, options))
        warnings += target.warnings(options)
    return ExportPlan(request=request, ckpt=ckpt, max_context=max_context, targets=chosen, warnings=warnings, spec=spec)


COMMON_OPTIONS = ("max_context", "quant", "prefill_chunk", "group_size")  # set by their own flags


def parse_target_options(values, targets) -> dict[str, dict[str, Any]]:
    """["coreml.deployment_target=iOS18", ...] -> {"coreml": {"deployment_target": "iOS18"}}, each value converted
    to its option's type (int, bool or str). One PocketllmError line per bad entry."""
    import dataclasses

    by_name = {t.name: t for t in targets}
    out: dict[str, dict[str, Any]] = {}
    for raw in values or ():
        key, eq, value = raw.partition("=")
        name, dot, field = key.strip().partition(".")
        if not eq or not dot or not field:
            raise PocketllmError(f"--target-option {raw!r}: expected TARGET.KEY=VALUE (e.g. "
                                 "coreml.deployment_target=iOS18)")
        if name not in by_name:
            raise PocketllmError(f"--target-option {raw!r}: {name!r} is not among --target "
                                 f"({', '.join(by_name)})")
        fields = {f.name: f for f in dataclasses.fields(by_name[name].options_class)
                  if f.name not in COMMON_OPTIONS}
        if field not in fields:
            raise PocketllmError(f"--target-option {raw!r}: {name} has no option {field!r} (options: "
                                 f"{', '.join(fields) or 'none'})")
        kind = str(fields[field].type)
        value = value.strip()
        try:
            if kind.startswith("bool"):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                converted: Any = value.lower() in ("true", "1", "yes")
            elif kind.startswith("int"):
                converted = int(value)
            else:
                converted = value
        except ValueError:
            raise PocketllmError(f"--target-option {raw!r}: {field} expects {kind}, got {value!r}") from None
        out.setdefault(name, {})[field] = converted
    return out


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
    # group_size 0 (one group per row, int8's default) is null in the manifest, whose schema wants a positive size
    emb = q.modules.get("model.embed_tokens")
    head = emb if tied else q.modules.get("lm_head")
    return {"scheme": q.scheme, "group_size": q.group_size or None, "bits_per_weight": round(q.bits_per_weight(), 4),
            "modules": len(q.modules), "calibration": q.calibration, "variant": quant, "activations": activations,
            "lm_head": head.scheme if head else "fp32", "embedding": emb.scheme if emb else "fp32",
            "tied_embedding": tied}


@contextlib.contextmanager
def no_stages(name: str):
    yield


def run_export(request: ExportRequest | ExportPlan, stage: Callable[[str], Any] = no_stages) -> dict:
    """Write the bundle `request.out` atomically; returns its manifest. stage(name) is a context-manager factory
    for progress display ("quantize", "load", "export", "lower", ...). Takes a request, or the plan of one (the
    CLI plans first, to show the plan's warnings before the long part)."""
    from pocketllm.export.bundle.chat import chat_for_manifest
    from pocketllm.export.bundle.manifest import write_manifest
    from pocketllm.export.bundle.reference import REFERENCE_DIR, copy_reference
    from pocketllm.export.bundle.tokenizer import copy_tokenizer
    from pocketllm.export.checkpoint import open_checkpoint
    from pocketllm.export.nn.load import load_model

    p = request if isinstance(request, ExportPlan) else plan(request)
    request = p.request
    ckpt, spec, out = p.ckpt, p.spec, Path(request.out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with atomic_directory(out, force=request.force) as tmp:
        reference = tmp / REFERENCE_DIR
        if ckpt.quantization is None and checkpoint_scheme(request.quant) in PROJECT_SCHEMES:
            from pocketllm.export.quant.quantize import quantize_checkpoint

            t0 = time.perf_counter()
            with stage("quantize"):
                quantize_checkpoint(ckpt, reference, checkpoint_scheme(request.quant), group_size=request.group_size,
                                    calibration=None if request.calibration is None else str(request.calibration),
                                    **dict(zip(("lm_head", "embedding", "quantize_lm_head"),
                                               head_choice(request, [t for t, _ in p.targets]))))
            timings["quantize_s"] = time.perf_counter() - t0
        else:
            copy_reference(ckpt, reference)
        weights = open_checkpoint(reference)  # the weights every target exports and parity checks
        weights.spec = with_score_rule(weights.spec, request.infllm_scores)  # built into the artifacts
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
        for target, _ in p.targets:
            target.add_tokenizer(tmp, tok_files)
        config_sha = hashlib.sha256((ckpt.dir / "config.json").read_bytes()).hexdigest()
        timings["total_s"] = time.perf_counter() - t_start
        manifest = write_manifest(
            tmp, name=out.name, spec=spec, max_context=p.max_context, tokenizer_files=tok_files, quant=quant,
            targets=entries, chat=chat_for_manifest(tmp, spec.eos_token_ids)[1],
            source={"checkpoint": Path(request.checkpoint).resolve().name, "weight_dtype": ckpt.weight_dtype,
                    "config_sha256": config_sha,
                    "calibration": (quant.get("calibration") or {}).get("source")},  # builtin | file:NAME | text
            extra={"export": {"timings": {k: round(v, 2) for k, v in timings.items()},
                              "peak_rss_mib": peak_rss_mib()}})
    return manifest


