"""App tests: bundles exported once per session through the CLI, the Kotlin core compiled once per session with
Debian's kotlinc (1.3), and the JSON file that hands both to the core's JUnit tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketllm.export.bundle.chat import (VERIFY_CONVERSATIONS, VERIFY_SYSTEM, derive_chat, render_template, template_from_config,
                                token_text)
from pocketllm.export.bundle.schema import SCHEMA_PATH
from pocketllm.export.cli.main import app
from tests.bundle.chat_templates import DECOMPOSABLE
from tests.bundle.manifest_cases import MUTATIONS, example_bundle, example_bundle_with_onnx, mutated

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "android_demo" / "core"
BUILD_SCRIPT = REPO / "android_demo" / "scripts" / "build_executorch_aar.sh"
HOST_KERNELS = REPO / "kernels" / "build" / "libpocketllm_kernels.so"
# Debian packages (make app-tools): kotlin, junit4 (+ hamcrest), libandroid-json-java (Android's org.json)
JARS = {"kotlin-stdlib": "/usr/share/java/kotlin-stdlib.jar", "junit4": "/usr/share/java/junit4.jar",
        "hamcrest": "/usr/share/java/hamcrest-core.jar", "org.json": "/usr/share/java/com.android.json.jar"}
MAX_CONTEXT = 128
EXPORTS = ("minicpm4_dense", "minicpm4_infllm")  # stock ExecuTorch runs the first; the second needs our kernel


def kotlin_toolchain() -> tuple[str, dict[str, str]] | str:
    """(kotlinc, jars) or the reason they are missing."""
    kotlinc = shutil.which("kotlinc")
    missing = [name for name, path in JARS.items() if not Path(path).is_file()]
    if kotlinc is None or missing or shutil.which("java") is None:
        what = ", ".join((["kotlinc"] if kotlinc is None else []) + missing)
        return (f"Kotlin/JVM toolchain incomplete ({what or 'java'} missing): `make app-tools` installs Debian's "
                "kotlin, junit4 and libandroid-json-java")
    return kotlinc, JARS


@pytest.fixture(scope="session")
def core_classes(tmp_path_factory) -> Path:
    """android_demo/core (main + test sources) compiled by one kotlinc run, -Werror. Reused across sessions from
    android_demo/core/build/kotlinc/<hash of sources and compiler> when nothing changed."""
    tools = kotlin_toolchain()
    if isinstance(tools, str):
        pytest.skip(tools)
    kotlinc, jars = tools
    sources = sorted(p for p in (CORE / "src").rglob("*.kt"))
    version = subprocess.run([kotlinc, "-version"], capture_output=True, text=True).stderr.strip().splitlines()[-1]
    key = hashlib.sha256(version.encode())
    for p in sources:
        key.update(str(p.relative_to(CORE)).encode() + b"\0" + p.read_bytes() + b"\0")
    out = CORE / "build" / "kotlinc" / key.hexdigest()[:16]
    if (out / ".complete").is_file():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([kotlinc, "-Werror", "-jvm-target", "1.8", "-cp", f"{jars['org.json']}:{jars['junit4']}",
                        "-d", str(tmp), *map(str, sources)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"kotlinc failed on android_demo/core:\n{r.stdout}\n{r.stderr}")
    (tmp / ".complete").write_text(version + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def run_junit(classes: Path, fixtures: Path) -> subprocess.CompletedProcess:
    test_classes = sorted(p.stem for p in (CORE / "src" / "test" / "kotlin" / "org" / "pocketllm" / "core").glob(
        "*Test.kt"))
    cp = ":".join([str(classes), *JARS.values()])
    return subprocess.run(["java", "-cp", cp, f"-Dpocketllm.fixtures={fixtures}", "org.junit.runner.JUnitCore",
                           *[f"org.pocketllm.core.{c}" for c in test_classes]], capture_output=True, text=True)


@pytest.fixture(scope="session")
def exported_bundles(tmp_path_factory) -> dict[str, Path]:
    """Two small bundles written by `pocketllm export` (one layer each, 128-token context)."""
    from pocketllm.export.bundle.manifest import SCHEMA_VERSION
    from tests.test_executorch_export import configs, make_checkpoint

    if SCHEMA_VERSION != 2:  # skip before paying for the exports
        require_v2({"exporter": None})

    root = tmp_path_factory.mktemp("android-bundles")
    cfgs = configs()
    out = {}
    for i, name in enumerate(EXPORTS):
        ckpt = make_checkpoint(root / f"{name}-ckpt", cfgs[name], seed=20 + i)
        bundle = root / name
        r = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt), "--target", "executorch", "--max-context",
                                     str(MAX_CONTEXT), "--prefill-chunk", "32", "--threads", "1", "--out", str(bundle)])
        assert r.exit_code == 0, r.output
        out[name] = bundle
    return out


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def require_v2(bundles: dict[str, Path | None]) -> None:
    from pocketllm.export.bundle.manifest import SCHEMA_VERSION

    versions = {manifest_of(b)["schema_version"] if b else SCHEMA_VERSION for b in bundles.values()}
    if versions != {2}:
        pytest.skip(f"`pocketllm export` writes manifest schema_version {sorted(versions)}; android_demo/core and "
                    "the JSON Schema read 2 (CONTRACTS.md): these checks run once the exporter writes v2")


def conversations_for(chat: dict) -> list[list[dict[str, str]]]:
    convs = [list(c) for c in VERIFY_CONVERSATIONS]
    if "system" in chat["roles"]:
        convs += [[VERIFY_SYSTEM, *c] for c in convs]
    return convs


def chat_case(name: str, manifest: dict, template: str, bos: str, eos: str) -> dict:
    """Conversations with their Jinja renderings (the leading BOS text, which runtimes add as a token, removed)."""
    lead = bos if bos and render_template(template, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                                          bos_token=bos, eos_token=eos).startswith(bos) else ""
    cases = []
    for conv in conversations_for(manifest["chat"]):
        text = render_template(template, conv, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        assert text.startswith(lead)
        cases.append({"messages": conv, "expected": text[len(lead):]})
    return {"name": name, "manifest": json.dumps(manifest), "conversations": cases}


def bundle_case(bundle: Path) -> dict:
    m = manifest_of(bundle)
    return {"dir": str(bundle), "name": m["name"], "requires_kernels": m["targets"]["executorch"]["requires_kernels"],
            "eos_ids": m["tokenizer"]["eos_ids"], "max_context": m["model"]["max_context"], "files": sorted(m["files"])}


def host_kernels_json(work: Path) -> tuple[str | None, list[str]]:
    """The kernel list the build script writes into the AAR, here for the host-built library (when built)."""
    if not HOST_KERNELS.is_file():
        return None, []
    out = work / "pocketllm_kernels.json"
    subprocess.run(["bash", str(BUILD_SCRIPT), "--kernels-json", str(HOST_KERNELS), str(out)], check=True)
    return str(out), json.loads(out.read_text())["kernels"]


def write_fixtures(path: Path, work: Path, bundles: list[Path], chats: list[dict]) -> Path:
    kernels_json, host_kernels = host_kernels_json(work)
    mutations = [{"name": f"{b.name}: {name}", "expect": expect,
                  "manifest": json.dumps(mutated(manifest_of(b), mutation))}
                 for b in bundles for name, expect, mutation in MUTATIONS]
    path.write_text(json.dumps({
        "schema_path": str(SCHEMA_PATH), "work_dir": str(work), "bundles": [bundle_case(b) for b in bundles],
        "mutations": mutations, "chats": chats, "kernels_json": kernels_json, "host_kernels": host_kernels,
    }, indent=1))
    return path


@pytest.fixture(scope="session")
def example_fixtures(tmp_path_factory) -> Path:
    """The contract's example bundle, plus chat cases for released templates grafted onto its manifest."""
    root = tmp_path_factory.mktemp("android-example")
    bundle, manifest = example_bundle(root)
    chats = []
    for name, (template, bos, eos) in sorted(DECOMPOSABLE.items()):
        chat = derive_chat(template, bos_token=bos, eos_token=eos, eos_ids=manifest["tokenizer"]["eos_ids"])
        m = dict(manifest, chat=chat.to_manifest(), tokenizer=dict(manifest["tokenizer"], chat_template=template))
        chats.append(chat_case(name, m, template, bos, eos))
    work = root / "work"
    work.mkdir()
    with_onnx, _ = example_bundle_with_onnx(root)  # the app keeps an ONNX target's entry and files for display
    return write_fixtures(root / "fixtures.json", work, [bundle, with_onnx], chats)


@pytest.fixture(scope="session")
def exported_fixtures(exported_bundles, tmp_path_factory) -> Path:
    """The exported bundles, with chat cases rendered from each bundle's own tokenizer_config.json template."""
    require_v2(exported_bundles)
    root = tmp_path_factory.mktemp("android-exported")
    chats = []
    for name, bundle in exported_bundles.items():
        cfg = json.loads((bundle / "tokenizer_config.json").read_text())
        template = template_from_config(cfg)
        m = manifest_of(bundle)
        assert m["chat"] is not None and template == m["tokenizer"]["chat_template"]
        chats.append(chat_case(name, m, template, token_text(cfg.get("bos_token")), token_text(cfg.get("eos_token"))))
    work = root / "work"
    work.mkdir()
    return write_fixtures(root / "fixtures.json", work, list(exported_bundles.values()), chats)
