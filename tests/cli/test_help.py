"""Help shows what a user can type: flags without a value type, arguments by name, every choice option's choices as
the registries list them (families, quantization schemes, targets, engines), and `pocketllm --version`."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.engines import engine_names
from pocketllm.export.cli.main import app
from pocketllm.export.families import families
from pocketllm.export.quant.format import ACT_STATS, SCHEMES
from pocketllm.export.targets import targets

COMMANDS = ["init-checkpoint", "logits", "generate", "perplexity", "quantize", "export", "parity"]


def help_text(*args) -> str:
    r = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    return r.output


def option_row(text: str, option: str) -> str:
    rows = [line for line in text.splitlines() if f" {option} " in line]
    assert rows, (option, text)
    return rows[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_no_value_type_on_flags_and_no_braces_in_usage(command):
    text = help_text(command)
    assert "<bool>" not in text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage


def test_flags_and_arguments():
    assert option_row(help_text("generate"), "--greedy").split("--greedy")[1].split()[0] == "Always"
    assert option_row(help_text("export"), "--force").split("--force")[1].split()[0] == "Replace"
    assert "Usage: root parity [OPTIONS] BUNDLE" in help_text("parity")


def choices(names) -> str:
    return "<" + "|".join(names) + ">"


@pytest.mark.parametrize("command,option,shown", [
    ("init-checkpoint", "--arch", choices(families())),
    ("quantize", "--scheme", choices(SCHEMES)),
    ("quantize", "--act-stat", choices(ACT_STATS)),
    ("export", "--quant", choices(dict.fromkeys(s for t in targets().values() for s in t.quant_schemes))),
    ("export", "--target", choices(targets()) + "[,...]"),
    ("parity", "--target", choices(targets())),
    *[(c, "--engine", choices(engine_names())) for c in ("logits", "generate", "perplexity")],
])
def test_choice_options_show_their_choices_from_the_registries(command, option, shown):
    assert shown in option_row(help_text(command), option)


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout == f"pocketllm {version('pocketllm')}\n"
    assert "--version" in help_text()
