"""`pocketllm quantize`: any4 / int4 / nf4 / int8 weights, written as a new checkpoint (docs/quantization.md)."""

from __future__ import annotations

from collections import defaultdict
from enum import Enum
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from pocketllm.export.cli.common import console, force_option, set_threads, threads_option, user_errors
from pocketllm.export.defaults import DEFAULT_GROUP_SIZE
from pocketllm.export.quant.format import ACT_STATS, DEFAULT_ACT_STAT, REPORT_FILE, SCHEMES

Scheme = Enum("Scheme", {name: name for name in SCHEMES}, type=str)  # export/quant's schemes
ActStat = Enum("ActStat", {name: name for name in ACT_STATS}, type=str)


def quantize(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Floating-point checkpoint directory."),
    scheme: Scheme = typer.Option(..., "--scheme", help="Quantization scheme (docs/quantization.md)."),
    out: Path = typer.Option(..., "--out", help="Directory to create (written atomically)."),
    group_size: int = typer.Option(None, "--group-size",
                                   help=f"Columns per scale/zero group: {DEFAULT_GROUP_SIZE} by default for 4-bit "
                                        "schemes; 0 = one group per row (any4 then maps onto Core ML's per-row "
                                        "palettization). int8 is per channel and takes none."),
    calibration: str = typer.Option(None, "--calibration",
                                    help="Calibration text, or a path to a UTF-8 text file (default: a short "
                                         "built-in mixed-domain prompt)."),
    max_calibration_tokens: int = typer.Option(None, "--max-calibration-tokens", min=2,
                                               help="Use at most this many calibration tokens (default 2048)."),
    act_stat: ActStat = typer.Option(None, "--act-stat",
                                     help="any4 k-means weight per input column, times the group scale: abs_mean = "
                                          "|mean activation| (the paper's), mean_abs = mean |activation|, "
                                          f"rms = sqrt(mean activation^2). Default {DEFAULT_ACT_STAT}."),
    quantize_lm_head: bool = typer.Option(False, "--quantize-lm-head", help="Also quantize an untied lm_head."),
    seed: int = typer.Option(0, "--seed", help="k-means++ seed (any4)."),
    threads: int = threads_option(),
    force: bool = force_option(),
):
    """Quantize the decoder's Linear weights and write a checkpoint that logits, generate and export accept.

    Prints the quantization error of every layer; the per-tensor numbers go to OUT/quantization_report.json.
    """
    _quantize(checkpoint, scheme.value, out, group_size, calibration, max_calibration_tokens,
              act_stat.value if act_stat else None, quantize_lm_head, seed, threads, force)


@user_errors
def _quantize(checkpoint, scheme, out, group_size, calibration, max_calibration_tokens, act_stat, quantize_lm_head,
              seed, threads, force):
    from pocketllm.export.quant.quantize import quantize_checkpoint  # OMP_WAIT_POLICY: set at start-up (process.py)

    set_threads(threads)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"quantizing ({scheme})", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"quantizing ({scheme}): {what}")

        optional = {k: v for k, v in (("act_stat", act_stat), ("max_calibration_tokens", max_calibration_tokens))
                    if v is not None}  # library defaults apply otherwise (written once, in export/quant)
        result = quantize_checkpoint(checkpoint, out, scheme, group_size=group_size, calibration=calibration,
                                     quantize_lm_head=quantize_lm_head, force=force, seed=seed, progress=progress,
                                     **optional)

    by_layer: dict[str, list] = defaultdict(list)
    for t in result.tensors:
        parts = t.name.split(".")
        by_layer[parts[2] if parts[:2] == ["model", "layers"] else parts[0]].append(t)
    table = Table(title=f"{scheme}: relative error ||W - Wq|| / ||W|| per layer", title_justify="left")
    for col in ("layer", "tensors", "bits/w", "mean err", "max err", "worst", "act-wtd", "sec"):
        table.add_column(col, justify="left" if col == "worst" else "right")
    for layer, ts in by_layer.items():
        n = sum(t.shape[0] * t.shape[1] for t in ts)
        bpw = sum(t.bits_per_weight * t.shape[0] * t.shape[1] for t in ts) / n
        worst = max(ts, key=lambda t: t.rel_error)
        short = ".".join(p for p in worst.name.split(".")[3:] if p not in ("self_attn", "mlp", "block_sparse_moe"))
        table.add_row(layer, str(len(ts)), f"{bpw:.3f}", f"{sum(t.rel_error for t in ts) / len(ts):.4f}",
                      f"{worst.rel_error:.4f}", short or worst.name,
                      f"{sum(t.weighted_rel_error for t in ts) / len(ts):.4f}", f"{sum(t.seconds for t in ts):.1f}")
    console.print(table)
    s = result.summary()
    console.print(f"wrote {result.out}: {s['quantized_tensors']} tensors ({s['quantized_weights']:,} weights) at "
                  f"{s['bits_per_weight']:.3f} bits/weight, rms rel error {s['rms_rel_error']:.4f}, "
                  f"{s['calibration_tokens']} calibration tokens, {s['seconds']:.1f} s; per-tensor errors in "
                  f"{result.out / REPORT_FILE}", highlight=False)
