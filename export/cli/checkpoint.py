"""`pocketllm init-checkpoint`: a randomly initialised checkpoint in the exact upstream layout."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from pocketllm.export.cli.common import console, force_option, user_errors
from pocketllm.export.families import families


Arch = Enum("Arch", {name: name for name in families()}, type=str)  # every registered family


class WeightDType(str, Enum):
    bf16 = "bf16"
    fp32 = "fp32"


def init_checkpoint(
    arch: Arch = typer.Option(..., "--arch", help="Model family."),
    preset: str = typer.Option(..., "--preset", help="; ".join(f"{' | '.join(f.presets)} ({f.name})"
                                                                for f in families().values()) + "."),
    out: Path = typer.Option(..., "--out", help="Directory to create."),
    seed: int = typer.Option(0, "--seed"),
    dtype: WeightDType = typer.Option(WeightDType.bf16, "--dtype", help="Storage dtype of the weights."),
    force: bool = force_option(),
):
    """Write a random checkpoint: config.json with upstream keys, safetensors shards + index, tokenizer."""
    _init(arch.value, preset, out, seed, dtype.value, force)


@user_errors
def _init(arch, preset, out, seed, dtype, force):
    from pocketllm.export.init_checkpoint import init_checkpoint as write

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        def factory(total):
            task = bar.add_task(f"writing {arch} {preset}", total=total)
            return lambda n: bar.advance(task, n)

        path = write(arch, preset, out, seed=seed, dtype=dtype, force=force, progress_factory=factory)
    files = sorted(p.name for p in path.iterdir())
    console.print(f"wrote {path}: {', '.join(files)}")
