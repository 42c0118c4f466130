"""The README's command lines are real (every option it shows exists on that command, every family is listed), it
names what setup needs, and messages about paths say what the path actually is."""

from __future__ import annotations

import re

import pytest
import typer

from pocketllm.export.cli.main import app
from pocketllm.export.families import families
from tests.cli.conftest import assert_one_line_error, invoke
from tests.conftest import REPO, TINY_AUSTEN

README = (REPO / "README.md").read_text()


def readme_command_lines() -> list[tuple[list[str], str]]:
    """(command names, the line with its continuation lines) for every `pocketllm ...` line in a code block."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            if line.lstrip().startswith("pocketllm ") or "&& pocketllm " in line or " pocketllm " in line:
                words = line[line.index("pocketllm ") + len("pocketllm "):].split()
                found.append((words[0].split("|") if not words[0].startswith("-") else [], line))
            elif found and line.startswith(" "):  # a continuation line of the previous command
                names, text = found[-1]
                found[-1] = (names, text + " " + line)
    return found


def options_of(name: str | None) -> set[str]:
    group = typer.main.get_command(app)
    command = group if name is None else group.commands[name]
    return {opt for p in command.params for opt in p.opts if opt.startswith("--")} | {"--help"}


def test_readme_command_lines_use_real_options():
    lines = readme_command_lines()
    assert len(lines) >= 10
    for names, text in lines:
        text = text.split("#")[0]  # drop comments
        for name in names or [None]:
            wrong = {o for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)} - options_of(name)
            assert not wrong, (name, wrong, text)


def test_readme_lists_every_family_and_the_setup_tools():
    arch = re.search(r"init-checkpoint --arch (\S+)", README).group(1)
    assert set(arch.split("|")) == set(families())
    assert "CMake" in README and "C++17 compiler" in README


@pytest.mark.parametrize("make_args,fragment", [
    (lambda f, d: ["logits", "--checkpoint", f, "--tokens", "1", "--out", d / "l.npy"],
     "{f} is a file, not a checkpoint directory"),
    (lambda f, d: ["logits", "--checkpoint", d / "nope", "--tokens", "1", "--out", d / "l.npy"],
     "{d}/nope: checkpoint directory not found"),
    (lambda f, d: ["perplexity", "--checkpoint", TINY_AUSTEN, "--text", d], "{d} is a directory, not a text file"),
    (lambda f, d: ["parity", f], "{f} is a file, not a bundle directory"),
    (lambda f, d: ["quantize", "--checkpoint", TINY_AUSTEN, "--scheme", "int8", "--calibration", d, "--out",
                   d / "q"], "{d} is a directory, not a calibration file"),
])
def test_path_messages_say_what_the_path_is(tmp_path, make_args, fragment):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert_one_line_error(invoke(*make_args(afile, tmp_path)), fragment.format(f=afile, d=tmp_path))


def test_prompts_path_message(nf4_bundle, tmp_path):
    assert_one_line_error(invoke("parity", nf4_bundle[1], "--prompts", tmp_path),
                          f"{tmp_path} is a directory, not a prompts file")
