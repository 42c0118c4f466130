"""`pocketllm push android BUNDLE [--serial S]` against a fake adb on PATH (tests/apps/fake_adb.py): what reaches
the device, and one clear line with exit code 2 for each way it can go wrong."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pocketllm.export.cli.main import app
from tests.bundle.manifest_cases import example_bundle

FAKE_ADB = Path(__file__).with_name("fake_adb.py")
REMOTE = "data/local/tmp/pocketllm"


@pytest.fixture
def bundle(tmp_path) -> Path:
    return example_bundle(tmp_path / "bundles", "tiny-example")[0]


@pytest.fixture
def device(tmp_path, monkeypatch):
    """The fake adb first on PATH, a directory standing for the device, and a log of adb invocations."""
    bin_dir, root, log = tmp_path / "bin", tmp_path / "device", tmp_path / "adb.log"
    bin_dir.mkdir()
    root.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_ADB}" "$@"\n')
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554:device")
    monkeypatch.delenv("FAKE_ADB_PUSH", raising=False)
    monkeypatch.delenv("FAKE_ADB_FREE_KIB", raising=False)

    class Device:
        def __init__(self):
            self.root, self.log = root, log

        def calls(self) -> list[str]:
            return log.read_text().splitlines() if log.is_file() else []

        def listing(self) -> list[str]:
            base = root / REMOTE
            return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()) if base.is_dir() else []

    return Device()


def push(*args: str):
    r = CliRunner().invoke(app, ["push", "android", *args])
    return r.exit_code, r.output


def assert_one_line_error(code: int, output: str, *fragments: str):
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for f in fragments:
        assert f in errors[0], output


def test_pushes_what_the_app_reads_and_verifies_it_on_the_device(bundle, device):
    code, out = push(str(bundle))
    assert code == 0, out
    assert device.listing() == ["tiny-example/manifest.json", "tiny-example/model.pte", "tiny-example/tokenizer.json",
                                "tiny-example/tokenizer_config.json"]  # no reference/, no staging directory left
    for name in ("model.pte", "tokenizer.json", "manifest.json"):
        assert (device.root / REMOTE / "tiny-example" / name).read_bytes() == (bundle / name).read_bytes()
    assert "sha256 verified on the device" in out and "emulator-5554:/data/local/tmp/pocketllm/tiny-example" in out
    assert any(c.startswith("-s emulator-5554 shell sha256sum") for c in device.calls())


def test_pushing_again_replaces_the_previous_copy(bundle, device):
    assert push(str(bundle))[0] == 0
    (device.root / REMOTE / "tiny-example" / "stale.bin").write_bytes(b"old")
    assert push(str(bundle))[0] == 0
    assert "tiny-example/stale.bin" not in device.listing()


def test_no_adb(bundle, device, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("ANDROID_HOME", raising=False)
    monkeypatch.delenv("ANDROID_SDK_ROOT", raising=False)
    assert_one_line_error(*push(str(bundle)), "adb not found", "apt-get install adb")


def test_no_device(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    assert_one_line_error(*push(str(bundle)), "no Android device found")


def test_unauthorized_device(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M123:unauthorized")
    assert_one_line_error(*push(str(bundle)), "R58M123 is unauthorized", "Allow USB debugging")
    assert not any(" push " in c for c in device.calls())


def test_offline_device(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M123:offline")
    assert_one_line_error(*push(str(bundle)), "R58M123 is offline")


def test_several_devices_need_a_serial(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554:device,R58M123:device")
    assert_one_line_error(*push(str(bundle)), "several devices connected (emulator-5554, R58M123)", "--serial")
    code, out = push(str(bundle), "--serial", "R58M123")
    assert code == 0, out
    assert "R58M123:" in out and all(c == "devices" or c.startswith("-s R58M123") for c in device.calls())


def test_unknown_serial(bundle, device):
    assert_one_line_error(*push(str(bundle), "--serial", "nope"), "device nope not found", "emulator-5554")


def test_full_disk_is_caught_before_copying(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_FREE_KIB", "100")
    assert_one_line_error(*push(str(bundle)), "not enough space on emulator-5554", "0.1 MiB free")
    assert not any(" push " in c for c in device.calls())


def test_full_disk_while_copying(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_PUSH", "nospace")
    assert_one_line_error(*push(str(bundle)), "disk of emulator-5554 is full", "No space left on device")
    assert device.listing() == []  # the partial copy was removed


def test_corrupt_copy_is_refused_and_removed(bundle, device, monkeypatch):
    monkeypatch.setenv("FAKE_ADB_PUSH", "corrupt")
    assert_one_line_error(*push(str(bundle)), "model.pte on emulator-5554: sha256", "push again")
    assert device.listing() == []


def test_a_local_bundle_that_does_not_match_its_manifest_is_not_pushed(bundle, device):
    (bundle / "model.pte").write_bytes(b"changed")
    assert_one_line_error(*push(str(bundle)), "model.pte: does not match manifest.json")
    assert device.calls() == []


def test_a_bundle_without_an_executorch_program(bundle, device):
    m = json.loads((bundle / "manifest.json").read_text())
    m["targets"] = {"coreml": {"file": "model.mlpackage"}}
    (bundle / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(*push(str(bundle)), "has no ExecuTorch target (targets: coreml)")


def test_not_a_bundle(tmp_path, device):
    assert_one_line_error(*push(str(tmp_path)), "no manifest.json")
