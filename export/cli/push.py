"""`pocketllm push android BUNDLE [--serial S]`: copy a bundle to a phone for android_demo, checked on the device."""

from __future__ import annotations

from pathlib import Path

import typer

from pocketllm.export.cli.common import console, user_errors

app = typer.Typer(no_args_is_help=True, help="Copy a bundle to a device for the demo apps.")


@app.command("android")
def android(
    bundle: Path = typer.Argument(..., help="Bundle directory written by `pocketllm export --target executorch`."),
    serial: str = typer.Option(None, "--serial", "-s", help="Device serial (see `adb devices`); needed when several "
                               "devices are connected."),
):
    """Push BUNDLE's manifest, .pte and tokenizer files to /data/local/tmp/pocketllm/<name>/ with adb and check
    their sha256 on the device (the parity reference stays behind). android_demo lists it on next start."""
    _android(bundle, serial)


@user_errors
def _android(bundle: Path, serial: str | None) -> None:
    from pocketllm.export.push import push_android

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    say(f"pushing {bundle} ...")
    r = push_android(bundle, serial, log=say)
    say(f"pushed {len(r.files)} files ({r.bytes / 2**20:.1f} MiB) to {r.serial}:{r.remote_dir}; sha256 verified on "
        "the device")
