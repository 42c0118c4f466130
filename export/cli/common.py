"""What every command shares: the error wrapper (one line, exit code 2, no traceback) and the console."""

from __future__ import annotations

import functools
import os
import sys

import typer
from rich.console import Console

from pocketllm.export.errors import PocketllmError

console = Console(stderr=True)
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


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


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    if "pytest" not in sys.modules:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
