"""`pocketllm push android BUNDLE`: copy what android_demo reads to a phone over adb and check it there.

Copied: manifest.json, the ExecuTorch program and the tokenizer files (other targets' artifacts and the parity
reference stay behind). They go to /data/local/tmp/pocketllm/.<name>.partial/ first, are hashed on the device with
`sha256sum` against the manifest, and only then renamed to /data/local/tmp/pocketllm/<name>/, so the app never sees
a half-copied bundle. Every failure (no adb, no device, an unauthorized device, several devices and no --serial,
a full disk, a corrupt copy) is one PocketllmError line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pocketllm.export.errors import PocketllmError

DEVICE_ROOT = "/data/local/tmp/pocketllm"
BUNDLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")  # manifest.schema.json $defs/bundle_name


@dataclass(frozen=True)
class PushResult:
    serial: str
    remote_dir: str
    files: list[str]
    bytes: int


def find_adb() -> str:
    adb = shutil.which("adb")
    if adb is None:
        sdk = os.environ.get("ANDROID_HOME") or os.environ.get("ANDROID_SDK_ROOT")
        candidate = Path(sdk, "platform-tools", "adb") if sdk else None
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
        raise PocketllmError("adb not found: install Android platform-tools (Debian/Ubuntu: apt-get install adb) "
                             "or put adb on PATH")
    return adb


def _last_line(p: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (p.stderr + "\n" + p.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {p.returncode}"


class Adb:
    def __init__(self, exe: str, serial: str | None = None):
        self.exe, self.serial = exe, serial

    def run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [self.exe, *(["-s", self.serial] if self.serial else []), *args]
        try:
            return subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise PocketllmError(f"cannot run {self.exe}: {e.strerror}") from None

    def shell(self, command: str) -> subprocess.CompletedProcess:
        return self.run("shell", command)

    def devices(self) -> list[tuple[str, str]]:
        """[(serial, state)] from `adb devices`; state: device, unauthorized, offline, no permissions, ..."""
        p = Adb(self.exe).run("devices")
        if p.returncode != 0:
            raise PocketllmError(f"`adb devices` failed: {_last_line(p)}")
        out = []
        for line in p.stdout.splitlines():
            if not line.strip() or line.startswith(("List of devices", "*")):
                continue
            serial, _, state = line.partition("\t")
            out.append((serial.strip(), state.strip()))
        return out


def pick_device(devices: list[tuple[str, str]], serial: str | None) -> str:
    if not devices:
        raise PocketllmError("no Android device found (`adb devices` lists none): connect one with USB debugging on")
    if serial is None:
        if len(devices) > 1:
            raise PocketllmError(f"several devices connected ({', '.join(s for s, _ in devices)}): choose one with "
                                 "--serial")
        serial, state = devices[0]
    else:
        states = dict(devices)
        if serial not in states:
            raise PocketllmError(f"device {serial} not found (`adb devices` lists: "
                                 f"{', '.join(s for s, _ in devices)})")
        state = states[serial]
    if state == "unauthorized":
        raise PocketllmError(f"device {serial} is unauthorized: unlock it and accept the 'Allow USB debugging' prompt")
    if state == "offline":
        raise PocketllmError(f"device {serial} is offline: reconnect it (or run `adb kill-server`) and try again")
    if state.startswith("no permissions"):
        raise PocketllmError(f"no permission to use device {serial} ({state}): set up udev rules for it")
    if state != "device":
        raise PocketllmError(f"device {serial} is not ready (state {state!r})")
    return serial


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def bundle_files(bundle: Path) -> tuple[str, dict[str, dict]]:
    """(device directory name, {relative path: {sha256, size}}) of what the app reads, checked locally first."""
    from pocketllm.export.bundle.schema import relpath_pattern

    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not path.is_file():
        raise PocketllmError(f"{bundle}: no manifest.json (is it a bundle written by `pocketllm export`?)")
    try:
        m = json.loads(path.read_text())
        files, target, tok_files = m["files"], m["targets"].get("executorch"), m["tokenizer"]["files"]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PocketllmError(f"{path}: not a pocketllm manifest ({e.__class__.__name__}: {e})") from None
    if target is None:
        raise PocketllmError(f"{bundle} has no ExecuTorch target (targets: {', '.join(m['targets'])}): the Android "
                             "app runs .pte programs; export with --target executorch")
    name = m.get("name", bundle.resolve().name)
    if not BUNDLE_NAME.match(name):
        raise PocketllmError(f"{path}: bundle name {name!r} cannot name a device directory (letters, digits, . _ + -)")
    wanted = [target["file"], *tok_files]
    pattern = relpath_pattern()
    out = {}
    for rel in dict.fromkeys(wanted):
        if not isinstance(rel, str) or not pattern.search(rel):
            raise PocketllmError(f"{path}: {rel!r} is not a relative path inside the bundle")
        if rel not in files:
            raise PocketllmError(f"{path}: {rel} is not listed in files")
        f = bundle / rel
        if not f.is_file():
            raise PocketllmError(f"{f}: listed in manifest.json but missing")
        entry = files[rel]
        if f.stat().st_size != entry["size"] or _sha256(f) != entry["sha256"]:
            raise PocketllmError(f"{f}: does not match manifest.json (size or sha256); re-export the bundle")
        out[rel] = entry
    return name, out


def free_kib(adb: Adb, directory: str) -> int | None:
    """Available KiB on the filesystem of `directory` (toybox `df -k`), None when df gives nothing usable."""
    p = adb.shell(f"df -k {shlex.quote(directory)}")
    if p.returncode != 0:
        return None
    rows = [line.split() for line in p.stdout.splitlines() if line.strip()]
    if len(rows) < 2 or len(rows[-1]) < 4 or not rows[-1][3].isdigit():
        return None
    return int(rows[-1][3])


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def push_android(bundle: Path, serial: str | None = None, adb_exe: str | None = None,
                 log: Callable[[str], None] = lambda s: None) -> PushResult:
    bundle = Path(bundle)
    name, files = bundle_files(bundle)
    adb = Adb(adb_exe or find_adb())
    adb.serial = pick_device(adb.devices(), serial)
    final, staging = f"{DEVICE_ROOT}/{name}", f"{DEVICE_ROOT}/.{name}.partial"
    total = sum(e["size"] for e in files.values()) + (bundle / "manifest.json").stat().st_size

    p = adb.shell(f"mkdir -p {DEVICE_ROOT}")
    if p.returncode != 0:
        raise PocketllmError(f"cannot create {DEVICE_ROOT} on {adb.serial}: {_last_line(p)}")
    free = free_kib(adb, DEVICE_ROOT)
    if free is not None and free * 1024 < total + (1 << 20):
        raise PocketllmError(f"not enough space on {adb.serial}: {DEVICE_ROOT} has {_mib(free * 1024)} free, the "
                             f"bundle needs {_mib(total)}; free some space on the device")

    def fail(message: str) -> PocketllmError:
        adb.shell(f"rm -rf {shlex.quote(staging)}")  # best effort: never leave a partial copy behind
        return PocketllmError(message)

    dirs = sorted({str(Path(staging, rel).parent) for rel in files} | {staging})
    p = adb.shell(f"rm -rf {shlex.quote(staging)} && mkdir -p {' '.join(map(shlex.quote, dirs))}")
    if p.returncode != 0:
        raise fail(f"cannot create {staging} on {adb.serial}: {_last_line(p)}")
    for rel in [*files, "manifest.json"]:
        log(f"  {rel} ({_mib((bundle / rel).stat().st_size)})")
        p = adb.run("push", str(bundle / rel), f"{staging}/{rel}")
        if p.returncode != 0:
            detail = _last_line(p)
            if "No space left" in detail or "ENOSPC" in detail:
                raise fail(f"the disk of {adb.serial} is full: pushing {rel} failed ({detail}); free "
                           f"{_mib(total)} on the device")
            raise fail(f"adb push {rel} to {adb.serial} failed: {detail}")

    p = adb.shell("sha256sum " + " ".join(shlex.quote(f"{staging}/{rel}") for rel in files))
    if p.returncode != 0 and not p.stdout.strip():
        raise fail(f"cannot check the copy on {adb.serial}: `sha256sum` failed ({_last_line(p)})")
    found = {}
    for line in p.stdout.splitlines():
        digest, _, remote = line.strip().partition("  ")
        if remote.startswith(staging + "/"):
            found[remote[len(staging) + 1:]] = digest
    for rel, entry in files.items():
        if found.get(rel) != entry["sha256"]:
            raise fail(f"{rel} on {adb.serial}: sha256 {str(found.get(rel))[:12]}... differs from manifest.json "
                       f"({entry['sha256'][:12]}...); the copy is corrupt, push again")

    p = adb.shell(f"chmod -R a+rX {shlex.quote(staging)} && rm -rf {shlex.quote(final)} && "
                  f"mv {shlex.quote(staging)} {shlex.quote(final)}")
    if p.returncode != 0:
        raise fail(f"cannot move the verified copy into {final} on {adb.serial}: {_last_line(p)}")
    return PushResult(adb.serial, final, [*files, "manifest.json"], total)
