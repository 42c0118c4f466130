"""`pocketllm parity BUNDLE`: the bundle's artifact against the numpy reference (runtime_py/parity.py)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from pocketllm.export.cli.common import console, set_threads, threads_option, user_errors, warn
from pocketllm.export.targets import targets

Target = Enum("Target", {name: name for name in targets()}, type=str)


def parity(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pocketllm export`."),
    target: Target = typer.Option(None, "--target", help="Which of the bundle's artifacts (default: every one)."),
    prompts: Path = typer.Option(None, "--prompts", help="UTF-8 text file, one prompt per line (default: built in)."),
    steps: int = typer.Option(64, "--steps", min=1, help="Greedy steps per prompt after the prefill."),
    checkpoint: Path = typer.Option(None, "--checkpoint",
                                    help="Reference checkpoint (default: the weights inside the bundle)."),
    tolerance: float = typer.Option(None, "--tolerance", min=0.0, help="Max |delta logit| (default per "
                                    "quantization)."),
    threads: int = threads_option("Runtime threads (default: the runtime's choice)."),
    mode: str = typer.Option(None, "--mode", help="Only this runner mode, for runners with several (coreml: fp32 "
                                                  "= the program's math, fp16 = fp16 rounding as on a phone; "
                                                  "default: every mode)."),
):
    """Compare BUNDLE against the numpy reference; exits 1 on failure.

    Writes BUNDLE/parity.json and manifest.json's summary unless they hold a more thorough result (see README).
    Core ML bundles run through the MIL interpreter twice: fp32 mode (max |delta logit| <= 5e-3) and fp16 mode
    (identical greedy continuations, top-1 agreement >= 0.99), against the reference on the bundle's weights rounded
    to fp16 as the package stores them."""
    ok = _parity(bundle, target.value if target else None, prompts, steps, checkpoint, tolerance, threads, mode)
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
    ties = {t["prompt"]: t for t in section.get("router_ties", [])}
    for i, p in enumerate(section["prompts"]):
        tie = "+" if i in ties else ""
        table.add_row(str(i), f"{p['prompt_tokens']}+{p['steps']}" + ("*" if p["prompt_truncated"] else ""),
                      f"{p['max_abs_delta_prefill']:.2e}{tie}", f"{p['max_abs_delta_steps']:.2e}{tie}",
                      f"{p['top1_agreement']:.3f}",
                      "same" if p["continuation_identical"] else f"differs@{p['first_divergence']}",
                      {True: "engaged", False: "all kept", None: "-"}[p["infllm_engaged"]])
    console.print(table)
    for i, p in enumerate(section["prompts"]):
        if p["prompt_truncated"]:
            console.print(f"* prompt {i}: {p['prompt_tokens_full']} tokens, cut to its first {p['prompt_tokens']} "
                          f"to fit the bundle's context with {p['steps']} steps", highlight=False, soft_wrap=True)
    for i, t in ties.items():
        console.print(f"+ prompt {i}: a router near-tie at position {t['position']} (layer {t['layer']}, top-k margin "
                      f"{t['margin']:.1e}, within the tolerance): from it on the {t['positions']} positions match the "
                      f"reference with that token sent to the runner-up expert (max |delta| "
                      f"{t['max_abs_delta_vs_runner_up']:.2e}, same greedy tokens)", highlight=False, soft_wrap=True)
    verdict = "PASS" if section["passed"] else "FAIL"
    need = section.get("criteria", {})
    if need.get("noise_jitter") is not None:  # W4A8: within the reference's own noise floor (docs/quantization.md)
        floor = section["noise_floor"]
        bounds = [f"|delta| p{round(float(q) * 100)} {section['quantiles'][q]:.2e} <= {b:.2e}"
                  for q, b in section["bounds"].items()]
        bounds[0] = (f"{need['noise_factor']} x the reference's own under {need['noise_jitter']:.1e} activation "
                     f"jitter ({floor['positions']} positions): " + bounds[0])
        bounds += [f"top-1 >= {section['min_top1_here']:.3f}"]
    else:
        bounds = [f"max |delta| <= {need['tolerance']}"] if need.get("tolerance") is not None else []
    bounds += ["identical continuations"] if need.get("identical") else []
    bounds += [f"top-1 >= {need['min_top1']}"] if need.get("min_top1") and "noise_jitter" not in need else []
    if report.get("saved", True):
        where = f"wrote {Path(bundle) / 'parity.json'}"
    else:
        kept = report["kept"]
        where = "not saved"
        if section is report or section is next(iter(report["modes"].values())):  # said once per report
            warn(f"parity.json keeps its more thorough {report['target']} result ({kept['prompts']} prompts x "
                 f"{kept['steps']} steps, {'PASS' if kept['passed'] else 'FAIL'}); this run compared "
                 f"{report['compared_steps']} steps in all and was not saved")
    print(f"parity {report['target']}{mode.replace(', mode', ' mode')} {verdict}: max |delta logit| "
          f"{section['max_abs_delta']:.3e}, top-1 agreement {section['top1_agreement']:.4f}, continuations "
          f"{'identical' if section['continuations_identical'] else 'differ'} (required: {'; '.join(bounds)}); "
          f"{where}")
