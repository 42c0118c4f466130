"""Fixtures of the op tests (tests/ops/test_<op>.py): the C++ kernel library."""

from __future__ import annotations

import ctypes

import pytest

from tests.kernels import load_kernels


@pytest.fixture(scope="session")
def kernels() -> ctypes.CDLL:
    return load_kernels()
