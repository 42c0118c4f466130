"""One stem per op: every op in the `pocketllm` torch library has its schema file (export/ops/<stem>.py), a numpy
twin (runtime_py/ops/<stem>.py), a C++ kernel (kernels/<stem>.{h,cpp}), a test file (tests/ops/test_<stem>.py) and a
declared lowering in every registered target. The stem of an op is the longest op-module name it starts with
(`moe_ffn_any4` lives in moe_ffn.py beside `moe_ffn`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pocketllm.export.ops
from pocketllm.export.ops import OP_MODULES
from pocketllm.export.targets import targets
from pocketllm.export.targets.base import LOWERING_KINDS

REPO = Path(__file__).resolve().parents[2]


def library_ops() -> list[str]:
    """Functional op names registered under the pocketllm namespace (the `.out` overloads are their twins)."""
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pocketllm::")}
    return sorted(n for n in names if "." not in n)


def stem(op: str) -> str:
    matches = [m for m in OP_MODULES if op == m or op.startswith(m + "_")]
    assert matches, f"op {op} is defined in no export/ops/<stem>.py whose name it starts with"
    return max(matches, key=len)


OPS = library_ops()


def test_the_library_holds_the_ops_of_every_op_module():
    assert pocketllm.export.ops.OP_MODULES and {stem(op) for op in OPS} == set(OP_MODULES)
    assert all(f"pocketllm::{op}.out" in torch._C._dispatch_get_all_op_names() for op in OPS)


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_stem_everywhere(op):
    s = stem(op)
    missing = [p for p in (f"export/ops/{s}.py", f"runtime_py/ops/{s}.py", f"kernels/{s}.h", f"kernels/{s}.cpp",
                           f"tests/ops/test_{s}.py") if not (REPO / p).is_file()]
    assert missing == [], f"op {op} (stem {s}) lacks {', '.join(missing)}"


@pytest.mark.parametrize("target", sorted(targets()))
@pytest.mark.parametrize("op", OPS)
def test_every_target_declares_how_it_runs_every_op(target, op):
    lowering = targets()[target].lowerings.get(op)
    assert lowering is not None, f"target {target} declares no lowering of {op} (export/targets/{target}/ops.py)"
    assert lowering.kind in LOWERING_KINDS and lowering.detail
    if lowering.kind == "kernel":
        assert (REPO / lowering.detail).is_file(), lowering.detail


def test_a_missing_part_fails(monkeypatch, tmp_path):
    """The checks above can fail: an op stem without its numpy twin is reported."""
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    with pytest.raises(AssertionError, match="lacks"):
        test_every_op_has_its_stem_everywhere(OPS[0])
