"""Core ML on Linux: a numpy interpreter of a saved `.mlpackage` (its MIL program, weights and states).

Core ML's `predict` and `MLState` exist only on macOS; parity for our Core ML bundles runs through this instead.
- package.py: read the package from disk (protobuf MIL program + MILBlob weight file) into plain Python
- ops.py: the op table, one numpy function per MIL op, written from the MIL op definitions
- interpreter.py: compile each function into closures, run it in fp32 or fp16-emulating mode, keep the states
- engine.py: `CoreMLEngine`, the runner protocol over a bundle's package, driven as an app would drive it
"""

from runtime_py.runners.coreml.engine import CoreMLEngine
from runtime_py.runners.coreml.interpreter import MODES, Interpreter
from runtime_py.runners.coreml.package import load_package

__all__ = ["CoreMLEngine", "Interpreter", "MODES", "load_package"]
