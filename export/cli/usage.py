"""How the CLI presents itself, CLI-wide, in one place: the typer group and command classes main.py registers.

- Usage errors (a value outside an option's range or choices, an unknown option, a missing one) print one line,
  `error: ...`, and exit with code 2, as PocketllmError does (common.py); typer would print a five-line box.
- Help: flags show no value type (`--greedy`, not `--greedy <bool>`), arguments show their name (`BUNDLE`, not
  `{bundle}`).

typer 0.29 carries its own copy of click (typer._click, pinned with typer in pyproject.toml): its exceptions are
the ones raised here.
"""

from __future__ import annotations

import re
import sys

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from pocketllm.export.cli.common import EXIT_USER_ERROR, console, print_error


def one_line(e: ClickException) -> str:
    """click's message as one line, without typer's validation prefixes ("Value error, ")."""
    message = re.sub(r"\bValue error, ", "", e.format_message())
    message = " ".join(message.split())
    ctx = getattr(e, "ctx", None)
    if ctx is not None:
        message += f" (see {ctx.command_path} --help)"
    return message


class Group(TyperGroup):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:  # `pocketllm` alone: the help, as typer prints it
            if e.format_message().strip():
                e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            print_error(one_line(e))
            sys.exit(EXIT_USER_ERROR if e.exit_code == 2 else e.exit_code)
        except typer.Abort:
            console.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class Command(TyperCommand):
    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
                p.metavar = ""  # a flag takes no value: show none
        return params

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name).upper()
                pieces.append(name if p.required else f"[{name}]")
            else:
                pieces.extend(p.get_usage_pieces(ctx))
        return pieces
