"""Process-level behaviour, in fresh processes: the OpenMP wait policy is set before torch loads (every command
runs at full speed on a shared machine: export/cli/process.py), and normal runs print no third-party noise
(export/noise.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.cli.conftest import pocketllm
from tests.conftest import TINY_AUSTEN

# What third-party noise looks like: Python warnings ("file.py:12: FutureWarning"), torchao's "Failed to load
# ...so", torch's glog-style lines ("W1201 13:10:04.202 ..."), ExecuTorch's native "[cpuinfo_utils.cpp:87] ...".
NOISE = re.compile(r"Warning|warnings\.warn|Failed to (load|open)|cpuinfo|midr|threadpool|\.py:\d+|^[WIE]\d{4} ")

PROBE = """
import os, sys
import pocketllm.export.cli.main
assert "torch" not in sys.modules, "the CLI imported torch before a command ran"
import torch
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("TOKENIZERS_PARALLELISM"))
"""


@pytest.mark.parametrize("preset,expected", [(None, "PASSIVE false"), ("ACTIVE", "ACTIVE false")])
def test_wait_policy_is_set_before_torch_loads(preset, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset  # the user's choice wins
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == expected


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if NOISE.search(line)]


def test_export_prints_no_third_party_noise(nf4_bundle):
    """The session bundle's export (a fresh process): our lines only, its timings as a table, the one warning."""
    stderr = nf4_bundle[2]
    assert noise(stderr) == []
    assert "total_s" not in stderr and "{" not in stderr  # a table, not a raw dict
    assert re.search(r"│ lower \(executorch\)\s+│\s+[\d.]+ │", stderr)
    assert re.search(r"│ total\s+│\s+[\d.]+ │", stderr)


def test_other_commands_print_no_third_party_noise(nf4_bundle, bundle_copy, tmp_path):
    ckpt, bundle, _ = nf4_bundle
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n")
    for args in (["generate", "--engine", "executorch", "--bundle", bundle, "--prompt", "The quick", "--greedy",
                  "--max-new-tokens", "4", "--threads", "1"],
                 ["generate", "--checkpoint", TINY_AUSTEN, "--prompt", "It is", "--greedy", "--max-new-tokens", "4"],
                 ["parity", bundle_copy, "--prompts", prompts, "--steps", "2"],
                 ["quantize", "--checkpoint", ckpt, "--scheme", "int8", "--out", tmp_path / "q"]):
        proc = pocketllm(*args, env={"OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert noise(proc.stderr) == [], args


SDK_IMPORTS = """
import pocketllm.export.cli.main
import coremltools, onnxscript, torchao
from pocketllm.runtime_py.runners.executorch import set_threads
set_threads(1)  # creates ExecuTorch's thread pool: its CPU probe logs natively
"""


def test_sdk_imports_are_quiet():
    """What the SDKs print when they load (coremltools' version checks, torchao's GPU libraries, torch's pytree
    notes, ExecuTorch's CPU probe) is filtered once the CLI has started, for the targets to come too."""
    proc = subprocess.run([sys.executable, "-c", SDK_IMPORTS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
