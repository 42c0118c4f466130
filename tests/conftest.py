"""Shared fixtures: tiny checkpoints in the exact upstream layout, written by our own init-checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pocketllm.export.init_checkpoint import init_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_AUSTEN = REPO / "models" / "tiny-austen"
AUSTEN_DATA = REPO.parent / "shared" / "data" / "austen"


def edit_config(directory: Path, **changes) -> Path:
    """Rewrite config.json with keys changed (value None deletes the key)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """fp32 tiny checkpoints: minicpm4 (InfLLM v2 + LongRoPE), minicpm4 dense, smallthinker (NoPE/SWA, sigmoid
    router), smallthinker with softmax router."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        "minicpm4_sparse": init_checkpoint("minicpm4", "tiny", root / "minicpm4_sparse", seed=1, dtype="fp32"),
        "smallthinker_sigmoid": init_checkpoint("smallthinker", "tiny", root / "st_sigmoid", seed=2, dtype="fp32"),
    }
    dense = root / "minicpm4_dense"
    shutil.copytree(dirs["minicpm4_sparse"], dense)
    dirs["minicpm4_dense"] = edit_config(dense, sparse_config=None)
    soft = root / "st_softmax"
    shutil.copytree(dirs["smallthinker_sigmoid"], soft)
    dirs["smallthinker_softmax"] = edit_config(soft, moe_primary_router_apply_softmax=True)
    return dirs


@pytest.fixture
def tiny_copy(tiny_dirs, tmp_path):
    """A private copy of a tiny checkpoint that a test may break."""

    def make(name: str = "minicpm4_dense") -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_dirs[name], dst)
        return dst

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run ~3x faster on one torch thread on a busy 2-core CPU (no effect on results beyond rounding).
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
