"""Process settings every command needs, made once at start-up, before torch (or any SDK) is imported: the CLI's
entry module (main.py) calls `prepare_process()` before it imports a single command.

- OpenMP workers sleep instead of spinning while they wait (OMP_WAIT_POLICY=PASSIVE). Spinning workers steal the
  cores that the decode loop's many small ops need whenever anything else runs on the machine: measured on the
  2-core CI machine with one core kept busy, tiny-austen decoded at 6.6 tok/s with libgomp's default and 91 with
  PASSIVE, and the quantize step inside `export` took 58 s instead of 11 s. libgomp reads the variable once, when
  torch loads it, so it must be set before `import torch`.
- Tokenizers' Rust thread pool stays off (it would warn about forks and compete for the same cores).
- Third-party warnings and SDK log lines are filtered (export/noise.py).

A variable the user set wins (`setdefault`). Thread counts stay torch's and ExecuTorch's defaults (one per core);
`--threads N` sets them per command. With the passive policy, one thread was not faster than torch's default two on
the shared 2-core machine (tiny-austen greedy decode, medians of 4 alternating runs: 78 vs 175 tok/s with nothing
added, 48 vs 70 with one core kept busy), so no default is forced.
"""

from __future__ import annotations

import os

from pocketllm.export.noise import quiet_third_party

ENVIRONMENT = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "TOKENIZERS_PARALLELISM": "false",
}


def prepare_process() -> None:
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    quiet_third_party()
