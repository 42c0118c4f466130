"""The installed distribution has one import name: a wheel of the project holds `pocketllm/...` (export/ and
runtime_py/ installed as pocketllm.export and pocketllm.runtime_py, with the manifest JSON Schema) and nothing else
at the top level: nothing named `export` lands in site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_has_a_single_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("export", "runtime_py"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(src)], check=True,
                   capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("pocketllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "pocketllm" in tops and all(t == "pocketllm" or t.endswith(".dist-info") for t in tops), tops
    assert "pocketllm/export/cli/main.py" in names and "pocketllm/runtime_py/parity.py" in names
    assert "pocketllm/export/bundle/manifest.schema.json" in names
    assert not [n for n in names if n.startswith(("export/", "runtime_py/"))]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "pocketllm = pocketllm.export.cli.main:app" in entry
