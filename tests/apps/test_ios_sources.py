"""ios_demo/: the iOS app and its Swift package PocketLLMKit.

No Swift compiler runs on this machine, so what is checked here is: every Swift source parses with tree-sitter's Swift
grammar (syntax only); the XcodeGen spec, the xcconfig and the kernel build script agree with each other and with the
exporter's ExecuTorch version; the build script refuses to run off macOS with a clear message. Where a real Swift
toolchain is on PATH (a Mac, or Linux with swift.org's toolchain), the exporter writes fixture bundles in this run
and `swift build` / `swift test` run PocketLLMKit's platform-free core against them (POCKETLLM_CORE_ONLY=1: no
network, no Apple SDK).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_AUSTEN

IOS = REPO / "ios_demo"
PACKAGE = IOS / "PocketLLMKit"
BUILD_SCRIPT = IOS / "scripts" / "build_executorch_frameworks.sh"
SKIP_DIRS = {".build", "build", "DerivedData", ".swiftpm"}


def swift_sources() -> list[Path]:
    return sorted(p for p in IOS.rglob("*.swift") if not SKIP_DIRS.intersection(p.relative_to(IOS).parts))


def swift_parser():
    # Pinned in pyproject.toml's dev extra: a missing grammar fails here rather than skipping the check.
    import tree_sitter
    import tree_sitter_swift

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))


def syntax_errors(parser, source: bytes) -> list[str]:
    """'line:column: snippet' of every ERROR or MISSING node."""
    found = []
    lines = source.decode("utf-8").splitlines()

    def walk(node):
        if node.type == "ERROR" or node.is_missing:
            row, col = node.start_point
            what = f"missing {node.type}" if node.is_missing else "unexpected"
            found.append(f"{row + 1}:{col + 1}: {what}: {lines[row].strip()[:100] if row < len(lines) else ''}")
        if node.has_error:
            for child in node.children:
                walk(child)

    walk(parser.parse(source).root_node)
    return found


def test_every_swift_source_parses():
    parser = swift_parser()
    sources = swift_sources()
    names = {p.relative_to(IOS).as_posix() for p in sources}
    # The parts the app is made of: if one goes missing, this test should say so rather than parse less.
    for required in ["PocketLLMKit/Package.swift", "PocketLLMKit/Sources/PocketLLMCore/Manifest.swift",
                     "PocketLLMKit/Sources/PocketLLMEngines/CoreMLEngine.swift",
                     "PocketLLMKit/Sources/PocketLLMEngines/ExecuTorchEngine.swift",
                     "PocketLLM/PocketLLMApp.swift"]:
        assert required in names, required
    problems = {name: errs for name, errs in
                ((p.relative_to(IOS).as_posix(), syntax_errors(parser, p.read_bytes())) for p in sources) if errs}
    assert not problems, json.dumps(problems, indent=2)


def test_the_parser_rejects_broken_swift():
    """The check above can fail: the grammar reports the mistakes a careless edit makes."""
    parser = swift_parser()
    assert syntax_errors(parser, b"func f(x: Int {\n    return x\n}\n")
    assert syntax_errors(parser, b"let a = [1, 2\nstruct S {}\n")
    assert not syntax_errors(parser, b"actor A { func f() async throws -> [Float] { try await g() } }\n")


def test_build_script_syntax_and_early_failure_off_macos():
    assert subprocess.run(["bash", "-n", str(BUILD_SCRIPT)]).returncode == 0
    r = subprocess.run(["bash", str(BUILD_SCRIPT), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --no-such-option" in r.stderr
    if platform.system() != "Darwin":
        r = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2
        assert r.stderr.strip() == f"error: this script builds iOS libraries and needs macOS with Xcode (this is {platform.system()})"
        assert not (IOS / "build" / "kernels").exists(), "nothing is written before the checks pass"


def test_build_script_records_the_kernels_the_sources_register():
    """The script compares the op names in the built archive with these source registrations: the patterns must
    find every op the kernel sources register, i.e. the `.out` overload of every op export/ops defines."""
    script = BUILD_SCRIPT.read_text()
    patterns = re.findall(r"sed -nE '(s/.*?/p)'", script)
    assert len(patterns) == 2
    found = set()
    for pattern in patterns:
        r = subprocess.run(["sed", "-nE", pattern, *map(str, sorted((REPO / "kernels").glob("*.cpp")))],
                           capture_output=True, text=True, check=True)
        found |= set(r.stdout.split())
    import torch

    import pocketllm.export.ops  # noqa: F401  (registers the ops)

    assert found == {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pocketllm::") and
                     n.endswith(".out")}
    assert found >= {"pocketllm::any4_linear.out", "pocketllm::infllm_attention.out",
                     "pocketllm::lightning_attention.out"}


def test_project_spec_build_settings_and_script_agree():
    import yaml  # PyYAML comes with transformers (dev extra)

    spec = yaml.safe_load((IOS / "project.yml").read_text())
    app = spec["targets"]["PocketLLM"]
    assert spec["options"]["deploymentTarget"]["iOS"] == "18.0"
    assert (IOS / spec["packages"]["PocketLLMKit"]["path"] / "Package.swift").is_file()
    assert {"package": "PocketLLMKit", "product": "PocketLLMEngines"} in app["dependencies"]
    info = app["info"]["properties"]
    assert info["UIFileSharingEnabled"] is True and info["LSSupportsOpeningDocumentsInPlace"] is True
    # The kernel list travels build script -> xcconfig -> Info.plist -> KernelCheck.infoPlistKey.
    assert info["PocketLLMLinkedKernels"] == "$(POCKETLLM_LINKED_KERNELS)"
    assert 'infoPlistKey = "PocketLLMLinkedKernels"' in (
        PACKAGE / "Sources/PocketLLMCore/KernelCheck.swift").read_text()
    xcconfig_name = app["configFiles"]["Release"]
    xcconfig = (IOS / xcconfig_name).read_text()
    include = re.search(r'#include\? "(.*Kernels\.xcconfig)"', xcconfig).group(1)
    assert ((IOS / xcconfig_name).parent / include).resolve() == (IOS / "build/kernels/Kernels.xcconfig").resolve()
    script = BUILD_SCRIPT.read_text()
    assert 'OUT="$IOS_DEMO/build/kernels"' in script and 'cat > "$OUT/Kernels.xcconfig"' in script
    for setting in ("POCKETLLM_KERNELS_LDFLAGS", "POCKETLLM_LINKED_KERNELS"):
        assert f"{setting} =" in xcconfig and f"{setting} =" in script, setting
    assert "-force_load" in script and "$(POCKETLLM_KERNELS_LDFLAGS)" in xcconfig


def test_package_pins_match_the_exporter():
    """The app's ExecuTorch runtime is the version the exporter writes programs for; swift-transformers is exact."""
    from importlib.metadata import version

    manifest = (PACKAGE / "Package.swift").read_text()
    et = version("executorch").split("+")[0]
    assert f'branch: "swiftpm-{et}"' in manifest
    assert f'ET_VERSION="{et}"' in BUILD_SCRIPT.read_text()
    assert re.search(r'swift-transformers", exact: "\d+\.\d+\.\d+"', manifest)


# ---- with a Swift toolchain: the exporter writes fixture bundles, XCTest reads them -----------------------------------

def swift_toolchain() -> tuple[str | None, str]:
    exe = shutil.which("swift")
    if exe is None:
        return None, "no `swift` on PATH (Swift toolchain: macOS with Xcode, or swift.org's Linux toolchain)"
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`{exe} --version` failed: {e}"
    if "Swift version" not in r.stdout + r.stderr:
        return None, f"`{exe}` is not a Swift toolchain (OpenStack's `swift` client?)"
    return exe, (r.stdout + r.stderr).strip().splitlines()[0]


def export_bundle(checkpoint: Path, target: str, out: Path, *extra: str) -> dict:
    from typer.testing import CliRunner

    from pocketllm.export.cli.main import app

    r = CliRunner().invoke(app, ["export", "--checkpoint", str(checkpoint), "--target", target, "--out", str(out),
                                 "--max-context", "128", "--threads", "1", *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "manifest.json").read_text())


def chat_cases(bundle: Path, manifest: dict, relative: str) -> list[dict]:
    """Conversations and their rendering by transformers' apply_chat_template (Jinja) with the bundle's template."""
    template = manifest["tokenizer"].get("chat_template")
    if not template or not manifest.get("chat"):
        return []
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(bundle / "tokenizer.json"))
    turns = [{"role": "user", "content": "Who is Emma Woodhouse?"},
             {"role": "assistant", "content": "A young woman of Highbury,\nhandsome, clever, and rich."},
             {"role": "user", "content": "And Mr. Knightley?"}]
    systems = [""] + (["You answer in one sentence."] if "system" in manifest["chat"]["roles"] else [])
    cases = []
    for system in systems:
        for messages in (turns[:1], turns):
            full = ([{"role": "system", "content": system}] if system else []) + messages
            expected = tok.apply_chat_template(full, chat_template=template, tokenize=False, add_generation_prompt=True)
            cases.append({"bundle": relative, "system": system, "messages": messages, "expected": expected})
    return cases


def test_swift_core_builds_and_passes_its_tests_on_exported_bundles(tmp_path_factory, request):
    swift, why = swift_toolchain()
    if swift is None:
        pytest.skip(why)
    from pocketllm.export.targets import targets

    TARGETS = targets()

    tiny_dirs = request.getfixturevalue("tiny_dirs")  # only when the test runs: writing them takes a while

    root = tmp_path_factory.mktemp("ios-fixtures")
    # with an ONNX folder beside the .pte when that target exists: the app decodes the entry and offers ExecuTorch
    both = "executorch,onnx" if "onnx" in TARGETS else "executorch"
    exported = [("bundles/austen-executorch", "executorch",
                 export_bundle(TINY_AUSTEN, both, root / "bundles/austen-executorch", "--prefill-chunk", "32"))]
    if "coreml" in TARGETS:
        exported.append(("bundles/tiny-coreml", "coreml",
                         export_bundle(tiny_dirs["minicpm4_dense"], "coreml", root / "bundles/tiny-coreml")))
    versions = {m.get("schema_version") for _, _, m in exported}
    if versions != {2}:
        pytest.skip(f"the exporter writes manifest schema_version {sorted(map(str, versions))}; PocketLLMKit reads 2")

    bundles, cases = [], []
    for relative, target, m in exported:
        bundles.append({"path": relative, "target": target, "name": m["name"],
                        "vocab_size": m["model"]["vocab_size"], "max_context": m["model"]["max_context"],
                        "eos_ids": m["tokenizer"]["eos_ids"],
                        "requires_kernels": m["targets"][target].get("requires_kernels", []),
                        "file_count": len(m["files"])})
        cases += chat_cases(root / relative, m, relative)
    (root / "fixtures.json").write_text(json.dumps({"bundles": bundles, "chat_cases": cases}, indent=2))

    env = {**os.environ, "POCKETLLM_CORE_ONLY": "1", "POCKETLLM_IOS_FIXTURES": str(root)}
    scratch = ["--package-path", str(PACKAGE), "--scratch-path", str(root / ".build")]
    build = subprocess.run([swift, "build", *scratch, "--target", "PocketLLMCore"], env=env, capture_output=True,
                           text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    test = subprocess.run([swift, "test", *scratch], env=env, capture_output=True, text=True, timeout=1800)
    output = test.stdout + test.stderr
    assert test.returncode == 0, output[-8000:]
    summary = re.findall(r"Executed (\d+) tests?, with (?:(\d+) tests? skipped and )?(\d+) failures?", output)
    assert summary, output[-4000:]
    executed, skipped, failures = summary[-1]
    assert int(failures) == 0
    # Skips allowed: the Core ML tests without a Core ML fixture (4), the chat test without a chat template (1).
    allowed = (0 if any(t == "coreml" for _, t, _ in exported) else 4) + (0 if cases else 1)
    assert int(skipped or 0) <= allowed, output[-4000:]


# ---- Core ML bundles: the names the app's engine reads are exactly the ones the package defines -----------------------

def test_coreml_manifest_names_are_the_package_names(tmp_path, request):
    """CoreMLEngine takes function, input, output and state names from targets.coreml; they must be exactly the
    names model.mlpackage defines (read from its spec with coremltools, on any OS)."""
    from pocketllm.export.targets import targets

    TARGETS = targets()

    if "coreml" not in TARGETS:
        pytest.skip("this checkout has no Core ML target (export/targets has no 'coreml')")
    import coremltools as ct

    tiny_dirs = request.getfixturevalue("tiny_dirs")
    bundle = tmp_path / "tiny-coreml"
    manifest = export_bundle(tiny_dirs["minicpm4_dense"], "coreml", bundle)
    target = manifest["targets"]["coreml"]
    spec = ct.utils.load_spec(str(bundle / target["file"]))
    described = {f.name: f for f in spec.description.functions} or {
        spec.description.defaultFunctionName or "main": spec.description}
    for role in ("prefill", "decode"):
        function = target["functions"][role]
        assert function["name"] in described, (role, function["name"], sorted(described))
        d = described[function["name"]]
        assert {i["name"] for i in function["inputs"]} == {f.name for f in d.input}, role
        assert {o["name"] for o in function["outputs"]} == {f.name for f in d.output}, role
        assert {s["name"] for s in target["states"]} == {f.name for f in d.state}, role
        assert {i["role"] for i in function["inputs"]} == {"tokens", "position"}, role
        assert [o["role"] for o in function["outputs"]].count("logits") == 1, role
    assert target["prefill_chunk"] == next(
        i["shape"][-1] for i in target["functions"]["prefill"]["inputs"] if i["role"] == "tokens")
