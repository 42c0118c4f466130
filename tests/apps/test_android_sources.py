"""What can be checked of android_demo without an Android SDK: every Kotlin source (Compose UI and Gradle scripts
included) parses with tree-sitter's Kotlin grammar; `core` stays plain Kotlin/JVM; versions agree with the Python
side; the AAR build script is valid bash, fails early with clear messages, and reads the registered ops from a
kernel library."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "android_demo"
SCRIPT = DEMO / "scripts" / "build_executorch_aar.sh"
HOST_KERNELS = REPO / "kernels" / "build" / "libpocketllm_kernels.so"


def kotlin_sources() -> list[Path]:
    return sorted(p for p in DEMO.rglob("*")
                  if p.suffix in (".kt", ".kts") and "build" not in p.relative_to(DEMO).parts)


@pytest.fixture(scope="module")
def parser():
    from tree_sitter import Language, Parser
    import tree_sitter_kotlin

    return Parser(Language(tree_sitter_kotlin.language()))


def syntax_errors(parser, source: bytes) -> list[str]:
    """ERROR and MISSING nodes as 'line:column: text'."""
    out, stack = [], [parser.parse(source).root_node]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            line, col = node.start_point
            text = source[node.start_byte:node.end_byte].decode(errors="replace")[:60]
            out.append(f"{line + 1}:{col + 1}: {'missing ' + node.type if node.is_missing else repr(text)}")
            continue
        stack.extend(node.children)
    return out


def test_the_app_and_core_sources_are_all_there():
    names = {p.relative_to(DEMO).as_posix() for p in kotlin_sources()}
    assert {"settings.gradle.kts", "build.gradle.kts", "app/build.gradle.kts", "core/build.gradle.kts",
            "app/src/main/java/org/pocketllm/demo/MainActivity.kt",
            "app/src/main/java/org/pocketllm/demo/ChatViewModel.kt",
            "app/src/main/java/org/pocketllm/demo/engine/ExecutorchEngine.kt",
            "app/src/main/java/org/pocketllm/demo/ui/ChatScreen.kt",
            "core/src/main/kotlin/org/pocketllm/core/ManifestParser.kt"} <= names


@pytest.mark.parametrize("path", kotlin_sources(), ids=lambda p: p.relative_to(DEMO).as_posix())
def test_kotlin_source_parses(parser, path):
    errors = syntax_errors(parser, path.read_bytes())
    assert not errors, f"{path.relative_to(REPO)}: " + "; ".join(errors[:5])


def test_the_parse_check_finds_broken_code(parser):
    assert syntax_errors(parser, b"fun ok() = 1\n")  == []
    assert syntax_errors(parser, b"fun broken( {\n    val x = \n}\n")
    assert syntax_errors(parser, b"@Composable fun A() { Column { Text(\"hi\" } }\n")


def test_core_is_plain_kotlin_jvm():
    """core/ compiles with Debian's kotlinc 1.3 and with Kotlin 2.x: no Android classes, and none of the stdlib
    calls Kotlin 2.x rejects though 1.3 accepts them (case conversion without a locale, appendln, sumBy, ...)."""
    banned = re.compile(r"^import (android|androidx)\.|\.(toUpperCase|toLowerCase|capitalize|decapitalize|sumBy|"
                        r"sumByDouble)\(|\bappendln\(|\.(max|min)\(\)", re.M)
    for path in (DEMO / "core" / "src").rglob("*.kt"):
        hits = banned.findall(path.read_text())
        assert not hits, f"{path.relative_to(REPO)}: {hits}"


def test_executorch_version_matches_the_wheel():
    catalog = tomllib.loads((DEMO / "gradle" / "libs.versions.toml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pin = next(d.split("==")[1] for d in pyproject["project"]["dependencies"] if d.startswith("executorch=="))
    assert catalog["versions"]["executorch"] == pin
    assert int(catalog["versions"]["minSdk"]) >= 28


# ---- scripts/build_executorch_aar.sh -------------------------------------------------------------------------

def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_build_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)


def test_build_script_fails_early_naming_each_missing_input(tmp_path):
    r = run_script("--check", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": "/nonexistent"})
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert any("ANDROID_NDK is not set" in e for e in errors), r.stderr
    assert any("ANDROID_HOME is not set" in e for e in errors), r.stderr
    assert any("no Python found" in e for e in errors), r.stderr
    assert "builds nothing" in r.stderr


def test_build_script_refuses_a_directory_that_is_not_an_ndk(tmp_path):
    r = run_script("--check", env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ANDROID_NDK": str(tmp_path)})
    assert r.returncode == 2
    assert f"ANDROID_NDK={tmp_path} has no build/cmake/android.toolchain.cmake" in r.stderr


def pocketllm_out_ops() -> list[str]:
    """The `.out` overload of every op export/ops registers with torch.library (what the kernel library implements)."""
    import torch

    import pocketllm.export.ops  # noqa: F401  (registers the ops)

    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pocketllm::") and n.endswith(".out"))


@pytest.mark.skipif(not HOST_KERNELS.is_file(), reason="kernels/build/libpocketllm_kernels.so not built (make kernels)")
def test_build_script_reads_the_registered_ops_from_a_kernel_library(tmp_path):
    r = run_script("--list-ops", str(HOST_KERNELS))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == pocketllm_out_ops()
    out = tmp_path / "pocketllm_kernels.json"
    assert run_script("--kernels-json", str(HOST_KERNELS), str(out)).returncode == 0
    listing = json.loads(out.read_text())
    assert listing["format"] == 1 and listing["abi"] == "arm64-v8a" and listing["kernels"] == pocketllm_out_ops()


def test_build_script_refuses_a_library_without_pocketllm_ops(tmp_path):
    lib = tmp_path / "libother.so"
    lib.write_bytes(b"\x7fELF not a kernel library aten::add.out")
    r = run_script("--list-ops", str(lib))
    assert r.returncode == 2 and "registers no pocketllm::*.out operators" in r.stderr
