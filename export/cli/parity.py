"""`pocketllm parity BUNDLE`: the bundle's artifact against the numpy reference (runtime_py/parity.py)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from pocketllm.export.cli.common import console, set_threads, user_errors


def parity(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pocketllm export`."),
    target: str = typer.Option(None, "--target", help="Which of the bundle's artifacts (default: every one)."),
    prompts: Path = typer.Option(None, "--prompts", help="Text file, one prompt per line (default: built in)."),
    steps: int = typer.Option(64, "--steps", min=1, help="Greedy steps per prompt after the prefill."),
    checkpoint: Path = typer.Option(None, "--checkpoint",
                                    help="Reference checkpoint (default: the weights inside the bundle)."),
    tolerance: float = typer.Option(None, "--tolerance", help="Max |delta logit| (default per quantization)."),
    threads: int = typer.Option(None, "--threads", help="Runtime threads."),
):
    """Compare BUNDLE against the numpy reference; writes BUNDLE/parity.json; exits 1 on failure."""
    ok = _parity(bundle, target, prompts, steps, checkpoint, tolerance, threads)
    if not ok:
        raise typer.Exit(1)


@user_errors
def _parity(bundle, target, prompts, steps, checkpoint, tolerance, threads):
    from pocketllm.export.bundle.manifest import read_manifest
    from pocketllm.runtime_py.parity import run_parity

    set_threads(threads)
    names = [target] if target else list(read_manifest(bundle, verify=False).get("targets", {}))
    passed = True
    for name in names:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(f"parity {name}: prompts", total=None)
            report = run_parity(bundle, target=name, prompts_file=prompts, steps=steps, checkpoint=checkpoint,
                                tolerance=tolerance, threads=threads,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        _print_report(bundle, report)
        passed = passed and report["passed"]
    return passed


def _print_report(bundle: Path, report: dict) -> None:
    table = Table(title=f"parity {bundle} ({report['target']}, quant {report['quant']})")
    for col in ("#", "tokens", "max|d| prefill", "max|d| steps", "top-1", "greedy", "InfLLM"):
        table.add_column(col, justify="right")
    for i, p in enumerate(report["prompts"]):
        table.add_row(str(i), f"{p['prompt_tokens']}+{p['steps']}", f"{p['max_abs_delta_prefill']:.2e}",
                      f"{p['max_abs_delta_steps']:.2e}", f"{p['top1_agreement']:.3f}",
                      "same" if p["continuation_identical"] else f"differs@{p['first_divergence']}",
                      {True: "engaged", False: "all kept", None: "-"}[p["infllm_engaged"]])
    console.print(table)
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"parity {report['target']} {verdict}: max |delta logit| {report['max_abs_delta']:.3e} (tolerance "
          f"{report['tolerance']}), top-1 agreement {report['top1_agreement']:.4f}, continuations "
          f"{'identical' if report['continuations_identical'] else 'differ'}"
          + (f", positions within tolerance {report['positions_within_tolerance']:.4f}"
             if report.get("positions_within_tolerance") is not None else "")
          + f"; contract: {report['contract']}; wrote {Path(bundle) / 'parity.json'}")
