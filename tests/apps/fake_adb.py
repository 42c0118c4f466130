"""A stand-in for `adb` (tests put a wrapper named adb on PATH): devices, push and the few shell commands
`pocketllm push android` runs (df -k, mkdir -p, rm -rf, sha256sum, chmod -R, mv, joined by &&), on a directory that
plays the device's filesystem. Behaviour from the environment:

  FAKE_ADB_DEVICES   "serial:state,serial:state" (state: device, unauthorized, offline, ...); "" = none
  FAKE_ADB_ROOT      directory standing for the device's /
  FAKE_ADB_FREE_KIB  what `df -k` reports as available (default plenty)
  FAKE_ADB_PUSH      "nospace": every push fails like a full disk; "corrupt": pushed files get one byte flipped
  FAKE_ADB_LOG       file to which each invocation's arguments are appended, one line each
"""

import hashlib
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_ADB_ROOT"])


def device(path: str) -> Path:
    if not path.startswith("/data/local/tmp"):
        sys.exit(f"fake adb: {path} outside /data/local/tmp")
    return ROOT / path.lstrip("/")


def shell(command: str) -> int:
    rc = 0
    words = shlex.split(command)
    commands, current = [], []
    for w in words:
        if w == "&&":
            commands.append(current)
            current = []
        else:
            current.append(w)
    commands.append(current)
    for cmd in commands:
        name, args = cmd[0], cmd[1:]
        if name == "df" and args[0] == "-k":
            free = os.environ.get("FAKE_ADB_FREE_KIB", "52428800")
            print("Filesystem     1K-blocks     Used Available Use% Mounted on")
            print(f"/dev/block/dm-5 115000000 60000000 {free} 52% /data")
        elif name == "mkdir" and args[0] == "-p":
            for a in args[1:]:
                device(a).mkdir(parents=True, exist_ok=True)
        elif name == "rm" and args[0] == "-rf":
            for a in args[1:]:
                shutil.rmtree(device(a), ignore_errors=True)
        elif name == "chmod" and args[0] == "-R":
            pass
        elif name == "mv":
            os.replace(device(args[0]), device(args[1]))
        elif name == "sha256sum":
            for a in args:
                f = device(a)
                if f.is_file():
                    print(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {a}")
                else:
                    print(f"sha256sum: {a}: No such file or directory", file=sys.stderr)
                    rc = 1
        else:
            print(f"/system/bin/sh: {name}: inaccessible or not found", file=sys.stderr)
            return 127
        if rc:
            return rc
    return rc


def main(argv: list[str]) -> int:
    with open(os.environ["FAKE_ADB_LOG"], "a") as log:
        log.write(" ".join(argv) + "\n")
    devices = [d.split(":", 1) for d in os.environ.get("FAKE_ADB_DEVICES", "").split(",") if d]
    if argv == ["devices"]:
        print("List of devices attached")
        for serial, state in devices:
            print(f"{serial}\t{state}")
        print()
        return 0
    if argv[:1] == ["-s"]:
        serial, argv = argv[1], argv[2:]
        if serial not in dict(devices):
            print(f"adb: device '{serial}' not found", file=sys.stderr)
            return 1
    elif len(devices) != 1:
        print("adb: more than one device/emulator" if devices else "adb: no devices/emulators found", file=sys.stderr)
        return 1
    if argv[0] == "push":
        local, remote = argv[1], argv[2]
        if os.environ.get("FAKE_ADB_PUSH") == "nospace":
            print(f"adb: error: failed to copy '{local}' to '{remote}': remote No space left on device",
                  file=sys.stderr)
            return 1
        dst = device(remote)
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = bytearray(Path(local).read_bytes())
        if os.environ.get("FAKE_ADB_PUSH") == "corrupt" and data:
            data[len(data) // 2] ^= 1
        dst.write_bytes(bytes(data))
        print(f"{local}: 1 file pushed, 0 skipped.")
        return 0
    if argv[0] == "shell":
        return shell(" ".join(argv[1:]))
    print(f"fake adb: unsupported {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
