"""The package's import graph: no cycles (module-level or lazy imports alike), and the numpy reference's model math
imports nothing from export/ (only the loader glue reads export's spec reader), so that parity means something."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"export": "pocketllm.export", "runtime_py": "pocketllm.runtime_py"}
# runtime_py modules that compute the model (the rest is glue: loading weights, runners, parity, CLI loops).
MODEL_MATH = ("runtime_py/attention.py", "runtime_py/decoder.py", "runtime_py/mlp.py", "runtime_py/rope.py",
              "runtime_py/ops/", "runtime_py/families/")


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([ROOTS[parts[0]], *parts[1:]])


def imports(path: Path) -> set[str]:
    """Every pocketllm module `path` imports, anywhere in the file, except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
            "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("pocketllm.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for root in ROOTS for p in (REPO / root).rglob("*.py")}
    return {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}


def test_import_graph_has_no_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [node, nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])


def test_reference_model_math_imports_nothing_from_export():
    offenders = {}
    for root in MODEL_MATH:
        paths = sorted((REPO / root).rglob("*.py")) if root.endswith("/") else [REPO / root]
        for p in paths:
            bad = sorted(m for m in imports(p) if m.startswith("pocketllm.export"))
            if bad:
                offenders[str(p.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_cycle_finder_finds_cycles(monkeypatch):
    """The check above can fail: a two-module cycle is reported."""
    import sys

    import pytest

    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: {"a": {"b"}, "b": {"a"}, "c": set()})
    with pytest.raises(AssertionError, match="import cycle"):
        test_import_graph_has_no_cycles()
