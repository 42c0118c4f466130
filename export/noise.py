"""Third-party noise, filtered in one place: what torch, torchao, ExecuTorch and coremltools print on a normal run
that tells a pocketllm user nothing they can act on.

- Python warnings (FutureWarning / DeprecationWarning from anywhere, UserWarning from the SDKs) and SDK loggers
  (torchao's "Failed to load ...so" for GPU kernels, torch's pytree deprecation notes, coremltools' "version not
  tested" lines): `quiet_third_party()`, which the CLI calls once at start-up (export/cli/process.py).
- Native log lines written straight to file descriptor 2 by C++ code (ExecuTorch's cpuinfo probing "Failed to open
  midr file ...", "Resetting threadpool to N threads."): `native_stderr_filtered()` around the calls that print
  them (runtime_py/runners/executorch.py); every other line, errors included, still reaches stderr.

Errors are never filtered: only warnings and the native lines matched by NATIVE_NOISE. One exception, which loses no
information: when an expert store's kernel call fails, the runner raises the store's own error line and drops
ExecuTorch's trace of that call (NATIVE_KERNEL_FAILURE: the kernel's ET_LOG line, which repeats it, and method.cpp's
"KernelCall failed" / "arg N with type id T" lines).
"""

from __future__ import annotations

import io
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


class NativeFilter:
    """What native_stderr_filtered drops: NATIVE_NOISE, plus the patterns a block adds while it runs (drop)."""

    def __init__(self):
        self.extra: list[re.Pattern] = []

    def drop(self, pattern: str) -> None:
        self.extra.append(re.compile(pattern))

    def drop_kernel_failure(self) -> None:
        self.drop(NATIVE_KERNEL_FAILURE)

    def keeps(self, line: str) -> bool:
        return not is_noise(line) and not any(p.search(line) for p in self.extra)


# ExecuTorch's trace of a kernel call that failed (method.cpp: "KernelCall failed ...", one "arg N with type id T"
# per argument) and the kernel's own ET_LOG line: dropped when the failure is reported as one PocketllmError line.
NATIVE_KERNEL_FAILURE = r"^\[(method|expert_store)\.cpp:\d+\] "


@contextmanager
def native_stderr_filtered() -> Iterator[NativeFilter]:
    """Run a block whose native code may log known noise: its stderr (fd 2, and Python's sys.stderr, where
    ExecuTorch's Python bindings send the runtime's log lines) is held back, and every line that is not noise is
    written back when the block ends (also when it raises). The block may add patterns to drop
    (NativeFilter.drop), e.g. the runtime's trace of a failure it turns into one error line."""
    filt = NativeFilter()
    python_err, held = sys.stderr, io.StringIO()
    sys.stderr = held
    try:
        with _fd2_filtered(filt):
            yield filt
    finally:
        sys.stderr = python_err
        kept = [line for line in held.getvalue().splitlines(keepends=True) if filt.keeps(line)]
        if kept and python_err is not None:
            python_err.write("".join(kept))


@contextmanager
def _fd2_filtered(filt: NativeFilter) -> Iterator[None]:
    """fd 2 into a temporary file for the block; lines filt keeps are written back to fd 2 afterwards."""
    try:
        sys.__stderr__.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no usable fd 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.__stderr__.flush()
            except (AttributeError, OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [line for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if filt.keeps(line)]
            if kept:
                os.write(2, "".join(kept).encode())
