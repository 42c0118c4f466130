"""Third-party noise, filtered in one place: what torch, torchao, ExecuTorch and coremltools print on a normal run
that tells a pocketllm user nothing they can act on.

- Python warnings (FutureWarning / DeprecationWarning from anywhere, UserWarning from the SDKs) and SDK loggers
  (torchao's "Failed to load ...so" for GPU kernels, torch's pytree deprecation notes, coremltools' "version not
  tested" lines): `quiet_third_party()`, which the CLI calls once at start-up (export/cli/process.py).
- Native log lines written straight to file descriptor 2 by C++ code (ExecuTorch's cpuinfo probing "Failed to open
  midr file ...", "Resetting threadpool to N threads."): `native_stderr_filtered()` around the calls that print
  them (runtime_py/runners/executorch.py); every other line, errors included, still reaches stderr.

Errors are never filtered: only warnings and the native lines matched by NATIVE_NOISE.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings
from contextlib import contextmanager
from typing import Iterator

SDK_MODULES = r"(torch|torchao|executorch|coremltools|onnx|onnxruntime|onnxscript|transformers|tokenizers)(\.|$)"
SDK_LOGGERS = ("torchao", "torch.utils._pytree", "torch._export", "executorch", "coremltools", "onnxscript")
NATIVE_NOISE = tuple(re.compile(p) for p in (
    r"^\[cpuinfo_utils\.cpp:\d+\]",  # ExecuTorch probing /sys for the CPU model (absent on x86 and in VMs)
    r"^\[threadpool\.cpp:\d+\] Resetting threadpool",
    r"^Error in cpuinfo: ",  # pytorch/cpuinfo on kernels without some /proc or prctl entries
))


def quiet_third_party() -> None:
    """Install the warning filters and logger levels (idempotent; before the SDKs are imported is best)."""
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=SDK_MODULES)
    for name in SDK_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NATIVE_NOISE)


@contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Run a block whose native code may log known noise to fd 2: the block's stderr goes to a temporary file and
    every line that is not noise is written back to stderr when the block ends (also when it raises)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not is_noise(line)]
            if kept:
                os.write(2, "".join(kept).encode())
