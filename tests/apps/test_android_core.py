"""android_demo/core (plain Kotlin/JVM) compiled with Debian's kotlinc and its JUnit 4 tests run on what the Python
side wrote in this session: bundles exported by `pocketllm export`, broken manifests the JSON Schema refuses, and
conversations rendered by the Jinja templates (tests/apps/conftest.py).

The JUnit tests load every bundle, detect a tampered, truncated or missing file, refuse unknown schema versions
and every broken manifest with the key Python names, format multi-turn chats byte-identically to the Jinja
rendering, and check requires_kernels against the stock runtime and against the build script's kernel list."""

from __future__ import annotations

import re

from pocketllm.export.bundle.schema import validate_manifest
from tests.apps.conftest import EXPORTS, manifest_of, require_v2, run_junit


def junit_summary(output: str) -> str:
    m = re.search(r"^(OK \(\d+ tests?\)|Tests run: \d+,\s+Failures: \d+)", output, re.M)
    return m.group(1) if m else "no JUnit summary"


def assert_junit_passes(core_classes, fixtures):
    r = run_junit(core_classes, fixtures)
    assert r.returncode == 0 and "OK (" in r.stdout, \
        f"{junit_summary(r.stdout)}\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
    return int(re.search(r"OK \((\d+) tests?\)", r.stdout).group(1))


def test_core_on_the_contract_example_bundle(core_classes, example_fixtures):
    """The example bundle of CONTRACTS.md and chat formats derived from released templates (Llama 3, Gemma, ...)."""
    assert assert_junit_passes(core_classes, example_fixtures) >= 30


def test_core_on_exported_bundles(core_classes, exported_fixtures):
    assert assert_junit_passes(core_classes, exported_fixtures) >= 30


def test_exported_manifests_validate_against_the_schema(exported_bundles):
    require_v2(exported_bundles)
    for name, bundle in exported_bundles.items():
        validate_manifest(manifest_of(bundle), where=f"{name}/manifest.json")


def test_requires_kernels_names_the_pocketllm_ops_of_each_program(exported_bundles):
    require_v2(exported_bundles)
    needs = {name: manifest_of(b)["targets"]["executorch"]["requires_kernels"] for name, b in exported_bundles.items()}
    assert needs == {"minicpm4_dense": [], "minicpm4_infllm": ["pocketllm::infllm_attention.out"]}
    assert set(needs) == set(EXPORTS)


def test_junit_failures_are_reported(core_classes, example_fixtures, tmp_path):
    """The harness itself: a fixture file whose bundle is not what it claims makes the JUnit run fail."""
    import json

    data = json.loads(example_fixtures.read_text())
    data["bundles"][0]["requires_kernels"] = ["pocketllm::not_a_kernel.out"]
    broken = tmp_path / "fixtures.json"
    broken.write_text(json.dumps(data))
    r = run_junit(core_classes, broken)
    assert r.returncode != 0 and "Failures:" in r.stdout, r.stdout[-3000:]
    assert "everyBundleLoadsWithWhatTheExporterWrote" in r.stdout
