"""Core ML on Linux: a numpy interpreter of a saved `.mlpackage` (its MIL program, weights and states).

Core ML's `predict` and `MLState` exist only on macOS; parity for our Core ML bundles runs through this instead.
- package.py: read the package from disk (protobuf MIL program + MILBlob weight file) into plain Python
- ops.py: the op table, one numpy function per MIL op, written from the MIL op definitions
- interpreter.py: compile each function into closures, run it in fp32 or fp16-emulating mode, keep the states
- engine.py: `CoreMLEngine`, the runner protocol over a bundle's package, driven as an app would drive it
"""

from pocketllm.runtime_py.runners.coreml.engine import CoreMLEngine
from pocketllm.runtime_py.runners.coreml.interpreter import MODES, Interpreter
from pocketllm.runtime_py.runners.coreml.package import load_package

TARGET = "coreml"
# `pocketllm parity` runs the interpreter in each mode against the numpy reference on the bundle's weights rounded as
# the package stores them (fp16), with its own criteria (issue #12's acceptance):
PARITY_MODES = {
    # the program's math in float32: the logits are the reference's up to fp16 constants (weights, RoPE tables)
    "fp32": {"tolerance": 5e-3},
    # every value the program declares fp16 rounded to fp16, as on a phone: the same greedy continuations
    "fp16": {"tolerance": None, "identical": True, "min_top1": 0.99},
}


def Runner(bundle, threads=None, manifest=None, mode: str = "fp16"):
    """The runner registry's entry (runtime_py/runners/__init__.py): the interpreter in fp16-emulating mode, what a
    phone computes (parity also runs it in fp32 mode). `threads` is accepted for the protocol; numpy decides."""
    return CoreMLEngine(bundle, mode=mode, manifest=manifest)


__all__ = ["CoreMLEngine", "Interpreter", "MODES", "PARITY_MODES", "Runner", "TARGET", "load_package"]
