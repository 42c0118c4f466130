"""memoized_signatures(): torch's export-signature lookups, computed once per state of the signature.

torch's ExportGraphSignature answers `inputs_to_buffers`, `inputs_to_parameters`, `user_inputs` & co. by rebuilding
a tuple or dict from every input spec on each access, and torch's re-tracing (`run_decompositions`) and ExecuTorch's
passes (spec propagation, memory planning, the emitter, constant lifting) ask once per placeholder node: quadratic
in the number of constants. SmallThinker 4b-a0.6b `--experts all` (any4: ~12,000 constants) spent most of its 2 h 21 min
lowering there (py-spy, torch 2.13 / executorch 1.5.1); a 12-layer 32-expert model's export spent 58 % of its time
in those rebuilds.

Inside the context each such property is computed once and reused until the signature changes. The memo's key
catches every way torch and ExecuTorch change one:
- attribute writes to the signature, a spec or an argument (`spec.arg.name = ...`, `sig.input_specs = [...]`): the
  classes' `__setattr__` counts every write (after the write), and the count is part of the key;
- the spec lists' contents: the same list objects, holding the same specs in the same order (insert / append,
  reorders such as ExecuTorch's `output_specs.clear(); output_specs.extend(...)`, item assignment), checked with
  one C-level `==` against a copy, far cheaper than the dict torch builds.
A spec changed without `__setattr__` (`copy.copy`, `__dict__` updates) is a new object, so a new id.
Only properties that return immutable values (tuples, read-only mappings) are kept. Leaving the context restores
the classes exactly. Lowering is single-threaded: the patch is process-wide, so do not lower in two threads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref
from typing import Iterator

from torch.export import graph_signature as _gs

_writes = 0  # attribute writes to signature / spec / argument objects while memoizing
_memo: dict[int, "_Entry"] = {}  # id(signature) -> its memo
_depth = 0


def _signature_classes() -> list[type]:
    return [c for c in vars(_gs).values()
            if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == _gs.__name__]


def _memo_properties() -> dict[str, property]:
    """The signature's properties derived from its spec lists alone (backward_signature builds a mutable object: not
    memoized)."""
    return {name: p for name, p in vars(_gs.ExportGraphSignature).items()
            if isinstance(p, property) and name not in ("backward_signature", "assertion_dep_token")}


def _counting_setattr(original):
    def __setattr__(self, name, value):
        global _writes
        original(self, name, value)
        _writes += 1  # after the write: a lookup never pairs the new count with the old state
    return __setattr__


@dataclasses.dataclass
class _Entry:
    owner: weakref.ref  # the signature
    writes: int  # _writes when computed
    ins: list  # its spec lists (held: their ids cannot be reused meanwhile) and copies of their contents then
    ins_copy: list
    outs: list
    outs_copy: list
    values: dict  # property name -> value


def _memoized(name: str, prop: property) -> property:
    compute = prop.fget

    def get(self):
        ins, outs = self.input_specs, self.output_specs
        entry = _memo.get(id(self))
        # Valid while no write happened and the lists are the same lists holding the same specs in the same order.
        # `list == list` compares element by element in C, by identity first (a value-equal spec in another object
        # gives the same answers, as the properties read values only): ~15x cheaper than hashing the ids.
        if (entry is None or entry.owner() is not self or entry.writes != _writes or entry.ins is not ins
                or entry.outs is not outs or entry.ins_copy != ins or entry.outs_copy != outs):
            sid = id(self)
            entry = _Entry(weakref.ref(self, lambda _, sid=sid: _memo.pop(sid, None)), _writes, ins, list(ins), outs,
                           list(outs), {})
            _memo[sid] = entry
        values = entry.values
        if name not in values:
            value = compute(self)
            if not isinstance(value, (tuple, types.MappingProxyType, type(None))):
                return value  # mutable: a fresh one per access, as torch gives it
            values[name] = value
        return values[name]

    return property(get, doc=prop.__doc__)


@contextlib.contextmanager
def memoized_signatures() -> Iterator[None]:
    """Within: ExportGraphSignature's spec-derived properties are memoized (see the module docstring). Re-entrant."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    saved_setattr = {cls: cls.__dict__.get("__setattr__") for cls in _signature_classes()}
    saved_props = _memo_properties()
    _depth = 1
    try:
        for cls in saved_setattr:
            cls.__setattr__ = _counting_setattr(cls.__setattr__)
        for name, prop in saved_props.items():
            setattr(_gs.ExportGraphSignature, name, _memoized(name, prop))
        yield
    finally:
        _depth = 0
        for name, prop in saved_props.items():
            setattr(_gs.ExportGraphSignature, name, prop)
        for cls, original in saved_setattr.items():
            if original is not None:
                cls.__setattr__ = original
            elif "__setattr__" in vars(cls):  # (absent if the patching above was interrupted)
                del cls.__setattr__
        _memo.clear()
