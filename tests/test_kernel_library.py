"""The kernel library as a whole: loads once per process (a second registration would abort), and the C++
hand-checked cases (kernels/tests/kernels_test.cpp)."""

from __future__ import annotations

import subprocess

import pytest

from pocketllm.runtime_py.runners.executorch import REPO
from tests.kernels import load_kernels


@pytest.fixture(scope="module")
def kernels():
    return load_kernels()


def test_library_loads_once(kernels):
    from pocketllm.runtime_py.runners.executorch import load_kernel_library, registered_operators

    ops = {"pocketllm::infllm_attention.out", "pocketllm::lightning_attention.out", "pocketllm::any4_linear.out"}
    assert ops <= registered_operators()
    assert load_kernel_library(needed=sorted(ops)) is None  # already registered: nothing loaded again


@pytest.mark.slow
def test_cpp_hand_checked_cases(tmp_path):
    """kernels/tests/kernels_test.cpp: hand-derived values (any4 dequant, lightning recurrence, InfLLM ties)."""
    import sysconfig

    prefix = f"{sysconfig.get_paths()['purelib']}/executorch"
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(REPO / "kernels"), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DPOCKETLLM_BUILD_TESTS=ON"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    proc = subprocess.run([str(build / "kernels_test")], capture_output=True, text=True)
    assert proc.returncode == 0 and "all kernel tests passed" in proc.stdout, proc.stdout
