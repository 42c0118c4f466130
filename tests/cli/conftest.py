"""What the CLI tests share: one tiny ExecuTorch bundle per session, the one-line error check, and tree hashes that
prove inputs were left untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from tests.test_checkpoint_errors import assert_one_line_error  # noqa: F401  (re-exported for the CLI tests)

BUNDLE_CONTEXT = 64  # the session bundle's --max-context
runner = CliRunner()


def invoke(*args) -> "Result":  # noqa: F821
    return runner.invoke(app, [str(a) for a in args])


def pocketllm(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `pocketllm ARGS` in a fresh process (the console script's module), as a user would."""
    return subprocess.run([sys.executable, "-m", "pocketllm.export.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def tree_hash(path: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `path` (or of `path` itself), plus "" -> 'dir' for a directory."""
    path = Path(path)
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {"": "dir"} if path.is_dir() else {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            out[p.relative_to(path).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="session")
def nf4_bundle(tmp_path_factory):
    """(checkpoint, bundle, export's stderr): a 1-layer tiny MiniCPM4 exported once with --quant nf4 --group-size 32
    --max-context 64 (~20-40 s of lowering), beside an unrelated `bundle.nf4-checkpoint/` folder. Tests that change
    the bundle work on a copy (`bundle_copy`). Exported by the console entry point in a fresh process, so that
    its stderr is what a user sees (test_process.py reads it)."""
    from tests.test_executorch_export import configs, make_checkpoint
    from tests.kernels import build_kernels

    build_kernels()
    root = tmp_path_factory.mktemp("cli-bundle")
    ckpt = make_checkpoint(root / "ckpt", configs()["minicpm4_dense"], seed=5)
    bundle = root / "bundle"
    sibling = root / "bundle.nf4-checkpoint"  # where export used to write --quant weights (and replace them)
    sibling.mkdir()
    (sibling / "notes.txt").write_text("not pocketllm's")
    proc = pocketllm("export", "--checkpoint", ckpt, "--quant", "nf4", "--group-size", 32, "--max-context",
                     BUNDLE_CONTEXT, "--out", bundle, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ckpt, bundle, proc.stderr


@pytest.fixture
def bundle_copy(nf4_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(nf4_bundle[1], dst)
    return dst
