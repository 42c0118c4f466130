"""`pocketllm export`: checkpoint -> bundle (export/pipeline.py), with a line per stage."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer
from rich.table import Table

from pocketllm.export.defaults import DEFAULT_GROUP_SIZE, DEFAULT_MAX_CONTEXT, DEFAULT_PREFILL_CHUNK
from pocketllm.export.cli.common import console, set_threads, user_errors
from pocketllm.export.pipeline import ExportRequest, run_export
from pocketllm.export.targets import targets


def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Hugging Face style checkpoint directory."),
    target: str = typer.Option("executorch", "--target",
                               help=f"One or more of: {', '.join(targets())} (comma-separated: one bundle)."),
    quant: str = typer.Option("none", "--quant", help="Weights: " + ", ".join(dict.fromkeys(
                              s for t in targets().values() for s in t.quant_schemes)) + " (each target lists its own)."),
    max_context: int = typer.Option(None, "--max-context", help=f"KV cache length (default min(max pos, {DEFAULT_MAX_CONTEXT}))."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    calibration: Path = typer.Option(None, "--calibration", help="Text file calibrating any4 (default: built in)."),
    group_size: int = typer.Option(None, "--group-size", help=f"any4/int4/nf4/8da4w group along K (default {DEFAULT_GROUP_SIZE})."),
    prefill_chunk: int = typer.Option(DEFAULT_PREFILL_CHUNK, "--prefill-chunk",
                                      help="Most tokens per forward call (get_max_seq_len); longer prompts are "
                                           "prefilled in chunks."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for torch."),
    experts: str = typer.Option(None, "--experts",
                                help="MoE models (ExecuTorch): inline = experts stacked in the .pte, only the routed "
                                     "ones read (default); file = experts.bin beside the .pte, read by the kernel "
                                     "library's expert store (memory-mapped, or an LRU within --expert-cache-mb, "
                                     "prefetched from SmallThinker's pre-attention router); all = every expert runs "
                                     "(for comparisons)."),
    expert_cache_mb: int = typer.Option(None, "--expert-cache-mb",
                                        help="Expert store budget in MiB recorded in the manifest as the runtime's "
                                             "default (implies --experts file; runtimes may override it)."),
):
    """Export a checkpoint to a bundle: OUT/<artifacts>, tokenizer files, reference/ weights, manifest.json.

    any4/int4/int8 quantize the checkpoint first (export/quant) into OUT/reference: the bundle's weights, which
    `pocketllm parity` runs through the numpy reference. 8da4w is torchao/XNNPACK's scheme (ExecuTorch only).
    """
    _export(ExportRequest(checkpoint=checkpoint, out=out, targets=target, quant=quant, max_context=max_context,
                          prefill_chunk=prefill_chunk, group_size=group_size, calibration=calibration, force=force,
                          experts=experts, expert_cache_mb=expert_cache_mb),
            threads)


@contextlib.contextmanager
def _stage(name: str):
    """A spinner line per stage, then a line with its duration."""
    t0 = time.perf_counter()
    with console.status(f"{name}..."):
        yield
    console.print(f"  {name:<10} {time.perf_counter() - t0:7.1f} s")


@user_errors
def _export(request: ExportRequest, threads):
    set_threads(threads)
    manifest = run_export(request, stage=_stage)
    table = Table(title=f"wrote {request.out}", title_justify="left")
    for col in ("target", "file", "MiB", "sha256"):
        table.add_column(col)
    for name, entry in manifest["targets"].items():
        files = [(f, e) for f, e in manifest["files"].items() if f == entry["file"] or f.startswith(entry["file"] + "/")]
        size = sum(e["size"] for _, e in files)
        table.add_row(name, entry["file"], f"{size / 2**20:.1f}", files[0][1]["sha256"][:12] if len(files) == 1 else
                      f"{len(files)} files")
    console.print(table)
    export_info = manifest["export"]
    console.print(f"tokenizer: {', '.join(manifest['tokenizer']['files'])}; total {export_info['timings']['total_s']:.1f} s, "
                  f"peak RSS {export_info['peak_rss_mib']:.0f} MiB", highlight=False)
