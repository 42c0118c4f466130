"""`pocketllm export`: checkpoint -> bundle (artifact + tokenizer + manifest.json), written atomically."""

from __future__ import annotations

import contextlib
import time
from enum import Enum
from pathlib import Path

import typer

from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.errors import PocketllmError


class Quant(str, Enum):
    none = "none"
    int8 = "int8"
    int4 = "int4"
    any4 = "any4"
    w8da4w = "8da4w"


def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Hugging Face style checkpoint directory."),
    target: str = typer.Option("executorch", "--target", help="Backend: executorch."),
    quant: Quant = typer.Option(Quant.none, "--quant", help="Weights: none (fp32), int8, int4, any4, 8da4w."),
    max_context: int = typer.Option(None, "--max-context", help="KV cache length (default min(max pos, 4096))."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    calibration: Path = typer.Option(None, "--calibration", help="Text file calibrating any4 (default: built in)."),
    group_size: int = typer.Option(None, "--group-size", help="any4/int4 group along K (default 128)."),
    prefill_chunk: int = typer.Option(256, "--prefill-chunk", min=1,
                                      help="Most tokens per forward call (get_max_seq_len); longer prompts are "
                                           "prefilled in chunks."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
):
    """Export a checkpoint to a bundle: OUT/model.pte, tokenizer files, manifest.json (sha256 + sizes).

    any4/int4/int8 first write a quantized checkpoint beside the bundle (OUT.SCHEME-checkpoint, export/quant):
    the bundle's weights, which `pocketllm parity` runs through the reference. 8da4w is torchao/XNNPACK's scheme.
    """
    _export(checkpoint, target, quant.value, max_context, out, force, calibration, group_size, prefill_chunk, threads)


@user_errors
def _export(checkpoint, target, quant, max_context, out, force, calibration, group_size, prefill_chunk, threads):
    set_threads(threads)
    manifest = run_export(checkpoint, target, quant, max_context, out, force=force, calibration=calibration,
                          group_size=group_size, prefill_chunk=prefill_chunk, progress=True)
    t = manifest["targets"][target]
    console.print(f"wrote {out}: {t['file']} {t['size'] / 2**20:.1f} MiB, sha256 {t['sha256'][:12]}; "
                  f"{', '.join(manifest['tokenizer']['files'])}; manifest.json")
    console.print(f"export timings: {manifest['export']['timings']} peak RSS {manifest['export']['peak_rss_mib']} MiB")


def peak_rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@contextlib.contextmanager
def _stages(enabled: bool):
    """Yields stage(name) -> context manager: a spinner line per stage, then a line with its duration."""
    if not enabled:
        yield lambda name: contextlib.nullcontext()
        return

    @contextlib.contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        with console.status(f"{name}..."):
            yield
        console.print(f"  {name:<10} {time.perf_counter() - t0:7.1f} s")

    yield stage


PROJECT_SCHEMES = ("any4", "int4", "int8")
QUANTIZE_SECONDS: dict[str, float] = {}  # export/quant: a quantized checkpoint the reference runs too


def quantized_source(ckpt, scheme: str, out: Path, group_size: int | None, calibration: Path | None,
                     stage) -> tuple[object, Path | None]:
    """The checkpoint to export for --quant SCHEME: itself when already quantized that way, else a quantized copy
    written by export/quant beside the bundle (OUT.SCHEME-checkpoint), which parity's reference then loads.
    Returns (checkpoint, directory created here or None)."""
    from pocketllm.export.checkpoint import open_checkpoint

    have = ckpt.quantization.scheme if ckpt.quantization is not None else None
    if have is not None:
        if scheme not in ("none", have):
            raise PocketllmError(f"{ckpt.dir} is already quantized with {have}; export it with --quant {have} "
                                 "(or quantize the floating-point checkpoint)")
        return ckpt, None
    if scheme not in PROJECT_SCHEMES:
        return ckpt, None
    from pocketllm.export.quant.quantize import quantize_checkpoint

    qdir = out.with_name(f"{out.name}.{scheme}-checkpoint")
    t0 = time.perf_counter()
    with stage("quantize"):
        text = Path(calibration).read_text(encoding="utf-8") if calibration else None
        quantize_checkpoint(ckpt, qdir, scheme, group_size=group_size, calibration=text, force=True)
    QUANTIZE_SECONDS[str(qdir)] = time.perf_counter() - t0
    return open_checkpoint(qdir), qdir


def quant_summary(ckpt) -> dict:
    q = ckpt.quantization
    if q is None:
        return {"scheme": "none", "bits_per_weight": 32}
    return {"scheme": q.scheme, "group_size": q.group_size, "bits_per_weight": round(q.bits_per_weight(), 4),
            "modules": len(q.modules), "calibration": q.calibration,
            "kernel": {"any4": "pocketllm::any4_linear (kernels/)"}.get(q.scheme, "dequantize + linear (portable)"),
            "lm_head": "fp32" if not any(m == "lm_head" for m in q.modules) else q.scheme,
            "checkpoint": str(ckpt.dir.resolve())}


def run_export(checkpoint, target: str, quant: str, max_context: int | None, out: Path, *, force: bool = False,
               calibration: Path | None = None, group_size: int | None = None, prefill_chunk: int = 256,
               progress: bool = False) -> dict:
    import shutil

    from pocketllm.export.bundle import copy_tokenizer, write_manifest
    from pocketllm.export.checkpoint import open_checkpoint
    from pocketllm.export.atomic import atomic_directory
    from pocketllm.export.nn.load import load_model, resolve_max_context
    from pocketllm.export.targets import target_module

    module = target_module(target)  # unknown target fails before anything is read
    ckpt = open_checkpoint(checkpoint)
    spec = ckpt.spec
    max_context = resolve_max_context(spec, max_context)
    options = module.ExecutorchOptions(max_context=max_context, quant=quant, prefill_chunk=prefill_chunk)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise PocketllmError(f"{out}: already exists and is not empty (pass --force to replace it)")
    if calibration is not None and not Path(calibration).is_file():
        raise PocketllmError(f"{calibration}: calibration text file not found")

    t_start = time.perf_counter()
    created = None
    try:
        with _stages(progress) as stage, atomic_directory(out, force=force) as tmp:
            ckpt, created = quantized_source(ckpt, quant, out, group_size, calibration, stage)
            quant_info = quant_summary(ckpt)
            with stage("load"):
                model, _ = load_model(ckpt, max_context=max_context, dtype="fp32")
            entry = module.export_executorch(model, spec, options, tmp, stage=stage, quant_info=quant_info)
            del model
            quant_info = entry.pop("quantization")
            tok_files = copy_tokenizer(ckpt.tokenizer_files, tmp, spec.bos_token_id)
            manifest = write_manifest(
                tmp, spec=spec, max_context=max_context, tokenizer_files=tok_files, quant=quant_info,
                targets={target: entry},
                source={"checkpoint": str(Path(ckpt.dir).resolve()), "original_checkpoint":
                        str(Path(checkpoint).resolve()), "weight_dtype": ckpt.weight_dtype,
                        "calibration": str(Path(calibration).resolve()) if calibration else None},
                extra={"export": {"timings": {**({"quantize_s": round(QUANTIZE_SECONDS[str(created)], 2)}
                                                 if created is not None else {}),
                                              **entry["timings"], "total_s": round(time.perf_counter() - t_start, 2)},
                                  "peak_rss_mib": peak_rss_mib()}})
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return manifest
