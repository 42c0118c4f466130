"""Custom ops, one file each: torch.library schema (functional + `.out`), reference impl, fake impl.

Importing this package registers every op module in this folder once per process (Python's import cache is the
guard). The op's stem names its numpy twin (runtime_py/ops/<op>.py), its C++ kernel (kernels/<op>.{h,cpp}), its
tests (tests/ops/test_<op>.py) and each target's lowering (export/targets/<target>/ops.py).
"""

import importlib
import pkgutil

OP_MODULES = sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name != "library")
for _name in OP_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
