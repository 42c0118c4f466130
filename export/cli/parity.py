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
    mode: str = typer.Option(None, "--mode", help="Only this runner mode, for runners with several (coreml: fp32 "
                                                  "= the program's math, fp16 = fp16 rounding as on a phone; "
                                                  "default: every mode)."),
):
    """Compare BUNDLE against the numpy reference; writes BUNDLE/parity.json; exits 1 on failure.

    Core ML bundles run through the MIL interpreter twice: fp32 mode (max |delta logit| <= 5e-3) and fp16 mode
    (identical greedy continuations, top-1 agreement >= 0.99), against the reference on the bundle's weights rounded
    to fp16 as the package stores them."""
    ok = _parity(bundle, target, prompts, steps, checkpoint, tolerance, threads, mode)
    if not ok:
        raise typer.Exit(1)


@user_errors
def _parity(bundle, target, prompts, steps, checkpoint, tolerance, threads, mode=None):
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
                                tolerance=tolerance, threads=threads, mode=mode,
                                progress=lambda done, total: bar.update(task, completed=done, total=total))
        for section in report.get("modes", {"": report}).values():
            _print_report(bundle, report, section)
        passed = passed and report["passed"]
    return passed


def _print_report(bundle: Path, report: dict, section: dict) -> None:
    """One table and verdict line per run (per mode for runners with several)."""
    mode = f", mode {section['mode']}" if "mode" in section else ""
    table = Table(title=f"parity {bundle} ({report['target']}{mode}, quant {report['quant']})")
    for col in ("#", "tokens", "max|d| prefill", "max|d| steps", "top-1", "greedy", "InfLLM"):
        table.add_column(col, justify="right")
    for i, p in enumerate(section["prompts"]):
        table.add_row(str(i), f"{p['prompt_tokens']}+{p['steps']}", f"{p['max_abs_delta_prefill']:.2e}",
                      f"{p['max_abs_delta_steps']:.2e}", f"{p['top1_agreement']:.3f}",
                      "same" if p["continuation_identical"] else f"differs@{p['first_divergence']}",
                      {True: "engaged", False: "all kept", None: "-"}[p["infllm_engaged"]])
    console.print(table)
    verdict = "PASS" if section["passed"] else "FAIL"
    need = section.get("criteria", {})
    bounds = [f"max |delta| <= {need['tolerance']}"] if need.get("tolerance") is not None else []
    bounds += ["identical continuations"] if need.get("identical") else []
    bounds += [f"top-1 >= {need['min_top1']}"] if need.get("min_top1") else []
    print(f"parity {report['target']}{mode.replace(', mode', ' mode')} {verdict}: max |delta logit| "
          f"{section['max_abs_delta']:.3e}, top-1 agreement {section['top1_agreement']:.4f}, continuations "
          f"{'identical' if section['continuations_identical'] else 'differ'} (required: {'; '.join(bounds)}); "
          f"wrote {Path(bundle) / 'parity.json'}")
