"""A SMALL private MIL evaluator for the Core ML export tests (not product code: the product interpreter is
runtime_py/runners/coreml.py). It runs the program read back from the saved package, op by op, in numpy:

- mode "fp32": every float op in fp32 whatever the declared dtype (weights are the stored fp16 values);
- mode "fp16": every float result rounded to its declared dtype (fp16 programs: fp16 after each op), fp16 overflow
  shows up as inf exactly where the device would overflow.

Only the ops our exported programs use are implemented; any other op raises (never skipped). States persist across
calls in `self.states`, zero-initialised like MLState.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class UnknownOp(Exception):
    pass


def _np_dtype(var):
    from coremltools.converters.mil.mil import types

    name = types.builtin_to_string(var.dtype)
    return {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "uint16": np.uint16,
            "int8": np.int8, "uint8": np.uint8, "bool": bool}.get(name)


def _softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def _norm_axes(axes, rank):
    return tuple(int(a) % rank for a in np.atleast_1d(axes))


class MILEvaluator:
    def __init__(self, program, mode: str = "fp32"):
        assert mode in ("fp32", "fp16")
        self.program, self.mode = program, mode
        self.states: dict[str, np.ndarray] = {}
        self.op_types_seen: set[str] = set()
        self.max_abs_seen = 0.0
        self.max_abs_input: dict[str, float] = {}  # op type -> largest |first input| seen (e.g. what norms get)

    @classmethod
    def from_package(cls, package: Path, mode: str = "fp32") -> "MILEvaluator":
        from export.targets.coreml.lower import load_program

        return cls(load_program(package), mode)

    def reset(self) -> None:
        self.states.clear()

    # ------------------------------------------------------------------ running
    def run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fn = self.program.functions[function]
        env: dict[int, object] = {}
        for name, var in fn.inputs.items():
            if name in inputs:
                env[id(var)] = np.asarray(inputs[name])
            else:  # a state
                if name not in self.states:
                    self.states[name] = np.zeros(var.shape, dtype=np.float32)
                env[id(var)] = ("state", name)
        self._run_block(fn, env)
        return {v.name: np.asarray(env[id(v)]) for v in fn.outputs}

    def _run_block(self, block, env) -> None:
        for op in block.operations:
            outs = self._run_op(op, env)
            if not isinstance(outs, tuple):
                outs = (outs,)
            for var, val in zip(op.outputs, outs):
                env[id(var)] = self._round(var, val)

    def _round(self, var, val):
        val = np.asarray(val)
        dt = _np_dtype(var)
        if dt is None:
            return val
        if dt in (np.float16, np.float32):
            if self.mode == "fp16" and dt == np.float16:
                with np.errstate(over="ignore"):
                    out = val.astype(np.float16).astype(np.float32)
            else:
                out = val.astype(np.float32)
            finite = out[np.isfinite(out)]
            if finite.size:
                self.max_abs_seen = max(self.max_abs_seen, float(np.abs(finite).max()))
            return out
        return val.astype(dt)

    def _get(self, var, env):
        if var is None:
            return None
        if isinstance(var, (list, tuple)):
            return [self._get(v, env) for v in var]
        if id(var) in env:
            return env[id(var)]
        if var.val is not None:
            return np.asarray(var.val)
        raise KeyError(f"value of {var.name} not computed")

    def _run_op(self, op, env):
        t = op.op_type
        self.op_types_seen.add(t)
        a = {name: self._get(v, env) for name, v in op.inputs.items()}
        first = a.get("x")
        if isinstance(first, np.ndarray) and first.dtype.kind == "f" and first.size:
            self.max_abs_input[t] = max(self.max_abs_input.get(t, 0.0), float(np.nanmax(np.abs(first))))
        fn = getattr(self, f"op_{t}", None)
        if t == "cond":
            return self._cond(op, a, env)
        if fn is None:
            raise UnknownOp(f"MIL op {t} ({op.name}) not implemented by the test evaluator")
        return fn(op, a)

    def _cond(self, op, a, env):
        block = op.blocks[0] if bool(a["pred"]) else op.blocks[1]
        self._run_block(block, env)
        return tuple(np.asarray(env[id(v)]) if id(v) in env else np.asarray(v.val) for v in block.outputs)

    # ------------------------------------------------------------------ ops
    def op_const(self, op, a):
        return np.asarray(op.outputs[0].val)

    def op_constexpr_lut_to_dense(self, op, a):
        from coremltools.optimize import _utils

        return _utils.lut_to_dense(np.asarray(op.indices.val), np.asarray(op.lut.val).astype(np.float32),
                                   None if op.vector_axis is None else op.vector_axis.val)

    def op_constexpr_blockwise_shift_scale(self, op, a):
        data = np.asarray(op.data.val).astype(np.float32)
        scale = np.asarray(op.scale.val).astype(np.float32)
        offset = None if op.offset is None else np.asarray(op.offset.val).astype(np.float32)
        for axis, (d, s) in enumerate(zip(data.shape, scale.shape)):
            if d != s:
                scale = np.repeat(scale, d // s, axis)
                offset = None if offset is None else np.repeat(offset, d // s, axis)
        return scale * (data - offset) if offset is not None else scale * data

    def op_read_state(self, op, a):
        _, name = a["input"]
        return self.states[name].copy()

    def op_coreml_update_state(self, op, a):
        _, name = a["state"]
        value = np.asarray(a["value"], dtype=np.float32)
        if self.mode == "fp16":
            value = value.astype(np.float16).astype(np.float32)
        self.states[name] = value.copy()
        return value

    # elementwise
    def op_add(self, op, a): return a["x"] + a["y"]
    def op_sub(self, op, a): return a["x"] - a["y"]
    def op_mul(self, op, a): return a["x"] * a["y"]
    def op_real_div(self, op, a): return a["x"] / a["y"]
    def op_floor_div(self, op, a): return np.floor_divide(a["x"], a["y"])
    def op_maximum(self, op, a): return np.maximum(a["x"], a["y"])
    def op_minimum(self, op, a): return np.minimum(a["x"], a["y"])
    def op_pow(self, op, a): return np.power(a["x"], a["y"])
    def op_abs(self, op, a): return np.abs(a["x"])
    def op_exp(self, op, a): return np.exp(a["x"])
    def op_sqrt(self, op, a): return np.sqrt(a["x"])
    def op_inverse(self, op, a): return 1.0 / (a["x"] + (a["epsilon"] if a.get("epsilon") is not None else 0))
    def op_rsqrt(self, op, a): return 1.0 / np.sqrt(a["x"] + (a["epsilon"] if a.get("epsilon") is not None else 0))
    def op_relu(self, op, a): return np.maximum(a["x"], 0)
    def op_sigmoid(self, op, a): return 1.0 / (1.0 + np.exp(-a["x"]))
    def op_silu(self, op, a): return a["x"] / (1.0 + np.exp(-a["x"]))
    def op_clip(self, op, a): return np.clip(a["x"], a["alpha"], a["beta"])
    def op_equal(self, op, a): return a["x"] == a["y"]
    def op_not_equal(self, op, a): return a["x"] != a["y"]
    def op_less(self, op, a): return a["x"] < a["y"]
    def op_less_equal(self, op, a): return a["x"] <= a["y"]
    def op_greater(self, op, a): return a["x"] > a["y"]
    def op_greater_equal(self, op, a): return a["x"] >= a["y"]
    def op_logical_and(self, op, a): return np.logical_and(a["x"], a["y"])
    def op_logical_or(self, op, a): return np.logical_or(a["x"], a["y"])
    def op_logical_not(self, op, a): return np.logical_not(a["x"])
    def op_select(self, op, a): return np.where(a["cond"], a["a"], a["b"])

    def op_cast(self, op, a):
        dt = _np_dtype(op.outputs[0])
        x = a["x"]
        if dt in (np.int32, np.int16, np.uint16, np.int8, np.uint8) and np.issubdtype(np.asarray(x).dtype, np.floating):
            x = np.trunc(x)
        return np.asarray(x).astype(dt if dt is not None else np.float32)

    # reductions
    def _reduce(self, f, op, a):
        x = a["x"]
        axes = _norm_axes(a["axes"], x.ndim) if a.get("axes") is not None else None
        keep = bool(a["keep_dims"]) if a.get("keep_dims") is not None else False
        return f(x, axis=axes, keepdims=keep)

    def op_reduce_sum(self, op, a): return self._reduce(np.sum, op, a)
    def op_reduce_mean(self, op, a): return self._reduce(np.mean, op, a)
    def op_reduce_max(self, op, a): return self._reduce(np.max, op, a)
    def op_reduce_min(self, op, a): return self._reduce(np.min, op, a)

    def op_reduce_log_sum_exp(self, op, a):
        def lse(x, axis, keepdims):
            m = np.max(x, axis=axis, keepdims=True)
            r = np.log(np.exp(x - m).sum(axis=axis, keepdims=True)) + m
            return r if keepdims else np.squeeze(r, axis=axis)
        return self._reduce(lse, op, a)

    def op_softmax(self, op, a): return _softmax(a["x"], int(a["axis"]))

    # linear algebra
    def op_linear(self, op, a):
        y = a["x"] @ np.asarray(a["weight"], dtype=np.float32).T
        return y + a["bias"] if a.get("bias") is not None else y

    def op_matmul(self, op, a):
        x, y = np.asarray(a["x"], np.float32), np.asarray(a["y"], np.float32)
        if a.get("transpose_x") is not None and bool(a["transpose_x"]):
            x = np.swapaxes(x, -1, -2)
        if a.get("transpose_y") is not None and bool(a["transpose_y"]):
            y = np.swapaxes(y, -1, -2)
        return x @ y

    # shapes
    def op_reshape(self, op, a): return np.reshape(a["x"], [int(s) for s in a["shape"]])
    def op_expand_dims(self, op, a):
        x = a["x"]
        for ax in sorted(int(v) for v in np.atleast_1d(a["axes"])):
            x = np.expand_dims(x, ax if ax >= 0 else x.ndim + 1 + ax)
        return x
    def op_squeeze(self, op, a):
        axes = a.get("axes")
        return np.squeeze(a["x"], axis=None if axes is None else _norm_axes(axes, a["x"].ndim))
    def op_transpose(self, op, a): return np.transpose(a["x"], [int(p) for p in a["perm"]])
    def op_tile(self, op, a): return np.tile(a["x"], [int(r) for r in a["reps"]])
    def op_shape(self, op, a): return np.asarray(np.shape(a["x"]), dtype=np.int32)

    def op_concat(self, op, a):
        vals = [np.atleast_1d(v) for v in a["values"]]
        return np.concatenate(vals, axis=int(a["axis"]))

    def op_split(self, op, a):
        x, axis = a["x"], int(a["axis"])
        if a.get("split_sizes") is not None:
            cuts = np.cumsum([int(v) for v in a["split_sizes"]])[:-1]
            return tuple(np.split(x, cuts, axis=axis))
        return tuple(np.split(x, int(a["num_splits"]), axis=axis))

    def op_range_1d(self, op, a): return np.arange(a["start"], a["end"], a["step"]).astype(np.int32)
    def op_fill(self, op, a): return np.full([int(s) for s in a["shape"]], a["value"])

    def _slices(self, x, a):
        rank = x.ndim
        begin = [int(b) for b in a["begin"]]
        end = [int(e) for e in a["end"]]
        stride = [int(s) for s in a["stride"]] if a.get("stride") is not None else [1] * rank
        bm = list(a["begin_mask"]) if a.get("begin_mask") is not None else [False] * rank
        em = list(a["end_mask"]) if a.get("end_mask") is not None else [False] * rank
        sm = list(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [False] * rank
        idx = []
        for i in range(rank):
            if sm[i]:
                idx.append(begin[i])
                continue
            b = None if bm[i] else begin[i]
            e = None if em[i] else end[i]
            idx.append(slice(b, e, stride[i]))
        return tuple(idx)

    def op_slice_by_index(self, op, a): return a["x"][self._slices(a["x"], a)]

    def op_slice_by_size(self, op, a):
        x = a["x"]
        idx = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(a["begin"], a["size"]))
        out = x[idx]
        assert out.shape == tuple(int(s) if int(s) != -1 else out.shape[i] for i, s in enumerate(a["size"])), \
            "slice_by_size out of bounds"
        return out

    def op_slice_update(self, op, a):
        x = np.array(a["x"], copy=True)
        idx = self._slices(x, a)
        target = x[idx]
        assert target.shape == np.asarray(a["update"]).shape, f"slice_update shape {target.shape} vs update"
        x[idx] = a["update"]
        return x

    def op_gather(self, op, a):
        x, idx = a["x"], np.asarray(a["indices"]).astype(np.int64)
        axis = int(a["axis"]) if a.get("axis") is not None else 0
        axis = axis % x.ndim
        bd = int(a["batch_dims"]) if a.get("batch_dims") is not None else 0
        if bd == 0:
            return np.take(x, idx, axis=axis)
        assert bd == 1 and axis == 1
        return np.stack([np.take(x[b], idx[b], axis=0) for b in range(x.shape[0])])

    def op_gather_along_axis(self, op, a):
        return np.take_along_axis(a["x"], np.asarray(a["indices"]).astype(np.int64), axis=int(a["axis"]))

    def op_scatter_along_axis(self, op, a):
        data = np.array(a["data"], copy=True)
        idx = np.asarray(a["indices"]).astype(np.int64)
        mode = str(a["mode"]) if a.get("mode") is not None else "update"
        assert mode == "update"
        np.put_along_axis(data, idx, a["updates"], axis=int(a["axis"]))
        return data

    def op_topk(self, op, a):
        x = a["x"]
        axis = int(a["axis"]) % x.ndim
        k = int(a["k"])
        asc = bool(a["ascending"]) if a.get("ascending") is not None else False
        order = np.argsort(x if asc else -x, axis=axis, kind="stable")  # ties: lower index first
        idx = np.take(order, np.arange(k), axis=axis)
        return np.take_along_axis(x, idx, axis=axis), idx.astype(np.int32)


class CoreMLProgramRunner:
    """Drives a saved package like an app: prefill chunks (last one padded with -1), then decode steps."""

    def __init__(self, package: Path, entry: dict, mode: str = "fp32"):
        self.eval = MILEvaluator.from_package(package, mode)
        self.chunk = entry["prefill_chunk"]
        self.pad = entry["pad_token_id"]

    def reset(self):
        self.eval.reset()

    def call(self, function: str, tokens, position: int) -> np.ndarray:
        out = self.eval.run(function, {"tokens": np.asarray([tokens], dtype=np.int32),
                                       "position": np.asarray([position], dtype=np.int32)})
        return out["logits"][0]

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        """logits [len(tokens), vocab]: chunks of `chunk` through prefill (padded), single tokens through decode."""
        tokens = list(int(t) for t in tokens)
        if len(tokens) == 1:
            return self.call("decode", tokens, start_pos)
        outs = []
        for s in range(0, len(tokens), self.chunk):
            part = tokens[s:s + self.chunk]
            padded = part + [self.pad] * (self.chunk - len(part))
            outs.append(self.call("prefill", padded, start_pos + s)[:len(part)])
        return np.concatenate(outs)
