"""Entry point of the `pocketllm` console script."""

import typer

from pocketllm.export.cli import checkpoint, export_cmd, generate, logits, parity, perplexity, push, quantize

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Put MiniCPM4, SmallThinker and lightning-attention LLMs on phones.")
app.command("init-checkpoint")(checkpoint.init_checkpoint)
app.command("logits")(logits.logits)
app.command("generate")(generate.generate)
app.command("perplexity")(perplexity.perplexity)
app.command("quantize")(quantize.quantize)
app.command("export")(export_cmd.export)
app.command("parity")(parity.parity)
app.add_typer(push.app, name="push")  # push android BUNDLE

if __name__ == "__main__":
    app()
