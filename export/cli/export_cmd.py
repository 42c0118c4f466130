"""`pocketllm export`: checkpoint -> bundle (export/pipeline.py), a spinner per stage, then what was written and
where the time went, as tables."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from pocketllm.export.cli.common import console, force_option, set_threads, threads_option, user_errors, warn
from pocketllm.export.defaults import DEFAULT_GROUP_SIZE, DEFAULT_MAX_CONTEXT
from pocketllm.export.pipeline import ExportRequest, plan, run_export
from pocketllm.export.quant.recipe import HEAD_CHOICES
from pocketllm.export.spec import SCORE_RULES
from pocketllm.export.targets import targets
from pocketllm.export.targets.executorch.options import EXPERT_MODES

# Every --quant some target accepts (each target checks its own list in pipeline.plan).
Quant = Enum("Quant", {s: s for t in targets().values() for s in t.quant_schemes}, type=str)
ScoreRule = Enum("ScoreRule", {r: r for r in SCORE_RULES}, type=str)  # InfLLM v2 (SparseSpec.score_rule)


def _chunk_defaults() -> str:
    import dataclasses

    return ", ".join(f"{t.name} {f.default}" for t in targets().values()
                     for f in dataclasses.fields(t.options_class) if f.name == "prefill_chunk")


def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Hugging Face style checkpoint directory."),
    target: str = typer.Option("executorch", "--target", metavar="<" + "|".join(targets()) + ">[,...]",
                               help="One or more targets, comma-separated: one bundle. "
                                    + "; ".join(f"{t.name}: {t.summary}" for t in targets().values()) + "."),
    quant: Quant = typer.Option("none", "--quant", help="Weights. "
                                + "; ".join(f"{t.name}: {', '.join(t.quant_schemes)}" for t in targets().values())
                                + "."),
    max_context: int = typer.Option(None, "--max-context", min=1,
                                    help=f"KV cache length (default min(max pos, {DEFAULT_MAX_CONTEXT}))."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to create."),
    force: bool = force_option(),
    calibration: str = typer.Option(None, "--calibration", help="any4 calibration: text, or a path to a UTF-8 text "
                                    "file (default: a short built-in mixed-domain prompt), as in quantize."),
    group_size: int = typer.Option(None, "--group-size", help=f"any4/int4/nf4/8da4w group along K (default "
                                   f"{DEFAULT_GROUP_SIZE}; 0 = one group per row)."),
    prefill_chunk: int = typer.Option(None, "--prefill-chunk", min=1,
                                      help="Most tokens per forward call (get_max_seq_len); longer prompts are "
                                           f"prefilled in chunks (default per target: {_chunk_defaults()})."),
    lm_head: str = typer.Option("auto", "--lm-head", metavar="<auto|" + "|".join(HEAD_CHOICES) + ">",
                                help="LM head when quantizing: auto (int8 per channel), none (floating point), int8, "
                                     "any4, int4 or nf4. A tied head is the embedding table: stored once."),
    embedding: str = typer.Option("auto", "--embedding", metavar="<auto|" + "|".join(HEAD_CHOICES) + ">",
                                  help="Embedding table of an untied model when quantizing: auto (as the head), "
                                       "none, int8, any4, int4 or nf4."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head",
                                          help="The LM head in the layers' 4-bit scheme (--lm-head SCHEME; a tied "
                                               "head is the embedding table, quantized and stored once)."),
    target_option: list[str] = typer.Option(None, "--target-option",
                                            help="TARGET.KEY=VALUE, repeatable: an option of one target, e.g. "
                                                 "coreml.deployment_target=iOS18 (docs/coreml.md)."),
    threads: int = threads_option(),
    infllm_scores: ScoreRule = typer.Option(None, "--infllm-scores", help="InfLLM v2 block scores: upstream "
                                            "(default; LSE over the coarse compressed keys, as MiniCPM4 is trained "
                                            "and served) or exact (softmax over the compressed keys); "
                                            "docs/infllm_v2.md."),
    experts: str = typer.Option(None, "--experts", metavar="<" + "|".join(EXPERT_MODES) + ">",
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

    any4/int4/nf4/int8 quantize first (export/quant) into OUT/reference, the weights parity's reference runs; the
    LM head in 8 bits unless --lm-head says otherwise.

    any4-w4a8: the same any4 weights with int8 activations in the decoder layers (faster on CPUs; the reference
    reproduces its numerics).

    8da4w is torchao/XNNPACK's in-graph scheme (ExecuTorch only); the reference then holds the float weights.
    """
    _export(ExportRequest(checkpoint=checkpoint, out=out, targets=target, quant=quant.value, max_context=max_context,
                          prefill_chunk=prefill_chunk, group_size=group_size, calibration=calibration, force=force,
                          lm_head=lm_head, embedding=embedding, quantize_lm_head=quantize_lm_head,
                          target_options=tuple(target_option or ()),
                          infllm_scores=infllm_scores.value if infllm_scores else None, experts=experts,
                          expert_cache_mb=expert_cache_mb),
            threads)


@contextlib.contextmanager
def _stage(name: str):
    """A spinner while a stage runs."""
    with console.status(f"{name}..."):
        yield


@user_errors
def _export(request: ExportRequest, threads):
    set_threads(threads)
    p = plan(request)  # every argument checked; no weight read yet
    for line in p.warnings:
        warn(line)
    manifest = run_export(p, stage=_stage)
    table = Table(title=f"wrote {request.out}", title_justify="left")
    for col in ("target", "file", "MiB", "sha256"):
        table.add_column(col)
    for name, entry in manifest["targets"].items():
        files = [(f, e) for f, e in manifest["files"].items() if f == entry["file"] or f.startswith(entry["file"] + "/")]
        size = sum(e["size"] for _, e in files)
        table.add_row(name, entry["file"], f"{size / 2**20:.1f}", files[0][1]["sha256"][:12] if len(files) == 1 else
                      f"{len(files)} files")
    console.print(table)
    console.print(timings_table(manifest["export"]))
    console.print(f"tokenizer: {', '.join(manifest['tokenizer']['files'])}", highlight=False)


def timings_table(export_info: dict) -> Table:
    """manifest["export"] as a table: one row per stage ("executorch.lower_s" -> executorch, lower), the total and
    the peak RSS."""
    table = Table(title="export", title_justify="left")
    for col, justify in (("stage", "left"), ("seconds", "right")):
        table.add_column(col, justify=justify)
    timings = dict(export_info["timings"])
    total = timings.pop("total_s", None)
    for key, seconds in timings.items():
        where, _, what = key.rpartition(".")
        label = what.removesuffix("_s") + (f" ({where})" if where else "")
        table.add_row(label, f"{seconds:.1f}")
    if total is not None:
        table.add_row("total", f"{total:.1f}", style="bold")
    table.caption = f"peak RSS {export_info['peak_rss_mib']:.0f} MiB"
    return table
