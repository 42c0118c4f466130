"""Shared by the kernel tests: build the kernel library (the Makefile's `kernels` target) and call its C entry points
through ctypes."""

from __future__ import annotations

import ctypes
import subprocess

import torch

from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY, REPO

I = ctypes.c_int64


def build_kernels() -> None:
    """The Makefile's `kernels` target (what `make setup` runs); a no-op when the library is up to date."""
    if not DEFAULT_KERNEL_LIBRARY.is_file():
        subprocess.run(["make", "-s", "kernels"], cwd=REPO, check=True)


def load_kernels() -> ctypes.CDLL:
    """The library, registered with ExecuTorch's operator registry once per process, as a ctypes handle."""
    from pocketllm.runtime_py.runners.executorch import load_kernel_library

    build_kernels()
    load_kernel_library(needed=["pocketllm::infllm_attention.out"])
    return ctypes.CDLL(str(DEFAULT_KERNEL_LIBRARY))


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())
