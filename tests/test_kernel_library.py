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


# Kernel code that prefetches on purpose, by the function names it compiles to, and what each prefetch is for (the
# measurements are in the comments at each site): a compiler that drops them (GCC 12 dropped moe_ffn's any4 row prefetches, kernels/prefetch.h) leaves
# results unchanged and only shows as lost speed, so the built library is checked for the instructions themselves.
PREFETCHING = {
    "up_pass<pocketllm::(anonymous namespace)::run_any4": "moe_ffn any4: listed up rows",
    "up_pass<pocketllm::(anonymous namespace)::run_float": "moe_ffn fp32/bf16: listed up rows",
    "pocketllm::w4a8::linear_rows": "W4A8 decode: the tile two ahead",
    "pocketllm::infllm_attention_impl": "InfLLM v2: the next chunk's K/V rows",
}


def test_prefetches_survive_compilation():
    import shutil

    from pocketllm.runtime_py.runners.executorch import DEFAULT_KERNEL_LIBRARY
    from tests.kernels import build_kernels

    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    build_kernels()
    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(DEFAULT_KERNEL_LIBRARY)], check=True,
                             capture_output=True, text=True).stdout
    found = {name: 0 for name in PREFETCHING}
    function = ""
    for line in listing.splitlines():
        if line.endswith(">:"):
            function = line
            continue
        fields = line.split("\t")  # "  addr:", mnemonic and operands (calls name functions: not the mnemonic)
        mnemonic = fields[1].split()[0] if len(fields) > 1 and fields[1].split() else ""
        if mnemonic.startswith("prefetch") or mnemonic == "prfm":
            for name in found:
                found[name] += name in function
    missing = [f"{what} ({name})" for name, what in PREFETCHING.items() if not found[name]]
    assert not missing, "no prefetch instruction in: " + "; ".join(missing)
