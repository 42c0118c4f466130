"""Run the functions of a saved Core ML package in numpy, with Core ML states that persist across calls.

    program = Interpreter("model.mlpackage", mode="fp16")
    logits = program.run("decode", {"tokens": ids, "position": pos})["logits"]   # states updated in place
    program.reset_states()                                                      # like a fresh make_state()

Loading compiles every function once into a list of closures over numbered slots: `const` and `constexpr_*` ops
(LUT / blockwise / affine dequantisation) are evaluated at load time, as is every op whose inputs are all
constants, so a call only runs the ops that depend on inputs or states. One state store (name -> array, zeros at
start) is shared by all functions, as Core ML shares an `MLState` between the functions of a multifunction model.

Numeric modes (a value's numpy container is float32 in both; the declared dtype decides the rounding):
- "fp32": every op computes in float32 whatever dtype the program declares; `cast` to fp16 is a no-op; fp16
  weights are their exact fp16 values and dequantised weights are exact in float32. The program's math, free of
  fp16 rounding: what parity against the numpy reference model checks.
- "fp16": every op result the program declares fp16 (weights, activations, states, logits) is rounded to fp16
  (round to nearest even; overflow gives inf, as on device). Each op computes from fp16 inputs in float32 and
  rounds once; this models fp16 storage with fp32 arithmetic inside an op, which is what Core ML's CPU and GPU
  kernels do for matmul / linear / reductions / softmax accumulation. Not emulated: the order of summation in
  those accumulations, fp16 rounding *inside* fused ops (e.g. the scores of scaled_dot_product_attention, the
  mean inside a reduction), ANE-specific arithmetic, and fast approximations of exp / rsqrt / erf. Products of
  two fp16 values are exact in float32, so matmul differs from a true fp16-in/fp32-accumulate kernel only by the
  summation order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError
from pocketllm.runtime_py.runners.coreml.ops import OPS, OpError, slice_update_in_place
from pocketllm.runtime_py.runners.coreml.package import FLOAT_TYPES, Function, Package, TensorType, load_package

MODES = ("fp32", "fp16")
STATE_OPS = ("read_state", "write_state", "coreml_update_state")
# Inputs that are MIL tuples: always a list of values, even with one binding.
TUPLE_INPUTS = {("concat", "values"), ("stack", "values"), ("einsum", "values"), ("reshape_like", "ref_tensors")}
CONTAINERS = {"bool": np.bool_, "int4": np.int8, "int8": np.int8, "int16": np.int16, "int32": np.int32,
              "int64": np.int64, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8, "uint4": np.uint8,
              "uint6": np.uint8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


def _round_fp16(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).astype(np.float16).astype(np.float32)


def finisher(t: TensorType, mode: str) -> Callable[[Any], np.ndarray]:
    """The function that turns a kernel's result into the value the program declares (dtype, fp16 rounding)."""
    if t.dtype in FLOAT_TYPES:
        if mode == "fp16" and t.dtype == "fp16":
            return _round_fp16
        return lambda v: np.asarray(v, dtype=np.float32)
    if t.dtype == "string":
        return lambda v: v
    container = CONTAINERS.get(t.dtype)
    if container is None:
        raise PocketllmError(f"MIL dtype {t.dtype} is not supported at run time")
    return lambda v: np.asarray(v).astype(container, copy=False)


def _shape_ok(value, t: TensorType) -> bool:
    shape = np.shape(value)
    return len(shape) == len(t.shape) and all(d is None or d == s for d, s in zip(t.shape, shape))


@dataclass
class CompiledFunction:
    """One function as closures over numbered slots: what `run` executes."""

    name: str
    inputs: dict[str, tuple[int, TensorType, Callable]]  # input name -> (slot, declared type, cast to it)
    states: dict[str, TensorType]
    steps: list[Callable]  # each reads and writes slots of one environment list
    outputs: list[tuple[str, int | None, Any]]  # (name, slot, or None and the constant value)
    num_slots: int
    num_ops: int  # ops in the saved function, constants included
    in_place: int  # slice_update ops that write into a state's array (see in_place_updates)
    slot_names: list[str]  # the program's name of each slot's value


class Interpreter:
    """All functions of one `.mlpackage`, sharing one state store. mode: "fp16" (emulate fp16 rounding) or "fp32"."""

    def __init__(self, package: str | Path | Package, mode: str = "fp16"):
        if mode not in MODES:
            raise PocketllmError(f"Core ML interpreter mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.package = package if isinstance(package, Package) else load_package(package)
        self.mode = mode
        self.state_types = self._collect_states()
        self.states: dict[str, np.ndarray] = {}  # one store for all functions; compiled steps hold this dict
        self.reset_states()
        # constants folded at load, shared by the functions: a multifunction package's functions read the same
        # weight blobs (package.py hands out one array per blob), so their dequantised weights are computed once
        self._folded: dict[tuple, Any] = {}
        self.functions = {name: self._compile(f) for name, f in self.package.functions.items()}
        del self._folded

    # ------------------------------------------------------------------------------------------- states
    def _collect_states(self) -> dict[str, TensorType]:
        types_: dict[str, TensorType] = {}
        for f in self.package.functions.values():
            for name, t in f.states:
                if name in types_ and types_[name] != t:
                    raise PocketllmError(f"{self.package.path}: state '{name}' is {types_[name]} in one function and "
                                         f"{t} in function '{f.name}'")
                types_[name] = t
        return types_

    def reset_states(self) -> None:
        """Every state back to zeros, as a fresh `make_state()` gives."""
        for name, t in self.state_types.items():
            if any(d is None for d in t.shape):
                raise PocketllmError(f"{self.package.path}: state '{name}' has an unknown dimension ({t})")
            container = np.float32 if t.dtype in FLOAT_TYPES else CONTAINERS[t.dtype]
            self.states[name] = np.zeros(t.shape, dtype=container)

    # ------------------------------------------------------------------------------------------ compile
    def _compile(self, f: Function) -> CompiledFunction:
        where_fn = f"{self.package.path.name}: function '{f.name}'"
        slots: dict[str, int] = {}
        consts: dict[str, Any] = {}
        steps: list[Callable] = []
        inputs, states = {}, {}
        for name, t in f.inputs:
            if t.state:
                states[name] = t
            else:
                slots[name] = len(slots)
                inputs[name] = (slots[name], t, finisher(t, self.mode))

        def resolve(binding, where):
            kind, v = binding
            if kind == "value":
                return False, self._const_value(v)
            if v in consts:
                return False, consts[v]
            if v in slots:
                return True, slots[v]
            raise PocketllmError(f"{where}: input '{v}' is not defined before use")

        declared = {name: t for name, t in f.inputs}

        def compile_ops(ops, steps: list[Callable], in_place: set[int]) -> None:
            for index, op in enumerate(ops):
                where = f"{where_fn}, op '{op.name or op.type}' ({op.type})"
                declared.update(op.outputs)
                if op.type == "const":
                    (out_name, t), = op.outputs
                    val = op.values["val"]
                    key = ("const", id(val), t) if isinstance(val, np.ndarray) and val.size > 1024 else None
                    if key is None or key not in self._folded:
                        value = finisher(t, self.mode)(self._const_value(val))
                        if key is None:
                            consts[out_name] = value
                            continue
                        self._folded[key] = (val, value)  # (val kept: its id stays its own)
                    consts[out_name] = self._folded[key][1]
                    continue
                if op.type in STATE_OPS:
                    steps.append(self._state_step(op, slots, consts, states, declared, where))
                    continue
                if op.type == "cond":
                    steps.append(self._cond_step(op, resolve, compile_ops, slots, where))
                    continue
                if op.blocks:
                    raise PocketllmError(f"{where_fn}: MIL op '{op.type}' (op '{op.name}') has nested blocks; "
                                         "pocketllm's Core ML interpreter runs only `cond` among control-flow ops")
                kernel = OPS.get(op.type)
                if kernel is None:
                    raise PocketllmError(f"{where_fn}: MIL op '{op.type}' (op '{op.name}') is not implemented by "
                                         "pocketllm's Core ML interpreter")
                static, dynamic = {}, []  # dynamic: (param, slot) or (param, [(is_slot, slot_or_value), ...])
                for param, bindings in op.inputs.items():
                    resolved = [resolve(b, where) for b in bindings]
                    if (op.type, param) in TUPLE_INPUTS or len(resolved) > 1:
                        if any(is_slot for is_slot, _ in resolved):
                            dynamic.append((param, resolved))
                        else:
                            static[param] = [v for _, v in resolved]
                    elif resolved[0][0]:
                        dynamic.append((param, resolved[0][1]))
                    else:
                        static[param] = resolved[0][1]
                if "out_types" in inspect.signature(kernel).parameters:
                    static["out_types"] = [t for _, t in op.outputs]
                finishers = [finisher(t, self.mode) for _, t in op.outputs]
                types_ = [t for _, t in op.outputs]
                if index in in_place:  # x is the state's own array and the update already has the declared dtype
                    kernel, finishers = slice_update_in_place, [lambda v: v]
                if not dynamic:  # constant folding, including constexpr_* dequantisation: done once here
                    key = _fold_key(op.type, static, types_)
                    if key is None or key not in self._folded:
                        values = _finish(_call(kernel, static, where), finishers, types_, where)
                        if key is not None:
                            self._folded[key] = (static, values)  # (static kept: the ids in the key stay theirs)
                    else:
                        values = self._folded[key][1]
                    for (out_name, _), value in zip(op.outputs, values):
                        consts[out_name] = value
                    continue
                out_slots = []
                for out_name, _ in op.outputs:
                    slots[out_name] = len(slots)
                    out_slots.append(slots[out_name])
                steps.append(_make_step(kernel, static, dynamic, out_slots, finishers, types_, where))

        in_place = in_place_updates(f)
        compile_ops(f.ops, steps, in_place)

        outputs = []
        for name in f.outputs:
            if name in slots:
                outputs.append((name, slots[name], None))
            elif name in consts:
                outputs.append((name, None, consts[name]))
            else:
                raise PocketllmError(f"{where_fn}: output '{name}' is never computed")
        slot_names = [""] * len(slots)
        for name, slot in slots.items():
            slot_names[slot] = name
        return CompiledFunction(f.name, inputs, states, steps, outputs, len(slots), len(f.ops), len(in_place),
                                slot_names)

    def _cond_step(self, op, resolve, compile_ops, slots, where) -> Callable:
        """`cond(pred)`: run the true or the false block (each compiled to its own steps over the same slots; a
        block reads values defined before the op) and bind the chosen block's outputs to the op's outputs."""
        if len(op.blocks) != 2 or any(b.inputs for b in op.blocks):
            raise PocketllmError(f"{where}: expected two blocks without inputs (true, false)")
        (pred,) = [resolve(b, where) for b in op.inputs["pred"]]
        branches = []
        for block in op.blocks:
            block_steps: list[Callable] = []
            compile_ops(block.ops, block_steps, set())
            if len(block.outputs) != len(op.outputs):
                raise PocketllmError(f"{where}: a block returns {len(block.outputs)} values for {len(op.outputs)} "
                                     "outputs")
            branches.append((block_steps, [resolve(("name", n), where) for n in block.outputs]))
        finishers = [finisher(t, self.mode) for _, t in op.outputs]
        types_ = [t for _, t in op.outputs]
        out_slots = []
        for out_name, _ in op.outputs:
            slots[out_name] = len(slots)
            out_slots.append(slots[out_name])

        def step(env):
            p = env[pred[1]] if pred[0] else pred[1]
            block_steps, outs = branches[0] if bool(np.asarray(p).reshape(-1)[0]) else branches[1]
            for s in block_steps:
                s(env)
            values = [env[v] if is_slot else v for is_slot, v in outs]
            for slot, value in zip(out_slots, _finish(tuple(values), finishers, types_, where)):
                env[slot] = value
        return step

    def _const_value(self, v):
        """A constant as the interpreter holds it: floats in float32 (fp16 values stay exact), ints as stored."""
        if isinstance(v, np.ndarray) and v.dtype.kind == "f":
            return v.astype(np.float32)
        return v

    def _state_step(self, op, slots, consts, states, declared, where) -> Callable:
        store = self.states
        param = "input" if op.type in ("read_state", "write_state") else "state"
        (kind, state_name), = op.inputs[param]
        if kind != "name" or state_name not in states:
            raise PocketllmError(f"{where}: '{param}' must name a state input of the function")
        state_type = states[state_name]
        if op.type == "read_state":
            (out_name, _), = op.outputs
            slots[out_name] = slot = len(slots)

            def read(env):
                env[slot] = store[state_name]
            return read

        data_param = "data" if op.type == "write_state" else "value"
        (kind, data_name), = op.inputs[data_param]
        if kind != "name" or data_name not in slots and data_name not in consts:
            raise PocketllmError(f"{where}: '{data_param}' must name a tensor of the function")
        # a value the program declares with the state's type was finished by its producer already
        t = declared.get(data_name)
        same = t is not None and (t.dtype, t.shape) == (state_type.dtype, state_type.shape)
        finish = (lambda v: v) if same else finisher(state_type, self.mode)
        src = slots.get(data_name)
        const = consts.get(data_name)
        out_slot = None
        if op.type == "coreml_update_state":
            (out_name, _), = op.outputs
            slots[out_name] = out_slot = len(slots)

        def write(env):
            value = finish(env[src] if src is not None else const)
            if value.shape != state_type.shape:
                raise PocketllmError(f"{where}: writes shape {list(value.shape)} to state '{state_name}' of "
                                     f"shape {list(state_type.shape)}")
            store[state_name] = value
            if out_slot is not None:
                env[out_slot] = value
        return write

    # ---------------------------------------------------------------------------------------------- run
    def run(self, function: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run one function. inputs: name -> array (cast to the declared dtype). Returns name -> array; states
        are read and written in `self.states`."""
        env, fn = self._execute(function, inputs)
        # copies: an output may be a state's own array, which later calls update in place
        return {name: np.array(env[slot] if slot is not None else value) for name, slot, value in fn.outputs}

    def trace(self, function: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Like `run` (states are updated too), but returns every value the call computed, by its name in the
        program, in execution order: for finding the first op that overflows or departs from a reference."""
        snapshots: list[Any] = []
        self._execute(function, inputs, snapshots)
        fn = self.functions[function]
        return {name: value for name, value in zip(fn.slot_names, snapshots) if value is not None}

    def _execute(self, function: str, inputs: dict[str, Any],
                 snapshots: list | None = None) -> tuple[list[Any], CompiledFunction]:
        """Run the steps; with `snapshots` (a list), copy each value when computed (a later in-place cache update
        may change arrays that earlier values are views of)."""
        fn = self.functions.get(function)
        if fn is None:
            raise PocketllmError(f"{self.package.path.name}: no function '{function}' (functions: "
                                 f"{', '.join(self.functions)})")
        missing = [n for n in fn.inputs if n not in inputs]
        extra = [n for n in inputs if n not in fn.inputs]
        if missing or extra:
            raise PocketllmError(f"{self.package.path.name}: function '{function}' takes inputs "
                                 f"{', '.join(fn.inputs)} (missing: {', '.join(missing) or 'none'}; "
                                 f"unexpected: {', '.join(extra) or 'none'})")
        env: list[Any] = [None] * fn.num_slots
        for name, (slot, t, finish) in fn.inputs.items():
            value = finish(inputs[name])
            if not _shape_ok(value, t):
                raise PocketllmError(f"{self.package.path.name}: function '{function}' input '{name}' has shape "
                                     f"{list(np.shape(value))}, expected {t}")
            env[slot] = value
        with np.errstate(over="ignore", under="ignore"):  # fp16 rounding overflows to inf, as on device
            if snapshots is None:
                for step in fn.steps:
                    step(env)
                return env, fn
            snapshots.extend(np.array(v) if v is not None else None for v in env)
            seen = [id(v) for v in env]
            for step in fn.steps:
                step(env)
                for k, v in enumerate(env):
                    if v is not None and id(v) != seen[k]:
                        snapshots[k], seen[k] = np.array(v), id(v)
        return env, fn


# Ops whose result may be a numpy view of their input `x` (the kernels use reshape / slicing / transpose / flip).
VIEW_OPS = {"reshape", "reshape_like", "expand_dims", "squeeze", "transpose", "reverse", "slice_by_index",
            "slice_by_size", "identity", "split", "sliding_windows", "flatten2d"}


def in_place_updates(f: Function) -> set[int]:
    """Indices of the `slice_update` ops that may write into the state's array instead of copying it.

    The pattern a KV-cache update compiles to is `r = read_state(S); u = slice_update(x=r, ...); write_state(S, u)`
    (or coreml_update_state). Copying S on every call costs a full cache copy per layer and step; writing in place
    gives the same values when nothing needs the old contents of S once the update ran: u is written back to S,
    and no value that may share memory with the state's array (the reads of S before that write, and the views
    taken of them by reshape / slice / transpose ...) is used by the update's other inputs or after it. Reads of S
    return the store's array itself, so such a value would see the mutation.
    """
    producer, consumers = {}, {}
    def nested_inputs(op):  # a nested block's reads count as reads by the op holding it
        for block in op.blocks:
            for inner in block.ops:
                yield from inner.inputs.values()
                yield from nested_inputs(inner)
            yield [("name", n) for n in block.outputs]

    for i, op in enumerate(f.ops):
        for name, _ in op.outputs:
            producer[name] = i
        for param, bindings in op.inputs.items():
            for kind, v in bindings:
                if kind == "name":
                    consumers.setdefault(v, []).append((i, param))
        for bindings in nested_inputs(op):
            for kind, v in bindings:
                if kind == "name":
                    consumers.setdefault(v, []).append((i, "block"))
    for name in f.outputs:
        consumers.setdefault(name, []).append((len(f.ops), "output"))

    def aliases(name: str) -> set[str]:
        """name and every value that may be a view of it."""
        seen, todo = {name}, [name]
        while todo:
            for k, param in consumers.get(todo.pop(), []):
                if k < len(f.ops) and f.ops[k].type in VIEW_OPS and param == "x":
                    for out, _ in f.ops[k].outputs:
                        if out not in seen:
                            seen.add(out)
                            todo.append(out)
        return seen

    def state_of(op) -> str | None:
        param = {"read_state": "input", "write_state": "input", "coreml_update_state": "state"}.get(op.type)
        return op.inputs[param][0][1] if param else None

    chosen = set()
    for i, op in enumerate(f.ops):
        if op.type != "slice_update" or op.inputs.get("x", [("value", None)])[0][0] != "name":
            continue
        r = producer.get(op.inputs["x"][0][1])
        if r is None or f.ops[r].type != "read_state":
            continue
        state, (u, _) = state_of(f.ops[r]), op.outputs[0]
        writes = [k for k, _ in consumers.get(u, []) if k < len(f.ops) and f.ops[k].type != "read_state"
                  and state_of(f.ops[k]) == state]
        if not writes:
            continue
        reads = [j for j, o in enumerate(f.ops[:min(writes)]) if o.type == "read_state" and state_of(o) == state]
        uses = [(k, param) for j in reads for v in aliases(f.ops[j].outputs[0][0]) for k, param in consumers.get(v, [])]
        if all(k < i or (k, param) == (i, "x") for k, param in uses):
            chosen.add(i)
    return chosen


def _fold_key(op_type: str, static: dict, types_) -> tuple | None:
    """Key of a constant-folded op whose result other functions may reuse: its type, declared outputs and inputs
    (large arrays by identity: they are the shared blobs or earlier shared results). None for small results, not
    worth sharing."""
    if sum(int(np.prod([d or 0 for d in t.shape])) for t in types_) <= 1024:
        return None
    parts = []
    for k in sorted(static):
        v = static[k]
        if isinstance(v, np.ndarray):
            parts.append((k, "id", id(v)) if v.size > 64 else (k, v.dtype.str, v.shape, v.tobytes()))
        elif isinstance(v, list) and any(isinstance(x, np.ndarray) for x in v):
            parts.append((k, tuple(id(x) if isinstance(x, np.ndarray) else repr(x) for x in v)))
        else:
            parts.append((k, repr(v)))
    return (op_type, tuple(types_), tuple(parts))


def _call(kernel, kwargs, where):
    try:
        return kernel(**kwargs)
    except PocketllmError as e:
        raise PocketllmError(f"{where}: {e}") from None
    except Exception as e:  # a numpy error inside a kernel: name the op
        raise PocketllmError(f"{where}: {type(e).__name__}: {e}") from e


def _finish(values, finishers, types_, where):
    values = values if isinstance(values, tuple) else (values,)
    if len(values) != len(finishers):
        raise PocketllmError(f"{where}: produced {len(values)} outputs, the program declares {len(finishers)}")
    out = []
    for value, finish, t in zip(values, finishers, types_):
        value = finish(value)
        if not _shape_ok(value, t):
            raise PocketllmError(f"{where}: result shape {list(np.shape(value))} differs from the declared {t}")
        out.append(value)
    return out


def _make_step(kernel, static, dynamic, out_slots, finishers, types_, where) -> Callable:
    singles = [(p, s) for p, s in dynamic if isinstance(s, int)]
    tuples = [(p, items) for p, items in dynamic if not isinstance(items, int)]
    if len(out_slots) == 1 and not tuples:  # the common case, kept lean
        (out_slot,), (finish,), (t,) = out_slots, finishers, types_

        def step(env):
            kwargs = dict(static)
            for p, s in singles:
                kwargs[p] = env[s]
            try:
                value = finish(kernel(**kwargs))
            except PocketllmError as e:
                raise PocketllmError(f"{where}: {e}") from None
            except Exception as e:
                raise PocketllmError(f"{where}: {type(e).__name__}: {e}") from e
            if not _shape_ok(value, t):
                raise PocketllmError(f"{where}: result shape {list(np.shape(value))} differs from the declared {t}")
            env[out_slot] = value
        return step

    def step(env):
        kwargs = dict(static)
        for p, s in singles:
            kwargs[p] = env[s]
        for p, items in tuples:
            kwargs[p] = [env[v] if is_slot else v for is_slot, v in items]
        for slot, value in zip(out_slots, _finish(_call(kernel, kwargs, where), finishers, types_, where)):
            env[slot] = value
    return step


__all__ = ["Interpreter", "MODES", "OpError"]
