"""The MIL op table: one numpy function per op type, written from the op definitions in coremltools
(`coremltools/converters/mil/mil/ops/defs/iOS15..iOS18/*.py`, the MIL reference) for deployment target iOS 18.

Conventions. A kernel takes the op's MIL inputs as keyword arguments (optional inputs default to the values the
definitions document) and returns an array, or a tuple for ops with several outputs. Float tensors arrive as
float32 arrays whatever their declared dtype, integers and bools as their own numpy dtypes, rank-0 values as 0-d
arrays, string constants as `str`. The interpreter then casts each result to the dtype the program declares (and,
in fp16 mode, rounds fp16 results), so kernels compute in float32 and need not care about the declared dtype.
Kernels that need the declared output types take a keyword `out_types`.

Documented choices where the MIL docs leave behaviour open:
- topk / argsort ties: the lower index comes first (stable sort), for ascending and descending order.
- gather / scatter index out of range: an error (Core ML calls it undefined; it is always a bug in our programs).
- integer real_div truncates toward zero (the float quotient cast to int32).
"""

from __future__ import annotations

import math

import numpy as np

from pocketllm.runtime_py.errors import PocketllmError

OPS: dict = {}


def op(*names):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


class OpError(PocketllmError):
    """Raised by a kernel; the interpreter prefixes the function and op name."""


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1).tolist()]


def _axis(axis, rank: int) -> int:
    a = int(axis)
    if not -rank <= a < max(rank, 1):
        raise OpError(f"axis {a} out of range for rank {rank}")
    return a % rank if rank else 0


NP_DTYPES = {"bool": np.bool_, "fp16": np.float32, "fp32": np.float32, "fp64": np.float32, "int8": np.int8,
             "int16": np.int16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16,
             "uint32": np.uint32, "uint64": np.uint64}

# ------------------------------------------------------------------------------------- elementwise binary
op("add")(lambda x, y: np.add(x, y))
op("sub")(lambda x, y: np.subtract(x, y))
op("mul")(lambda x, y: np.multiply(x, y))
op("maximum")(lambda x, y: np.maximum(x, y))
op("minimum")(lambda x, y: np.minimum(x, y))
op("equal")(lambda x, y: np.equal(x, y))
op("not_equal")(lambda x, y: np.not_equal(x, y))
op("greater")(lambda x, y: np.greater(x, y))
op("greater_equal")(lambda x, y: np.greater_equal(x, y))
op("less")(lambda x, y: np.less(x, y))
op("less_equal")(lambda x, y: np.less_equal(x, y))
op("logical_and")(lambda x, y: np.logical_and(x, y))
op("logical_or")(lambda x, y: np.logical_or(x, y))
op("logical_xor")(lambda x, y: np.logical_xor(x, y))
op("floor_div")(lambda x, y: np.floor_divide(x, y))  # rounds toward negative infinity (MIL doc)
op("mod")(lambda x, y: np.mod(x, y))  # python's %: the sign of y


@op("real_div")
def real_div(x, y):
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.true_divide(x, y)
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.trunc(q)
    return q


@op("pow")
def pow_(x, y):
    if np.ndim(y) == 0 and float(y) == 2.0:  # x * x: exact like the multiply a backend does for square
        return np.multiply(x, x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.power(x, y)


# -------------------------------------------------------------------------------------- elementwise unary
def _erf(x):
    try:
        from scipy.special import erf
    except ImportError:  # scipy is optional
        return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.float32)
    return erf(x)


op("abs")(lambda x: np.abs(x))
op("acos")(lambda x: np.arccos(x))
op("asin")(lambda x: np.arcsin(x))
op("atan")(lambda x: np.arctan(x))
op("atanh")(lambda x: np.arctanh(x))
op("ceil")(lambda x: np.ceil(x))
op("cos")(lambda x: np.cos(x))
op("cosh")(lambda x: np.cosh(x))
op("erf")(lambda x: _erf(x))
op("exp")(lambda x: np.exp(x))
op("exp2")(lambda x: np.exp2(x))
op("floor")(lambda x: np.floor(x))
op("logical_not")(lambda x: np.logical_not(x))
op("round")(lambda x: np.round(x))  # to nearest, halves to even (MIL: "0.5 is rounded to 0")
op("sign")(lambda x: np.sign(x))
op("sin")(lambda x: np.sin(x))
op("sinh")(lambda x: np.sinh(x))
op("sqrt")(lambda x: np.sqrt(x))
op("square")(lambda x: np.multiply(x, x))
op("tan")(lambda x: np.tan(x))
op("tanh")(lambda x: np.tanh(x))
op("clip")(lambda x, alpha, beta: np.minimum(np.maximum(x, alpha), beta))
op("threshold")(lambda x, alpha: np.maximum(x, alpha))
op("inverse")(lambda x, epsilon=1e-4: np.float32(1) / (x + np.float32(epsilon)))  # 1 / (x + eps)
op("rsqrt")(lambda x, epsilon=1e-12: np.float32(1) / np.sqrt(x + np.float32(epsilon)))  # 1 / sqrt(x + eps)


@op("log")
def log(x, epsilon=1e-45):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(x + np.float32(epsilon))


@op("cast")
def cast(x, dtype):
    if dtype not in NP_DTYPES:
        raise OpError(f"cast to '{dtype}' is not supported")
    x = np.asarray(x)
    if dtype == "bool":
        return x != 0
    if np.issubdtype(NP_DTYPES[dtype], np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)  # float -> int drops the fraction
    return x.astype(NP_DTYPES[dtype])


# --------------------------------------------------------------------------------------------- activations
def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.float32(1) / (np.float32(1) + np.exp(-x))


op("relu")(lambda x: np.maximum(x, np.float32(0)))
op("relu6")(lambda x: np.minimum(np.maximum(x, np.float32(0)), np.float32(6)))
op("sigmoid")(_sigmoid)
op("silu")(lambda x: x * _sigmoid(x))
op("softsign")(lambda x: x / (np.float32(1) + np.abs(x)))
op("leaky_relu")(lambda x, alpha=0.01: np.where(x >= 0, x, x * np.float32(alpha)))
op("elu")(lambda x, alpha=1.0: np.where(x > 0, x, np.float32(alpha) * (np.exp(x) - 1)))
op("linear_activation")(lambda x, alpha, beta=0.0: x * np.float32(alpha) + np.float32(beta))
op("scaled_tanh")(lambda x, alpha=1.0, beta=1.0: np.float32(alpha) * np.tanh(x * np.float32(beta)))
op("sigmoid_hard")(lambda x, alpha=0.2, beta=0.5: np.clip(x * np.float32(alpha) + np.float32(beta), 0, 1))
op("thresholded_relu")(lambda x, alpha=1.0: np.where(x >= alpha, x, np.float32(0)))
op("clamped_relu")(lambda x, alpha, beta: np.minimum(np.where(x >= 0, x, x * np.float32(alpha)), np.float32(beta)))


@op("softplus")
def softplus(x):
    return np.logaddexp(np.float32(0), x)


@op("softmax")
def softmax(x, axis=-1):
    m = np.max(x, axis=int(axis), keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - m)
        return e / np.sum(e, axis=int(axis), keepdims=True)


@op("gelu")
def gelu(x, mode="EXACT"):
    if mode == "EXACT":
        return np.float32(0.5) * x * (np.float32(1) + _erf(x / np.float32(math.sqrt(2))))
    if mode == "TANH_APPROXIMATION":
        c = np.float32(math.sqrt(2 / math.pi))
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise OpError(f"gelu mode '{mode}' is not supported")


# --------------------------------------------------------------------------------------------- reductions
def _reduce(fn):
    def kernel(x, axes=None, keep_dims=False):
        ax = None if axes is None else tuple(_ints(axes))
        return fn(np.asarray(x), ax, bool(keep_dims))

    return kernel


def _log_sum_exp(x, ax, k):
    m = np.max(x, axis=ax, keepdims=True)
    r = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return r if k else np.squeeze(r, axis=ax if ax is not None else None)


op("reduce_sum")(_reduce(lambda x, ax, k: np.sum(x, axis=ax, keepdims=k)))
op("reduce_mean")(_reduce(lambda x, ax, k: np.mean(x, axis=ax, keepdims=k)))
op("reduce_max")(_reduce(lambda x, ax, k: np.max(x, axis=ax, keepdims=k)))
op("reduce_min")(_reduce(lambda x, ax, k: np.min(x, axis=ax, keepdims=k)))
op("reduce_prod")(_reduce(lambda x, ax, k: np.prod(x, axis=ax, keepdims=k)))
op("reduce_sum_square")(_reduce(lambda x, ax, k: np.sum(x * x, axis=ax, keepdims=k)))
op("reduce_l1_norm")(_reduce(lambda x, ax, k: np.sum(np.abs(x), axis=ax, keepdims=k)))
op("reduce_l2_norm")(_reduce(lambda x, ax, k: np.sqrt(np.sum(x * x, axis=ax, keepdims=k))))
op("reduce_log_sum")(_reduce(lambda x, ax, k: np.log(np.sum(x, axis=ax, keepdims=k))))
op("reduce_log_sum_exp")(_reduce(_log_sum_exp))


def _reduce_arg(fn):
    def kernel(x, axis=-1, keep_dims=False, output_dtype="int32"):
        r = fn(np.asarray(x), axis=int(axis))  # first occurrence on ties
        return np.expand_dims(r, int(axis)) if keep_dims else r

    return kernel


op("reduce_argmax")(_reduce_arg(np.argmax))
op("reduce_argmin")(_reduce_arg(np.argmin))


# ------------------------------------------------------------------------------------------------- linear
@op("linear")
def linear(x, weight, bias=None):
    x = np.asarray(x)
    # 2-D dot with the transposed weight view goes to BLAS; a stacked matmul against it may not (30x slower)
    y = np.dot(x.reshape(-1, x.shape[-1]), weight.T).reshape(x.shape[:-1] + (weight.shape[0],))
    return y if bias is None or not np.any(bias) else y + bias


@op("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    x, y = np.asarray(x), np.asarray(y)
    if transpose_x and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if transpose_y and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("einsum")
def einsum(values, equation):
    return np.einsum(str(equation), *values)


@op("layer_norm")
def layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    ax = tuple(_ints(axes)) if axes is not None else tuple(range(np.ndim(x)))
    mean = np.mean(x, axis=ax, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(epsilon))
    if gamma is not None:
        y = y * gamma
    return y if beta is None else y + beta


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask marks the keys that take part (iOS 18 definition)."""
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) * np.float32(1 / math.sqrt(query.shape[-1]))
    if attn_mask is not None:
        mask = np.asarray(attn_mask)
        scores = np.where(mask, scores, np.float32(-np.inf)) if mask.dtype == np.bool_ else scores + mask
    return np.matmul(softmax(scores, -1), value)


# ------------------------------------------------------------------------------------- tensor operations
@op("band_part")
def band_part(x, lower=-1, upper=-1):
    m, n = np.shape(x)[-2:]
    rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((int(lower) < 0) | (rows - cols <= int(lower))) & ((int(upper) < 0) | (cols - rows <= int(upper)))
    return np.where(keep, x, np.zeros((), dtype=np.asarray(x).dtype))


@op("cumsum")
def cumsum(x, axis=0, exclusive=False, reverse=False):
    a = int(axis)
    x = np.flip(x, a) if reverse else np.asarray(x)
    out = np.cumsum(x, axis=a, dtype=x.dtype)
    if exclusive:  # shift by one: the first element is 0
        out = np.concatenate([np.zeros_like(np.take(out, [0], axis=a)), np.delete(out, -1, axis=a)], axis=a)
    return np.flip(out, a) if reverse else out


@op("fill")
def fill(shape, value=0.0):
    return np.full(_ints(shape), value)


@op("fill_like")
def fill_like(ref_tensor, value=0.0):
    return np.full(np.shape(ref_tensor), value)


@op("range_1d")
def range_1d(start, end, step):
    return np.arange(start.item(), end.item(), step.item())


@op("tile")
def tile(x, reps):
    return np.tile(x, _ints(reps))


@op("shape")
def shape(x):
    return np.array(np.shape(x), dtype=np.int32)


@op("identity")
def identity(x):
    return x


@op("select")
def select(cond, a, b):
    return np.where(cond, a, b)


@op("concat")
def concat(values, axis, interleave=False):
    # Quirk: programs from coremltools concat rank-0 values (scalars from squeezing slices) into shape vectors.
    values = [np.reshape(v, (1,)) if np.ndim(v) == 0 else np.asarray(v) for v in values]
    a = _axis(axis, values[0].ndim)
    if interleave:
        stacked = np.stack(values, axis=a + 1)
        shape_ = list(values[0].shape)
        shape_[a] *= len(values)
        return stacked.reshape(shape_)
    return np.concatenate(values, axis=a)


@op("stack")
def stack(values, axis):
    return np.stack([np.asarray(v) for v in values], axis=int(axis))


@op("split")
def split(x, axis, num_splits=None, split_sizes=None, out_types=None):
    a = _axis(axis, np.ndim(x))
    if split_sizes is not None:
        cuts = np.cumsum(_ints(split_sizes))[:-1]
        return tuple(np.split(x, cuts, axis=a))
    n = int(num_splits) if num_splits is not None else len(out_types)
    return tuple(np.split(x, n, axis=a))


@op("argsort")
def argsort(x, axis=-1, ascending=False):
    x = np.asarray(x)
    key = x if ascending else -x.astype(np.float64)
    return np.argsort(key, axis=int(axis), kind="stable").astype(np.int32)


@op("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    x = np.asarray(x)
    a = _axis(axis, x.ndim)
    k = x.shape[a] if int(k) == -1 else int(k)
    key = x.astype(np.float64) if ascending else -x.astype(np.float64)
    idx = np.take(np.argsort(key, axis=a, kind="stable"), np.arange(k), axis=a)  # ties: lower index first
    values = np.take_along_axis(x, idx, axis=a)
    return (values, idx.astype(np.int32)) if return_indices else values


@op("one_hot")
def one_hot(indices, one_hot_vector_size, axis=-1, on_value=1, off_value=0):
    n = int(one_hot_vector_size)
    idx = np.asarray(indices)
    hot = np.expand_dims(idx, -1) == np.arange(n)
    out = np.where(hot, on_value, off_value)
    a = int(axis)
    return np.moveaxis(out, -1, a if a >= 0 else out.ndim + a)


@op("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    p = _ints(pad)
    x = np.asarray(x)
    n = len(p) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(p[2 * i], p[2 * i + 1]) for i in range(n)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=constant_val)
    if mode in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if mode == "reflect" else "edge")
    raise OpError(f"pad mode '{mode}' is not supported")


@op("non_zero")
def non_zero(x):
    return np.transpose(np.nonzero(x)).astype(np.int32)


@op("flatten2d")
def flatten2d(x, axis=1):
    x = np.asarray(x)
    a = int(axis) % x.ndim if x.ndim else 0
    return x.reshape(int(np.prod(x.shape[:a])), -1)


# -------------------------------------------------------------------------------- tensor transformations
@op("reshape")
def reshape(x, shape):
    x = np.asarray(x)
    target = _ints(shape)
    for i, s in enumerate(target):
        if s == 0:  # iOS 17: a 0 copies the input dim at the same position counted from the right, else 1
            j = x.ndim - (len(target) - i)
            target[i] = x.shape[j] if j >= 0 else 1
    return x.reshape(target)


@op("reshape_like")
def reshape_like(x, ref_tensors, begins, ends, end_masks):
    dims = []
    for ref, b, e, m in zip(ref_tensors, _ints(begins), _ints(ends), np.asarray(end_masks).reshape(-1)):
        s = np.shape(ref)
        dims.extend(s[b:] if m else s[b:e])
    return np.reshape(x, dims)


@op("expand_dims")
def expand_dims(x, axes):
    return np.expand_dims(x, tuple(_ints(axes)))  # negative axes count in the output rank, as in MIL


@op("squeeze")
def squeeze(x, axes=None):
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(_ints(axes)))


@op("transpose")
def transpose(x, perm):
    return np.transpose(x, _ints(perm))


@op("reverse")
def reverse(x, axes=None):
    return np.flip(x) if axes is None else np.flip(x, axis=tuple(_ints(axes)))


def _slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    """slice_by_index's indexing tuple: numpy slices, and a plain index where squeeze_mask is set."""
    rank = len(shape)
    begin, end = _ints(begin), _ints(end)
    stride = _ints(stride) if stride is not None else [1] * rank
    bm = np.asarray(begin_mask).reshape(-1).tolist() if begin_mask is not None else [False] * rank
    em = np.asarray(end_mask).reshape(-1).tolist() if end_mask is not None else [False] * rank
    sm = np.asarray(squeeze_mask).reshape(-1).tolist() if squeeze_mask is not None else [False] * rank
    if not len(begin) == len(end) == len(stride) == rank:
        raise OpError(f"begin/end/stride lengths {len(begin)}/{len(end)}/{len(stride)} differ from rank {rank}")
    index = []
    for i in range(rank):
        if sm[i]:
            if not -shape[i] <= begin[i] < shape[i]:
                raise OpError(f"squeezed index {begin[i]} out of range for dimension {i} of size {shape[i]}")
            index.append(begin[i])
        else:
            index.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return tuple(index)


@op("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    x = np.asarray(x)
    return x[_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@op("slice_by_size")
def slice_by_size(x, begin, size):
    x = np.asarray(x)
    b, s = _ints(begin), _ints(size)
    return x[tuple(slice(bi, None if si == -1 else bi + si) for bi, si in zip(b, s))]


@op("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    out = np.array(x, copy=True)
    index = _slices(out.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    target = out[index]
    if np.shape(update) != target.shape:
        raise OpError(f"update shape {list(np.shape(update))} does not match the slice {list(target.shape)}")
    out[index] = update
    return out


def slice_update_in_place(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """slice_update writing into x itself (the interpreter uses it where nothing needs x's old contents)."""
    index = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    if np.shape(update) != x[index].shape:
        raise OpError(f"update shape {list(np.shape(update))} does not match the slice {list(x[index].shape)}")
    x[index] = update
    return x


@op("sliding_windows")
def sliding_windows(x, axis, size, stride=1):
    x = np.asarray(x)
    a = _axis(axis, x.ndim)
    windows = np.lib.stride_tricks.sliding_window_view(x, int(size), axis=a)  # [..., n, ..., size]
    windows = np.take(windows, np.arange(0, windows.shape[a], int(stride)), axis=a)
    return np.moveaxis(windows, -1, a + 1)


# ------------------------------------------------------------------------------------------ gather/scatter
def _check_indices(idx, size: int) -> np.ndarray:
    idx = np.asarray(idx).astype(np.int64)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        raise OpError(f"index out of range: values {int(idx.min())}..{int(idx.max())} for a dimension of {size}")
    return np.where(idx < 0, idx + size, idx)


@op("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    x = np.asarray(x)
    a, b = _axis(axis, x.ndim), int(batch_dims)
    idx = _check_indices(indices, x.shape[a])
    if b == 0:
        return np.take(x, idx, axis=a)
    batch = x.shape[:b]
    xs, ids = x.reshape((-1,) + x.shape[b:]), idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([np.take(xs[i], ids[i], axis=a - b) for i in range(xs.shape[0])])
    return out.reshape(batch + out.shape[1:])


@op("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    x = np.asarray(x)
    a = _axis(axis, x.ndim)
    return np.take_along_axis(x, _check_indices(indices, x.shape[a]), axis=a)


@op("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    x, idx = np.asarray(x), np.asarray(indices).astype(np.int64)
    b, k = int(batch_dims), idx.shape[-1]
    if b == 0:
        cols = tuple(_check_indices(idx[..., j], x.shape[j]) for j in range(k))
        return x[cols]
    batch = x.shape[:b]
    xs, ids = x.reshape((-1,) + x.shape[b:]), idx.reshape((-1,) + idx.shape[b:])
    out = np.stack([gather_nd(xs[i], ids[i]) for i in range(xs.shape[0])])
    return out.reshape(batch + out.shape[1:])


_SCATTER_MODES = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(out, index, updates, mode):
    if mode not in _SCATTER_MODES:
        raise OpError(f"scatter mode '{mode}' is not supported")
    ufunc = _SCATTER_MODES[mode]
    if ufunc is None:
        out[index] = updates
    else:
        ufunc.at(out, index, updates)
    return out


@op("scatter")
def scatter(data, indices, updates, axis=0, mode="update", validate_indices=False):
    out = np.array(data, copy=True)
    a = _axis(axis, out.ndim)
    idx = _check_indices(indices, out.shape[a])
    index = (slice(None),) * a + (idx,)
    return _scatter_into(out, index, updates, mode)


@op("scatter_along_axis")
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    out = np.array(data, copy=True)
    a = _axis(axis, out.ndim)
    idx = _check_indices(indices, out.shape[a])
    grid = list(np.indices(idx.shape, sparse=True))
    grid[a] = idx
    return _scatter_into(out, tuple(grid), updates, mode)


@op("scatter_nd")
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    out = np.array(data, copy=True)
    idx = np.asarray(indices)
    index = tuple(_check_indices(idx[..., j], out.shape[j]) for j in range(idx.shape[-1]))
    return _scatter_into(out, index, updates, mode)


# --------------------------------------------------------------------------------- constexpr (load time)
@op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """scale * (data - offset), scale and offset repeated over blocks of data.shape / scale.shape (iOS 18)."""
    data = np.asarray(data).astype(np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim != data.ndim or any(d % s for d, s in zip(data.shape, scale.shape)):
        raise OpError(f"scale shape {list(scale.shape)} does not tile data shape {list(data.shape)}")
    blocks = [d // s for d, s in zip(data.shape, scale.shape)]

    def spread(t):
        for axis, block in enumerate(blocks):
            if block > 1:
                t = np.repeat(t, block, axis=axis)
        return t

    if offset is not None:
        data = data - spread(np.asarray(offset).astype(np.float32))
    return spread(scale) * data


@op("constexpr_lut_to_dense")
def constexpr_lut_to_dense(indices, lut, shape=None, vector_axis=None):
    indices, lut = np.asarray(indices), np.asarray(lut)
    if shape is not None:  # iOS 16 form: packed uint8 indices into one flat LUT of 2^nbits entries
        from pocketllm.runtime_py.runners.coreml.package import decode_bytes

        nbits = int(math.log2(lut.size))
        dims = tuple(_ints(shape))
        dtype = {1: "uint1", 2: "uint2", 4: "uint4", 6: "uint6", 8: "uint8"}[nbits]
        return lut[decode_bytes(indices.astype(np.uint8), dtype, dims, where="constexpr_lut_to_dense")]
    # iOS 18 form: lut [*G, NUM_PALETTES, VECTOR_SIZE] with one table per block of indices.shape / G
    k = indices.ndim
    groups, vector = lut.shape[:k], lut.shape[-1]
    if any(d % g for d, g in zip(indices.shape, groups)):
        raise OpError(f"lut groups {list(groups)} do not tile indices shape {list(indices.shape)}")
    block = [d // g for d, g in zip(indices.shape, groups)]
    values = np.empty(indices.shape + (vector,), dtype=np.float32 if lut.dtype.kind == "f" else lut.dtype)
    rows = max(1, (1 << 24) // max(1, indices[:1].size))  # bound the temporaries of large tables (embeddings)
    for r in range(0, indices.shape[0], rows):
        part = indices[r:r + rows]
        group_index = tuple((np.arange(d) + (r if i == 0 else 0))[(slice(None),) + (None,) * (k - 1 - i)] // block[i]
                            for i, d in enumerate(part.shape))  # broadcastable per-axis group ids
        values[r:r + rows] = lut[group_index + (part,)]  # [*part.shape, VECTOR_SIZE]
    if vector == 1:
        return values[..., 0]
    if vector_axis is None:
        raise OpError("vector palettization needs vector_axis")
    va = _axis(vector_axis, k)
    values = np.moveaxis(values, -1, va + 1)  # the vector's elements follow each index along vector_axis
    shape_ = list(indices.shape)
    shape_[va] *= vector
    return values.reshape(shape_)


@op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    q = np.asarray(quantized_data).astype(np.float32)
    a = _axis(axis, q.ndim)

    def along(t):
        t = np.asarray(t).astype(np.float32)
        if t.ndim == 0:
            return t
        shape_ = [1] * q.ndim
        shape_[a] = t.size
        return t.reshape(shape_)

    return along(scale) * (q - along(zero_point))


@op("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return np.asarray(source_val, dtype=np.float32)


@op("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    nonzero_data = np.asarray(nonzero_data)
    if shape is not None:  # iOS 16: bit mask packed in bytes, LSB first
        from pocketllm.runtime_py.runners.coreml.package import decode_bytes

        dims = tuple(_ints(shape))
        mask = decode_bytes(np.asarray(mask).astype(np.uint8), "uint1", dims, where="constexpr_sparse_to_dense")
    mask = np.asarray(mask).astype(bool)
    if int(mask.sum()) != nonzero_data.size:
        raise OpError(f"mask has {int(mask.sum())} set bits for {nonzero_data.size} non-zero values")
    out = np.zeros(mask.shape, dtype=np.float32 if nonzero_data.dtype.kind == "f" else nonzero_data.dtype)
    out[mask] = nonzero_data.reshape(-1)
    return out


CONSTEXPR = {name for name in OPS if name.startswith("constexpr_")}
