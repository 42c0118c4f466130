"""What every command shares: the error wrapper (one line, exit code 2, no traceback), the console, shared options.

The CLI's rule, for every command: **arguments are checked before any model is loaded.**
1. What one option alone can check is declared on the option, from the registries (choices: families, schemes,
   engines, targets; ranges: `min=`/`max=`). typer refuses a bad value with one line and exit code 2
   (usage.py), before the command's function runs.
2. What needs several options, the checkpoint's config.json or a bundle's manifest.json is checked by the
   command's plain function first: `check_*` in run_options.py (engine, dtype, sampling, context limits),
   export/outputs.py (where results go), `pipeline.plan` (export) and the library entry points (quantize,
   init-checkpoint), all of which read only config.json, safetensors headers, manifest.json and the tokenizer.
   Each raises PocketllmError, printed as one line with exit code 2.
3. Only then is a model built, weights read, or an engine / runner created.
tests/cli/test_validation_first.py makes every model loader raise and runs each command with one bad argument.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from pocketllm.export.errors import PocketllmError

console = Console(stderr=True)
EXIT_USER_ERROR = 2


def print_error(message: str) -> None:
    """`error: <message>` on stderr, on one line whatever the terminal width."""
    console.print(f"[bold red]error:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True,
                  emoji=False)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(EXIT_USER_ERROR)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)


def user_errors(fn):
    """Turn PocketllmError (and a Ctrl-C) into a one-line message instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PocketllmError as e:
            fail(str(e))
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def threads_option(help: str = "CPU threads for torch (default: torch's choice, one per core)."):
    return typer.Option(None, "--threads", min=1, help=help)


def force_option():
    return typer.Option(False, "--force", help="Replace OUT if it is a bundle or checkpoint pocketllm wrote (never "
                        "anything else: export/outputs.py).")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
