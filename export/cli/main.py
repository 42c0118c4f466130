"""Entry point of the `pocketllm` console script."""

from pocketllm.export.cli.process import prepare_process

prepare_process()  # before anything imports torch: OpenMP reads its wait policy once, when torch loads it

import typer  # noqa: E402

from pocketllm.export.cli import (checkpoint, export_cmd, generate, logits, parity, perplexity,  # noqa: E402
                                  push, quantize)
from pocketllm.export import version  # noqa: E402
from pocketllm.export.cli.usage import Command, Group  # noqa: E402


def _show_version(value: bool) -> None:
    if value:
        print(f"pocketllm {version()}")
        raise typer.Exit()


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Put MiniCPM4, SmallThinker and lightning-attention LLMs on phones.")


@app.callback()
def _options(show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                               help="Print pocketllm's version and exit.")):
    pass


for name, command in (("init-checkpoint", checkpoint.init_checkpoint), ("logits", logits.logits),
                      ("generate", generate.generate), ("perplexity", perplexity.perplexity),
                      ("quantize", quantize.quantize), ("export", export_cmd.export), ("parity", parity.parity)):
    app.command(name, cls=Command)(command)
app.add_typer(push.app, name="push")  # push android BUNDLE

if __name__ == "__main__":
    app()
