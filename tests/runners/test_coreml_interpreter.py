"""The Core ML interpreter (runtime_py/runners/coreml) against numpy math and torch eager.

Every program here is built with coremltools (MIL Builder, or ct.convert of a torch module), SAVED as an
.mlpackage, and read back from disk by the interpreter: what is tested is our reading of the saved package.
Per-op programs are saved with an empty pass pipeline so that the op under test reaches the package unchanged
(each test checks that it did), and checked against numpy written here, on hand-checkable inputs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pocketllm.export.errors import PocketllmError

ct = pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from pocketllm.runtime_py.runners.coreml import Interpreter, load_package  # noqa: E402
from pocketllm.runtime_py.runners.coreml.engine import CoreMLEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
iOS18 = ct.target.iOS18
F32, I32, F16, BOOL = types.fp32, types.int32, types.fp16, types.bool


def save(program, path, precision: str = "fp32", passes: bool = False):
    """Save a MIL program (or torch ExportedProgram with extra ct.convert kwargs in a tuple) as an .mlpackage."""
    model = ct.convert(program, minimum_deployment_target=iOS18, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
                       pass_pipeline=None if passes else ct.PassPipeline.EMPTY)
    model.save(str(path))
    return path


def run_program(tmp_path, program, feeds, expect_ops=(), mode="fp32"):
    """Save, reload with the interpreter, check the ops under test are in the saved program, run "main"."""
    path = save(program, tmp_path / "p.mlpackage")
    interpreter = Interpreter(path, mode=mode)
    saved_ops = {op.type for op in interpreter.package.functions["main"].ops}
    missing = set(expect_ops) - saved_ops
    assert not missing, f"ops {missing} did not reach the saved program (it has {sorted(saved_ops)})"
    return list(interpreter.run("main", feeds).values())


# ------------------------------------------------------------------------------------------- per-op math
def test_elementwise_comparison_and_cast_ops(tmp_path):
    x = np.array([[1.5, -2.0, 4.0], [0.25, 9.0, -7.5]], np.float32)
    y = np.array([[0.5, 3.0, -2.0], [1.0, 2.0, 2.0]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32), mb.TensorSpec(y.shape, F32)], opset_version=iOS18)
    def prog(x, y):
        gt = mb.greater(x=x, y=y)
        return (mb.add(x=x, y=y), mb.real_div(x=x, y=y), mb.pow(x=x, y=2.0), mb.rsqrt(x=mb.abs(x=x), epsilon=0.0),
                mb.select(cond=gt, a=x, b=y), mb.logical_and(x=gt, y=mb.less(x=x, y=5.0)),
                mb.cast(x=x, dtype="int32"), mb.floor_div(x=x, y=y), mb.mod(x=x, y=y),
                mb.clip(x=x, alpha=-1.0, beta=2.0), mb.silu(x=x), mb.erf(x=y))

    out = run_program(tmp_path, prog, {"x": x, "y": y},
                      ["add", "real_div", "pow", "rsqrt", "select", "logical_and", "cast", "floor_div", "mod", "clip"])
    import math

    expected = [x + y, x / y, x * x, 1 / np.sqrt(np.abs(x)), np.where(x > y, x, y), (x > y) & (x < 5),
                np.array([[1, -2, 4], [0, 9, -7]]),  # cast truncates toward zero
                np.floor(x / y), x - np.floor(x / y) * y, np.clip(x, -1, 2), x / (1 + np.exp(-x)),
                np.vectorize(math.erf)(y)]
    for got, want in zip(out, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert out[6].dtype == np.int32  # (bool outputs are cast to fp32 by coremltools: Core ML returns no bools)


def test_slice_by_index_masks_squeeze_and_slice_by_size(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32)], opset_version=iOS18)
    def prog(x):
        a = mb.slice_by_index(x=x, begin=[1, 0, 3], end=[2, 3, 0], stride=[1, 2, -1],
                              end_mask=[False, False, True], squeeze_mask=[True, False, False])
        b = mb.slice_by_index(x=x, begin=[0, 2, 1], end=[1, 3, 3], begin_mask=[True, False, False],
                              squeeze_mask=[False, True, False])
        c = mb.slice_by_index(x=x, begin=[-1, -1, -2], end=[0, 0, 0], squeeze_mask=[True, True, True])
        d = mb.slice_by_size(x=x, begin=[0, 1, 1], size=[-1, 2, 2])
        return a, b, c, d

    a, b, c, d = run_program(tmp_path, prog, {"x": x}, ["slice_by_index", "slice_by_size"])
    np.testing.assert_array_equal(a, x[1, 0:3:2, 3::-1])  # rows 0 and 2 of x[1], columns reversed
    np.testing.assert_array_equal(b, x[0:1, 2, 1:3])
    assert c.shape == () and c == x[-1, -1, -2] == 22
    np.testing.assert_array_equal(d, x[:, 1:3, 1:3])


def test_concat_of_rank0_values_builds_a_vector(tmp_path):
    """coremltools builds shape vectors by concatenating scalars (e.g. a squeezed slice of the position)."""
    pos = np.array([7], np.int32)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)

    @mb.program(input_specs=[mb.TensorSpec((1,), I32), mb.TensorSpec(a.shape, F32)], opset_version=iOS18)
    def prog(pos, a):
        start = mb.slice_by_index(x=pos, begin=[0], end=[1], squeeze_mask=[True])  # rank 0
        return (mb.concat(values=[np.int32(0), start, np.int32(5)], axis=0),
                mb.concat(values=[a, mb.mul(x=a, y=10.0)], axis=0, interleave=True))

    vec, inter = run_program(tmp_path, prog, {"pos": pos, "a": a}, ["concat"])
    np.testing.assert_array_equal(vec, [0, 7, 5])
    np.testing.assert_array_equal(inter, [[0, 1, 2], [0, 10, 20], [3, 4, 5], [30, 40, 50]])


def test_reshape_transpose_expand_squeeze_tile(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32)], opset_version=iOS18)
    def prog(x):
        return (mb.reshape(x=x, shape=[1, 0, -1, 0]),  # iOS 17: zeros copy dims counted from the right
                mb.transpose(x=x, perm=[2, 0, 1]), mb.expand_dims(x=x, axes=[0, -1]),
                mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]), mb.tile(x=x, reps=[1, 2, 1]),
                mb.shape(x=x), mb.reverse(x=x, axes=[1]))

    out = run_program(tmp_path, prog, {"x": x}, ["reshape", "transpose", "expand_dims", "squeeze", "tile", "shape"])
    np.testing.assert_array_equal(out[0], x.reshape(1, 2, 3, 4))
    np.testing.assert_array_equal(out[1], x.transpose(2, 0, 1))
    assert out[2].shape == (1, 2, 3, 4, 1)
    np.testing.assert_array_equal(out[3], x)
    np.testing.assert_array_equal(out[4], np.tile(x, (1, 2, 1)))
    np.testing.assert_array_equal(out[5], [2, 3, 4])
    np.testing.assert_array_equal(out[6], x[:, ::-1])


def test_gather_ops(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    idx = np.array([[2, 0], [1, 1]], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32), mb.TensorSpec(idx.shape, I32)], opset_version=iOS18)
    def prog(x, idx):
        along = mb.gather_along_axis(x=x, indices=np.array([[[0, 3]], [[1, 2]]], np.int32)
                                     * np.ones((1, 3, 1), np.int32), axis=2)
        return (mb.gather(x=x, indices=idx, axis=1),
                mb.gather(x=x, indices=idx, axis=1, batch_dims=1),  # row b of idx picks from x[b]
                along, mb.gather_nd(x=x, indices=np.array([[1, 2], [0, 0]], np.int32)))

    plain, batched, along, nd = run_program(tmp_path, prog, {"x": x, "idx": idx}, ["gather", "gather_nd"])
    np.testing.assert_array_equal(plain, x[:, idx])
    np.testing.assert_array_equal(batched, np.stack([x[0][[2, 0]], x[1][[1, 1]]]))
    np.testing.assert_array_equal(along[0], x[0][:, [0, 3]])
    np.testing.assert_array_equal(along[1], x[1][:, [1, 2]])
    np.testing.assert_array_equal(nd, np.stack([x[1, 2], x[0, 0]]))


def test_scatter_ops(tmp_path):
    data = np.zeros((3, 4), np.float32)

    @mb.program(input_specs=[mb.TensorSpec(data.shape, F32)], opset_version=iOS18)
    def prog(data):
        upd = np.array([[1, 2, 3, 4], [10, 20, 30, 40]], np.float32)
        return (mb.scatter(data=data, indices=np.array([2, 2], np.int32), updates=upd, axis=0, mode="add"),
                mb.scatter_along_axis(data=data, indices=np.array([[3, 0], [1, 2], [0, 3]], np.int32),
                                      updates=np.array([[5, 6], [7, 8], [9, 10]], np.float32), axis=1, mode="update"),
                mb.scatter_nd(data=data, indices=np.array([[0, 1], [0, 1], [2, 3]], np.int32),
                              updates=np.array([1.0, 2.0, 7.0], np.float32), mode="add"))

    add, along, nd = run_program(tmp_path, prog, {"data": data}, ["scatter", "scatter_along_axis", "scatter_nd"])
    np.testing.assert_array_equal(add, [[0] * 4, [0] * 4, [11, 22, 33, 44]])  # duplicates accumulate
    np.testing.assert_array_equal(along, [[6, 0, 0, 5], [0, 7, 8, 0], [9, 0, 0, 10]])
    np.testing.assert_array_equal(nd, [[0, 3, 0, 0], [0] * 4, [0, 0, 0, 7]])


def test_topk_breaks_ties_by_lower_index(tmp_path):
    x = np.array([[3.0, 1.0, 3.0, 2.0, 3.0]], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32)], opset_version=iOS18)
    def prog(x):
        values, indices = mb.topk(x=x, k=3, axis=-1)
        low_values, low_indices = mb.topk(x=x, k=2, ascending=True)
        return values, indices, low_values, low_indices, mb.argsort(x=x, axis=-1)

    values, indices, low_values, low_indices, order = run_program(tmp_path, prog, {"x": x}, ["topk", "argsort"])
    np.testing.assert_array_equal(values, [[3, 3, 3]])
    np.testing.assert_array_equal(indices, [[0, 2, 4]])
    np.testing.assert_array_equal(low_values, [[1, 2]])
    np.testing.assert_array_equal(low_indices, [[1, 3]])
    np.testing.assert_array_equal(order, [[0, 2, 4, 3, 1]])
    assert indices.dtype == np.int32


def test_reductions_softmax_cumsum_band_part_range_fill(tmp_path):
    x = np.array([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]], np.float32)
    m = np.arange(16, dtype=np.float32).reshape(4, 4)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32), mb.TensorSpec(m.shape, F32),
                             mb.TensorSpec((1,), I32)], opset_version=iOS18)
    def prog(x, m, n1):
        n = mb.squeeze(x=n1)  # rank 0
        return (mb.reduce_mean(x=x, axes=[-1], keep_dims=True), mb.reduce_sum(x=x, axes=[0]),
                mb.reduce_max(x=x), mb.reduce_argmax(x=x, axis=1), mb.softmax(x=x, axis=-1),
                mb.cumsum(x=x, axis=1, exclusive=True, reverse=True), mb.band_part(x=m, lower=1, upper=0),
                mb.range_1d(start=2, end=n, step=3), mb.fill(shape=mb.concat(values=[n, 2], axis=0), value=1.5),
                mb.reduce_log_sum_exp(x=x, axes=[1]))

    out = run_program(tmp_path, prog, {"x": x, "m": m, "n1": np.array([9], np.int32)},
                      ["reduce_mean", "reduce_sum", "reduce_max", "reduce_argmax", "softmax", "cumsum", "band_part",
                       "range_1d", "fill"])
    np.testing.assert_allclose(out[0], [[2.0], [3.5 / 3]], rtol=1e-6)
    np.testing.assert_array_equal(out[1], [5.0, 1.0, 3.5])
    assert out[2] == 4.0
    np.testing.assert_array_equal(out[3], [2, 0])
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(out[4], e / e.sum(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(out[5], [[5.0, 3.0, 0.0], [-0.5, 0.5, 0.0]])  # sum of the elements after
    np.testing.assert_array_equal(out[6], np.tril(m) - np.tril(m, -2))  # diagonal and one below
    np.testing.assert_array_equal(out[7], [2, 5, 8])
    np.testing.assert_array_equal(out[8], np.full((9, 2), 1.5))
    np.testing.assert_allclose(out[9], np.log(np.exp(x).sum(1)), rtol=1e-6)


def test_matmul_linear_einsum_and_attention(tmp_path):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    k = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    v = rng.standard_normal((1, 2, 5, 4)).astype(np.float32)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    mask = np.tril(np.ones((3, 5), bool), 2)
    e = rng.standard_normal((1, 4, 3, 5)).astype(np.float32)  # [n, w, h, u] for q [n, c, h, w]

    @mb.program(input_specs=[mb.TensorSpec(q.shape, F32), mb.TensorSpec(k.shape, F32), mb.TensorSpec(v.shape, F32),
                             mb.TensorSpec(mask.shape, BOOL)], opset_version=iOS18)
    def prog(q, k, v, mask):
        return (mb.matmul(x=q, y=k, transpose_y=True), mb.linear(x=q, weight=w, bias=bias),
                mb.einsum(values=(q, e), equation="nchw,nwhu->nchu"),
                mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask))

    mm, lin, es, att = run_program(tmp_path, prog, {"q": q, "k": k, "v": v, "mask": mask},
                                   ["matmul", "linear", "einsum", "scaled_dot_product_attention"])
    np.testing.assert_allclose(mm, q @ k.transpose(0, 1, 3, 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin, q @ w.T + bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(es, np.einsum("nchw,nwhu->nchu", q, e), rtol=1e-5, atol=1e-6)
    scores = np.where(mask, q @ k.transpose(0, 1, 3, 2) / 2.0, -np.inf)  # sqrt(4) = 2
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(att, (p / p.sum(-1, keepdims=True)) @ v, rtol=1e-5, atol=1e-6)


def test_sliding_windows(tmp_path):
    x = np.arange(10, dtype=np.float32).reshape(1, 10)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32)], opset_version=iOS18)
    def prog(x):
        return mb.sliding_windows(x=x, axis=1, size=4, stride=3)

    (out,) = run_program(tmp_path, prog, {"x": x}, ["sliding_windows"])
    np.testing.assert_array_equal(out, [[[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]])


# -------------------------------------------------------------------------------- compressed weights
def test_constexpr_weights_dequantise_exactly(tmp_path):
    """Per-row 4-bit LUT (what palettize per_grouped_channel group_size=1 stores), blockwise int4 with offset and
    int8 without, iOS 16 affine int8: the weights a linear reads equal the numpy dequantisation."""
    rng = np.random.default_rng(1)
    n, k = 8, 64
    lut = rng.standard_normal((n, 1, 16, 1)).astype(np.float16)
    idx = rng.integers(0, 16, (n, k)).astype(np.uint8)
    q4 = rng.integers(-8, 8, (n, k)).astype(np.int8)
    s4 = (rng.random((n, k // 32)) + 0.5).astype(np.float16)
    z4 = rng.integers(-8, 8, (n, k // 32)).astype(np.int8)
    q8 = rng.integers(-128, 128, (n, k)).astype(np.int8)
    s8 = (rng.random((n, 1)) * 0.01).astype(np.float16)
    x = np.eye(k, dtype=np.float16)  # x @ W.T = W.T: the linear returns the dense weights

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F16)], opset_version=iOS18)
    def prog(x):
        w_lut = mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint4_dtype), lut=lut)
        w_q4 = mb.constexpr_blockwise_shift_scale(data=q4.astype(types.np_int4_dtype), scale=s4,
                                                  offset=z4.astype(types.np_int4_dtype))
        w_q8 = mb.constexpr_blockwise_shift_scale(data=q8, scale=s8)
        return tuple(mb.linear(x=x, weight=w) for w in (w_lut, w_q4, w_q8))

    got = run_program(tmp_path, prog, {"x": x}, ["constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"])
    lut32 = lut.astype(np.float32)[:, 0, :, 0]
    want_lut = np.take_along_axis(lut32, idx.astype(np.int64), axis=1)
    want_q4 = (q4 - np.repeat(z4, 32, axis=1)).astype(np.float32) * np.repeat(s4.astype(np.float32), 32, axis=1)
    want_q8 = q8.astype(np.float32) * s8.astype(np.float32)
    for g, w in zip(got, (want_lut, want_q4, want_q8)):
        np.testing.assert_array_equal(g, w.T)


def test_weight_blob_reader_matches_coremltools(tmp_path):
    """Our MILBlob reader (memory-mapped, sub-byte unpacking) against coremltools' own C++ reader."""
    from coremltools.libmilstoragepython import _BlobStorageReader

    from pocketllm.runtime_py.runners.coreml.package import BlobFile, _tensor_type

    rng = np.random.default_rng(2)
    w16 = rng.standard_normal((40, 24)).astype(np.float16)
    idx = rng.integers(0, 16, (40, 24)).astype(np.uint8)
    q4 = rng.integers(-8, 8, (40, 24)).astype(np.int8)

    @mb.program(input_specs=[mb.TensorSpec((2, 24), F16)], opset_version=iOS18)
    def prog(x):
        a = mb.linear(x=x, weight=w16)
        b = mb.linear(x=x, weight=mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint4_dtype),
                                                             lut=np.arange(16, dtype=np.float16).reshape(1, 1, 16, 1)))
        c = mb.linear(x=x, weight=mb.constexpr_blockwise_shift_scale(data=q4.astype(types.np_int4_dtype),
                                                                     scale=np.ones((40, 1), np.float16)))
        return a, b, c

    path = save(prog, tmp_path / "w.mlpackage", precision="fp16")
    weights = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    ours, theirs = BlobFile(weights), _BlobStorageReader(str(weights))
    read = {"fp16": lambda o: theirs.read_fp16_data(o).view(np.float16), "uint4": theirs.read_uint4_data,
            "int4": theirs.read_int4_data}
    checked = 0
    for op in ct.utils.load_spec(str(path)).mlProgram.functions["main"].block_specializations["CoreML8"].operations:
        value = op.attributes["val"] if op.type == "const" else None
        if value is None or value.WhichOneof("value") != "blobFileValue":
            continue
        t = _tensor_type(value.type, "test")
        offset = value.blobFileValue.offset
        np.testing.assert_array_equal(ours.read(offset, t.dtype, t.shape),
                                      np.asarray(read[t.dtype](offset)).reshape(t.shape))
        checked += 1
    assert checked >= 3  # fp16 weight, uint4 indices, int4 data all went to the blob file


# ---------------------------------------------------------------------------------------------- states
def accumulator(shape=(2,), dtype=F16):
    @mb.program(input_specs=[mb.StateTensorSpec(shape, dtype), mb.TensorSpec(shape, dtype)], opset_version=iOS18)
    def add(acc, x):
        total = mb.add(x=mb.read_state(input=acc), y=x)
        mb.coreml_update_state(state=acc, value=total)
        return mb.identity(x=total)

    @mb.program(input_specs=[mb.StateTensorSpec(shape, dtype), mb.TensorSpec(shape, dtype)], opset_version=iOS18)
    def scale(acc, x):
        return mb.mul(x=mb.read_state(input=acc), y=x)

    return add, scale


def test_states_persist_across_calls_and_reset_to_zeros(tmp_path):
    add, _ = accumulator()
    interpreter = Interpreter(save(add, tmp_path / "acc.mlpackage"), mode="fp16")
    for step in (1, 2, 3):
        (total,) = interpreter.run("main", {"x": np.array([1.0, 0.5])}).values()
        np.testing.assert_array_equal(total, [step, step * 0.5])
    np.testing.assert_array_equal(interpreter.states["acc"], [3.0, 1.5])
    interpreter.reset_states()
    np.testing.assert_array_equal(interpreter.run("main", {"x": np.array([2.0, 2.0])})["identity_0"], [2.0, 2.0])


def test_multifunction_package_shares_states_between_functions(tmp_path):
    add, scale = accumulator()
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(save(add, tmp_path / "add.mlpackage")), src_function_name="main",
                      target_function_name="accumulate")
    desc.add_function(str(save(scale, tmp_path / "scale.mlpackage")), src_function_name="main",
                      target_function_name="scale")
    desc.default_function_name = "accumulate"
    ct.utils.save_multifunction(desc, str(tmp_path / "both.mlpackage"))

    interpreter = Interpreter(tmp_path / "both.mlpackage", mode="fp16")
    assert set(interpreter.functions) == {"accumulate", "scale"}
    interpreter.run("accumulate", {"x": np.array([1.0, 2.0])})
    interpreter.run("accumulate", {"x": np.array([1.0, 2.0])})
    (scaled,) = interpreter.run("scale", {"x": np.array([10.0, 100.0])}).values()
    np.testing.assert_array_equal(scaled, [20.0, 400.0])  # "scale" reads what "accumulate" wrote


def test_unknown_op_is_a_one_line_error_naming_op_and_function(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 4, 2, 2), F32)], opset_version=iOS18)
    def prog(x):
        return mb.depth_to_space(x=x, block_size=2)

    path = save(prog, tmp_path / "d2s.mlpackage")
    with pytest.raises(PocketllmError) as err:
        Interpreter(path)
    message = str(err.value)
    assert "depth_to_space" in message and "function 'main'" in message and "\n" not in message


def test_cond_runs_only_the_chosen_block(tmp_path):
    """`cond` (the Core ML target's routed MoE experts): the chosen block runs, reading values defined before the
    op (a weight outside the branch); the other block does not run (here it would gather out of range, an error)."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.arange(9, dtype=np.float32).reshape(3, 3) - 4

    @mb.program(input_specs=[mb.TensorSpec((2, 3), F32), mb.TensorSpec((1,), I32)], opset_version=iOS18)
    def prog(x, flag):
        weight = mb.const(val=w)
        pred = mb.greater(x=mb.reduce_sum(x=flag, axes=[0], keep_dims=False), y=np.int32(0))
        y = mb.cond(pred=pred, _true_fn=lambda: mb.matmul(x=mb.slice_by_size(x=x, begin=[0, 0], size=[1, 3]),
                                                          y=weight),
                    _false_fn=lambda: mb.gather(x=x, indices=mb.add(x=flag, y=np.int32(5)), axis=0))
        return mb.add(x=y, y=1.0)

    path = save(prog, tmp_path / "cond.mlpackage")
    interpreter = Interpreter(path, mode="fp32")
    cond = [op for op in interpreter.package.functions["main"].ops if op.type == "cond"]
    assert len(cond) == 1 and len(cond[0].blocks) == 2
    (taken,) = interpreter.run("main", {"x": x, "flag": np.int32([1])}).values()  # false block: index 6
    np.testing.assert_allclose(taken, x[:1] @ w + 1)
    (other,) = interpreter.run("main", {"x": x, "flag": np.int32([-4])}).values()
    np.testing.assert_allclose(other, x[1:2] + 1)
    with pytest.raises(PocketllmError, match="gather"):  # the gather does run when chosen, and checks its index
        interpreter.run("main", {"x": x, "flag": np.int32([-9])})


def test_bad_inputs_and_modes_are_clear_errors(tmp_path):
    add, _ = accumulator()
    path = save(add, tmp_path / "acc.mlpackage")
    with pytest.raises(PocketllmError, match="mode must be one of"):
        Interpreter(path, mode="bf16")
    interpreter = Interpreter(path)
    with pytest.raises(PocketllmError, match="missing: x"):
        interpreter.run("main", {})
    with pytest.raises(PocketllmError, match=r"input 'x' has shape \[3\]"):
        interpreter.run("main", {"x": np.zeros(3)})
    with pytest.raises(PocketllmError, match="no function 'decode'"):
        interpreter.run("decode", {"x": np.zeros(2)})
    with pytest.raises(PocketllmError, match="not found"):
        load_package(tmp_path / "missing.mlpackage")


# ------------------------------------------------------------------------------------------ fp16 modes
def test_fp16_mode_rounds_each_op_result_like_torch_fp16(tmp_path):
    """(1000 x + 0.3) - 1000 x with 1000 x in [512, 1024): fp16 rounds to multiples of 0.5, so the result is 0 or 0.5;
    fp32 keeps 0.3. fp16 mode must reproduce torch's fp16 eager results exactly (one rounding per op)."""
    x = np.array([0.6, 0.7071, 0.81, 0.9, 0.55, 0.99], np.float32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32)], opset_version=iOS18)
    def prog(x):
        h = mb.mul(x=x, y=1000.0)
        return mb.sub(x=mb.add(x=h, y=0.3), y=h)

    path = save(prog, tmp_path / "cancel.mlpackage", precision="fp16", passes=True)
    assert {"cast", "mul", "add", "sub"} <= {op.type for op in load_package(path).functions["main"].ops}
    (fp16,) = Interpreter(path, mode="fp16").run("main", {"x": x}).values()
    (fp32,) = Interpreter(path, mode="fp32").run("main", {"x": x}).values()
    t = torch.tensor(x).half()
    h = t * 1000.0
    np.testing.assert_array_equal(fp16, ((h + 0.3) - h).float().numpy())
    np.testing.assert_allclose(fp32, 0.3, atol=1e-4)
    assert set(fp16.tolist()) <= {0.0, 0.5} and np.abs(fp16 - 0.3).min() >= 0.15


def test_fp16_rounding_overflows_to_inf_as_on_device(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2,), F32)], opset_version=iOS18)
    def prog(x):
        return mb.mul(x=x, y=300.0)

    path = save(prog, tmp_path / "big.mlpackage", precision="fp16", passes=True)
    x = np.array([100.0, 300.0], np.float32)  # 30000 fits in fp16 (max 65504); 90000 does not
    (fp16,) = Interpreter(path, mode="fp16").run("main", {"x": x}).values()
    (fp32,) = Interpreter(path, mode="fp32").run("main", {"x": x}).values()
    assert fp16[0] == 30000.0 and np.isinf(fp16[1])
    np.testing.assert_array_equal(fp32, [30000.0, 90000.0])


# ------------------------------------------------------------------------- converted torch modules
class ToyLM(torch.nn.Module):
    """Embedding -> one attention head over a KV cache written by slice assignment (as export/nn does) -> head."""

    def __init__(self, vocab: int = 32, dim: int = 16, max_len: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dim, self.max_len = dim, max_len
        self.embed = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.qkv = torch.nn.Parameter(torch.randn(3 * dim, dim, generator=g) / dim ** 0.5)
        self.head = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) / dim ** 0.5)
        self.register_buffer("k_cache", torch.zeros(1, max_len, dim))
        self.register_buffer("v_cache", torch.zeros(1, max_len, dim))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        p = pos[0].item()
        torch._check_is_size(p)
        torch._check(p + T <= self.max_len)
        x = self.embed[tokens]
        q, k, v = (x @ self.qkv.T).split(self.dim, dim=-1)
        self.k_cache[:, p:p + T] = k
        self.v_cache[:, p:p + T] = v
        keys, values = self.k_cache[:, :p + T], self.v_cache[:, :p + T]
        scores = q @ keys.transpose(1, 2) / self.dim ** 0.5
        visible = torch.arange(p + T)[None, :] <= (p + torch.arange(T))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ values + x) @ self.head.T


def convert_torch(module, example, states: list[str], path, precision: str, input_names=("tokens", "pos")):
    """torch.export + ct.convert with the named buffers as fp16 Core ML states (iOS 18), saved at path."""
    ep = torch.export.export(module, example, strict=False)
    buffers = dict(module.named_buffers())
    model = ct.convert(
        ep.run_decompositions({}),
        inputs=[ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.int32) for n, t in zip(input_names, example)],
        states=[ct.StateType(wrapped_type=ct.TensorType(shape=tuple(buffers[n].shape), dtype=np.float16), name=n)
                for n in states],
        minimum_deployment_target=iOS18, skip_model_load=True,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)
    model.save(str(path))
    return path


def multifunction(parts: dict[str, object], out):
    """One package whose functions (name -> single-function package path) share weights and states."""
    desc = ct.utils.MultiFunctionDescriptor()
    for name, path in parts.items():
        desc.add_function(str(path), src_function_name="main", target_function_name=name)
    desc.default_function_name = next(iter(parts))
    ct.utils.save_multifunction(desc, str(out))
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """ToyLM as an fp16 multifunction package: prefill over 4 tokens, decode over 1, sharing the KV states."""
    root = tmp_path_factory.mktemp("toy")
    model = ToyLM().eval()
    pos = torch.zeros(1, dtype=torch.long)
    parts = {name: convert_torch(model, (torch.zeros(1, t, dtype=torch.long), pos), ["k_cache", "v_cache"],
                                 root / f"{name}.mlpackage", "fp16")
             for name, t in (("prefill", 4), ("decode", 1))}
    return model, multifunction(parts, root / "model.mlpackage")


def toy_reference(model: ToyLM, calls, dtype) -> list[np.ndarray]:
    """Torch eager logits for a sequence of (tokens, pos) calls, on a fresh copy of the model in `dtype`."""
    import copy

    m = copy.deepcopy(model).to(dtype)
    outs = []
    with torch.no_grad():
        for tokens, pos in calls:
            outs.append(m(torch.tensor(tokens)[None], torch.tensor([pos])).float().numpy()[0])
    return outs


TOY_CALLS = [([3, 17, 5, 30], 0), ([9], 4), ([1], 5), ([22, 7, 7, 2], 6)]


def run_toy(interpreter, calls=TOY_CALLS):
    outs = []
    for tokens, pos in calls:
        fn = "prefill" if len(tokens) == 4 else "decode"
        feeds = {"tokens": np.array(tokens)[None], "pos": np.array([pos])}
        outs.append(next(iter(interpreter.run(fn, feeds).values()))[0])
    return outs


def test_stateful_toy_model_matches_torch_in_both_modes(toy):
    """A stateful fp16 package (prefill + decode sharing the KV cache): fp32 mode reproduces torch fp32 eager on the
    package's fp16 weights; fp16 mode reproduces torch fp16 eager, and is clearly closer to it than fp32 mode is."""
    model, path = toy
    fp32 = run_toy(Interpreter(path, mode="fp32"))
    fp16 = run_toy(Interpreter(path, mode="fp16"))
    eager32 = toy_reference(_rounded(model), TOY_CALLS, torch.float32)  # the package stores fp16 weights
    eager16 = toy_reference(model, TOY_CALLS, torch.float16)
    err32 = max(np.abs(a - b).max() for a, b in zip(fp32, eager32))
    err16 = max(np.abs(a - b).max() for a, b in zip(fp16, eager16))
    gap = max(np.abs(a - b).max() for a, b in zip(fp16, fp32))
    scale = max(np.abs(a).max() for a in eager32)
    assert err32 <= 1e-5 * scale
    assert err16 <= 1e-4 * scale  # measured 5e-7 (scale 4.6): torch fp16 eager rounds once per op, as we do
    assert gap >= 1e-4 * scale and gap >= 10 * err16  # measured 1.4e-3: fp16 rounding shows


def test_engine_drives_prefill_and_decode_through_the_manifest(toy, tmp_path):
    """CoreMLEngine reads function / input / output names from the manifest (decode's roles left for the adapter
    to infer), pads a short prompt into the 4-token prefill chunk, decodes single tokens, and restarts at 0."""
    model, path = toy
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copytree(path, bundle / "model.mlpackage")
    logits_name = next(iter(load_package(path).functions["prefill"].outputs))
    manifest = {"schema_version": 2, "model": {"vocab_size": 32, "max_context": 12},
                "targets": {"coreml": {
                    "file": "model.mlpackage", "deployment_target": "iOS18", "compute_precision": "float16",
                    "functions": {
                        "prefill": {"name": "prefill",
                                    "inputs": [{"name": "tokens", "role": "tokens", "dtype": "int32", "shape": [1, 4]},
                                               {"name": "pos", "role": "position", "dtype": "int32", "shape": [1]}],
                                    "outputs": [{"name": logits_name, "role": "logits"}]},
                        "decode": {"name": "decode"}},
                    "states": [{"name": "k_cache", "dtype": "float16", "shape": [1, 12, 16]},
                               {"name": "v_cache", "dtype": "float16", "shape": [1, 12, 16]}],
                    "prefill_chunk": 4}}}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    engine = CoreMLEngine(bundle, mode="fp32", manifest=manifest)
    prompt = [3, 17, 5, 30, 9, 1]  # 4 + 2: the second chunk is padded
    eager = toy_reference(_rounded(model), [(prompt, 0), ([11], 6), ([4], 7)], torch.float32)
    got = [engine.forward(np.array(prompt), 0), engine.forward(np.array([11]), 6), engine.forward(np.array([4]), 7)]
    for g, e in zip(got, eager):
        np.testing.assert_allclose(g, e, atol=1e-4)
    again = engine.forward(np.array(prompt[:3]), 0)  # start_pos 0: fresh states, shorter prompt
    np.testing.assert_allclose(again, eager[0][:3], atol=1e-4)
    with pytest.raises(PocketllmError, match="start_pos 9 must be between 0 and the 3 cached"):
        engine.forward(np.array([1]), 9)
    bad = json.loads(json.dumps(manifest))
    bad["targets"]["coreml"]["functions"]["decode"]["name"] = "step"
    with pytest.raises(PocketllmError, match="functions.decode.name 'step' is not a function of the package"):
        CoreMLEngine(bundle, manifest=bad)


def _rounded(model: ToyLM) -> ToyLM:
    """The model with its weights rounded to fp16, as an fp16 package stores them."""
    rounded = ToyLM().eval()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return rounded


# ------------------------------------------------------------ the project's tiny model, end to end
class TokensAndPosition(torch.nn.Module):
    """export/nn CausalLM with the (tokens [1, T], start_pos [1]) signature of our exported programs."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, tokens, pos):
        return self.m(tokens, pos)


class GQAAsRepeat:
    """coremltools 9.0 drops `enable_gqa=True` of scaled_dot_product_attention: it tiles the KV heads
    ([k0, k1, k0, k1]) where GQA repeats each one ([k0, k0, k1, k1]), a silently wrong model. While active, sdpa
    expands the KV heads with repeat_interleave first, which converts correctly."""

    def __enter__(self):
        self.sdpa = torch.nn.functional.scaled_dot_product_attention
        original = self.sdpa

        def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if enable_gqa and k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

        torch.nn.functional.scaled_dot_product_attention = sdpa

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.sdpa


TINY_CONTEXT, TINY_CHUNK = 64, 8


def convert_tiny(checkpoint, tokens: int, path, precision: str, fix_gqa: bool = True):
    from contextlib import nullcontext

    from pocketllm.export.nn import load_model

    model, _ = load_model(checkpoint, max_context=TINY_CONTEXT, dtype="fp32")
    wrapper = TokensAndPosition(model).eval()
    caches = [n for n, _ in wrapper.named_buffers() if n.endswith(("k_cache", "v_cache"))]
    example = (torch.zeros(1, tokens, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with GQAAsRepeat() if fix_gqa else nullcontext():
        return convert_torch(wrapper, example, caches, path, precision)


def tiny_bundle(checkpoint, root, precision: str):
    """A bundle with a multifunction package (prefill over TINY_CHUNK tokens, decode over 1) and a v2 manifest."""
    root.mkdir()
    parts = {name: convert_tiny(checkpoint, t, root / f"{name}.mlpackage", precision)
             for name, t in (("prefill", TINY_CHUNK), ("decode", 1))}
    multifunction(parts, root / "model.mlpackage")
    for p in parts.values():
        shutil.rmtree(p)
    manifest = {"schema_version": 2, "model": {"vocab_size": 512, "max_context": TINY_CONTEXT},
                "targets": {"coreml": {"file": "model.mlpackage", "functions": {"prefill": {"name": "prefill"},
                                                                               "decode": {"name": "decode"}},
                                       "prefill_chunk": TINY_CHUNK}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, manifest


@pytest.fixture(scope="module")
def tiny_bundles(tiny_dirs, tmp_path_factory):
    """minicpm4 tiny (dense: sparse_config removed), fp32 weights, converted naively with fp32 and fp16 precision."""
    root = tmp_path_factory.mktemp("tiny_coreml")
    return {p: tiny_bundle(tiny_dirs["minicpm4_dense"], root / p, p) for p in ("fp32", "fp16")}


PROMPT = [1, 57, 301, 8, 99, 444, 12, 5, 230, 17, 64, 3, 400]  # 13 tokens: one full prefill chunk + one padded


def greedy(engine, prompt, steps: int) -> tuple[list[int], list[np.ndarray]]:
    logits = [engine.forward(np.array(prompt), 0)]
    tokens = []
    for i in range(steps):
        tokens.append(int(np.argmax(logits[-1][-1])))
        logits.append(engine.forward(np.array(tokens[-1:]), len(prompt) + i))
    return tokens, logits


def test_tiny_model_fp32_mode_matches_the_numpy_reference(tiny_bundles, tiny_dirs):
    from pocketllm.runtime_py import ReferenceModel

    bundle, manifest = tiny_bundles["fp32"]
    engine = CoreMLEngine(bundle, mode="fp32", manifest=manifest)
    reference = ReferenceModel.from_checkpoint(tiny_dirs["minicpm4_dense"], max_context=TINY_CONTEXT)
    tokens, got = greedy(engine, PROMPT, 12)
    ref_tokens, want = greedy(reference, PROMPT, 12)
    assert tokens == ref_tokens
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) <= 1e-4  # measured ~3e-6


def test_tiny_model_fp16_mode_stays_close_to_the_reference(tiny_bundles, tiny_dirs):
    """fp16 weights and fp16 activations: the logits move by fp16 rounding (their ulp at |logit| ~ 25 is 0.016),
    but stay within 2e-3 of the largest logit, and the greedy continuation is the reference's."""
    from pocketllm.runtime_py import ReferenceModel

    bundle, manifest = tiny_bundles["fp16"]
    engine = CoreMLEngine(bundle, mode="fp16", manifest=manifest)
    reference = ReferenceModel.from_checkpoint(tiny_dirs["minicpm4_dense"], max_context=TINY_CONTEXT)
    tokens, got = greedy(engine, PROMPT, 24)
    ref_tokens, want = greedy(reference, PROMPT, 24)
    assert tokens == ref_tokens
    scale = max(np.abs(w).max() for w in want)
    delta = max(np.abs(g - w).max() for g, w in zip(got, want))
    assert 1e-4 * scale <= delta <= 2e-3 * scale  # fp16 shows, within bounds


def test_naive_gqa_conversion_is_caught_by_the_interpreter(tiny_dirs, tmp_path):
    """Without GQAAsRepeat, coremltools 9.0 converts GQA attention wrongly; the interpreter exposes it."""
    from pocketllm.runtime_py import ReferenceModel

    path = convert_tiny(tiny_dirs["minicpm4_dense"], 1, tmp_path / "naive.mlpackage", "fp32", fix_gqa=False)
    interpreter = Interpreter(path, mode="fp32")
    reference = ReferenceModel.from_checkpoint(tiny_dirs["minicpm4_dense"], max_context=TINY_CONTEXT)
    delta = 0.0
    for pos, token in enumerate(PROMPT[:4]):
        (logits,) = interpreter.run("main", {"tokens": np.array([[token]]), "pos": np.array([pos])}).values()
        delta = max(delta, np.abs(logits[0] - reference.forward(np.array([token]), pos)).max())
    assert delta > 0.1


def test_cache_update_in_place_only_where_the_old_state_is_dead(tmp_path):
    """read_state -> slice_update -> write_state is done in place (no cache copy per call) unless the old value is
    still read after the update; a view of the old value used before the update is fine (coremltools' T=1 cache
    update reads the target rows first). All forms give the math of a copying slice_update."""
    def program(old_use: str):
        @mb.program(input_specs=[mb.StateTensorSpec((4, 2), F16), mb.TensorSpec((1, 2), F16),
                                 mb.TensorSpec((1,), I32)], opset_version=iOS18)
        def prog(cache, row, pos):
            old = mb.read_state(input=cache)
            end = mb.add(x=pos, y=1)
            begin, stop = mb.concat(values=[pos, [0]], axis=0), mb.concat(values=[end, [2]], axis=0)
            before = mb.reduce_sum(x=mb.slice_by_index(x=old, begin=begin, end=stop))  # a view, used before
            new = mb.slice_update(x=old, update=row, begin=begin, end=stop)
            mb.coreml_update_state(state=cache, value=new)
            if old_use == "after":
                return mb.sub(x=new, y=old)
            return mb.add(x=new, y=before) if old_use == "view_before" else mb.identity(x=new)
        return prog

    for old_use, expect_in_place in (("none", 1), ("view_before", 1), ("after", 0)):
        interpreter = Interpreter(save(program(old_use), tmp_path / f"c{old_use}.mlpackage"), mode="fp32")
        assert interpreter.functions["main"].in_place == expect_in_place, old_use
        for pos in range(3):
            row = np.array([[pos + 1.0, 10.0 * (pos + 1)]], np.float16)
            (out,) = interpreter.run("main", {"row": row, "pos": np.array([pos])}).values()
            want = np.zeros((4, 2), np.float32)
            if old_use == "after":
                want[pos] = row[0]  # only the row that changed
            else:
                want[:pos + 1] = [[i + 1.0, 10.0 * (i + 1)] for i in range(pos + 1)]  # (the old row was 0)
            np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(interpreter.states["cache"][:3], [[1, 10], [2, 20], [3, 30]])
        if old_use == "view_before":  # rewrite row 0: the view saw the old row (1 + 10) before the update
            (out,) = interpreter.run("main", {"row": np.array([[5.0, 50.0]]), "pos": np.array([0])}).values()
            np.testing.assert_array_equal(out, np.array([[5, 50], [2, 20], [3, 30], [0, 0]]) + 11.0)


def test_no_in_place_update_while_a_view_of_the_old_state_is_alive(tmp_path):
    """A reshape of an earlier read of the cache (a numpy view of the state's array) is used after the update:
    the update must copy, or that reshape would show the new row."""
    @mb.program(input_specs=[mb.StateTensorSpec((4, 2), F16), mb.TensorSpec((1, 2), F16)], opset_version=iOS18)
    def prog(cache, row):
        before = mb.reshape(x=mb.read_state(input=cache), shape=[8])
        new = mb.slice_update(x=mb.read_state(input=cache), update=row, begin=[1, 0], end=[2, 2])
        mb.coreml_update_state(state=cache, value=new)
        return mb.reduce_sum(x=before)

    interpreter = Interpreter(save(prog, tmp_path / "view.mlpackage"), mode="fp16")
    assert interpreter.functions["main"].in_place == 0
    sums = [interpreter.run("main", {"row": np.array([[1.0, 2.0]])})["reduce_sum_0"] for _ in range(2)]
    assert sums == [0.0, 3.0]  # the first call sees the cache before its own update


def test_weights_compressed_by_coremltools_optimize_decode_like_coremltools(tmp_path):
    """palettize_weights (4-bit, one LUT per row: the form our any4 export uses) and linear_quantize_weights (int4
    per block of 32, int8 per channel) on a converted linear layer: our output equals x @ W.T where W is what
    coremltools' own loader (milproto.load + materialized_val_inference) decompresses from the saved package."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    lin = torch.nn.Linear(64, 8, bias=False).eval()
    torch.nn.init.normal_(lin.weight, generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    dense = ct.convert(torch.export.export(lin, (x,)).run_decompositions({}), minimum_deployment_target=iOS18,
                       skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32)
    configs = {
        "lut4": cto.OpPalettizerConfig(nbits=4, mode="uniform", granularity="per_grouped_channel", group_size=1,
                                       weight_threshold=1),
        "int4": cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                            block_size=32, weight_threshold=1),
        "int8": cto.OpLinearQuantizerConfig(mode="linear", dtype="int8", granularity="per_channel",
                                            weight_threshold=1),
    }
    for name, config in configs.items():
        compress = cto.palettize_weights if name == "lut4" else cto.linear_quantize_weights
        path = tmp_path / f"{name}.mlpackage"
        compress(dense, cto.OptimizationConfig(global_config=config)).save(str(path))
        program = milproto_load(ct.utils.load_spec(str(path)), iOS18,
                                file_weights_dir=str(path / "Data/com.apple.CoreML/weights"))
        (op,) = [o for o in program.functions["main"].operations if o.op_type.startswith("constexpr_")]
        weight = op.materialized_val_inference().astype(np.float32)
        interpreter = Interpreter(path, mode="fp32")
        (out,) = interpreter.run("main", {n: x.numpy() for n, _ in interpreter.package.functions["main"].inputs}
                                 ).values()
        np.testing.assert_allclose(out, x.numpy() @ weight.T, rtol=1e-5, atol=1e-5, err_msg=name)
        assert op.op_type == ("constexpr_lut_to_dense" if name == "lut4" else "constexpr_blockwise_shift_scale")


@pytest.mark.parametrize("vector_axis", [1, 2])
def test_vector_palettization_spreads_each_entry_along_vector_axis(tmp_path, vector_axis):
    """The MIL doc's example: 1-bit indices [2, 2, 2], two 3-vectors a = (1, 2, 3) and b = (7, 8, 9)."""
    idx = np.array([[[0, 0], [1, 0]], [[1, 1], [0, 0]]], np.uint8)
    lut = np.array([[1, 2, 3], [7, 8, 9]], np.float16).reshape(1, 1, 1, 2, 3)
    shape = (2, 6, 2) if vector_axis == 1 else (2, 2, 6)

    @mb.program(input_specs=[mb.TensorSpec(shape, F16)], opset_version=iOS18)
    def prog(x):
        w = mb.constexpr_lut_to_dense(indices=idx.astype(types.np_uint1_dtype), lut=lut, vector_axis=vector_axis)
        return mb.add(x=x, y=w)

    (out,) = run_program(tmp_path, prog, {"x": np.zeros(shape, np.float16)}, ["constexpr_lut_to_dense"])
    a, b = [1, 2, 3], [7, 8, 9]
    if vector_axis == 1:
        want = [np.transpose([a + b, a + a]), np.transpose([b + a, b + a])]
    else:
        want = [[a + a, b + a], [b + b, a + a]]
    np.testing.assert_array_equal(out, np.array(want, np.float32))


def test_split_stack_pad_one_hot_layer_norm_and_activations(tmp_path):
    x = np.array([[1.0, -2.0, 3.0, 0.5], [0.0, 4.0, -1.0, 2.0]], np.float32)
    ids = np.array([2, 0, 3], np.int32)

    @mb.program(input_specs=[mb.TensorSpec(x.shape, F32), mb.TensorSpec(ids.shape, I32)], opset_version=iOS18)
    def prog(x, ids):
        left, right = mb.split(x=x, axis=1, split_sizes=[1, 3])
        return (left, right, mb.stack(values=[x, x], axis=0), mb.pad(x=x, pad=[1, 0, 0, 2], constant_val=9.0),
                mb.one_hot(indices=ids, one_hot_vector_size=4), mb.layer_norm(x=x, axes=[-1], epsilon=0.0),
                mb.sigmoid(x=x), mb.gelu(x=x, mode="TANH_APPROXIMATION"), mb.relu(x=x), mb.softplus(x=x))

    out = run_program(tmp_path, prog, {"x": x, "ids": ids},
                      ["split", "stack", "pad", "one_hot", "layer_norm", "sigmoid", "gelu", "relu", "softplus"])
    np.testing.assert_array_equal(out[0], x[:, :1])
    np.testing.assert_array_equal(out[1], x[:, 1:])
    np.testing.assert_array_equal(out[2], np.stack([x, x]))
    np.testing.assert_array_equal(out[3], np.pad(x, [(1, 0), (0, 2)], constant_values=9.0))
    np.testing.assert_array_equal(out[4], np.eye(4)[ids])
    centred = x - x.mean(-1, keepdims=True)
    np.testing.assert_allclose(out[5], centred / np.sqrt((centred ** 2).mean(-1, keepdims=True)), rtol=1e-5)
    np.testing.assert_allclose(out[6], 1 / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(out[7], 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
                               rtol=1e-6)
    np.testing.assert_array_equal(out[8], np.maximum(x, 0))
    np.testing.assert_allclose(out[9], np.log1p(np.exp(x)), rtol=1e-6)


def test_fp16_rmsnorm_overflow_shows_and_trace_finds_the_op(tmp_path):
    """The fp16 RMSNorm risk (ExecuTorch #15833): x^2 of |x| > 256 overflows fp16, the norm's output collapses to 0
    in fp16 mode (as in torch fp16 eager and on device) but not in fp32 mode; `trace` names the first op that
    produced an inf."""
    class NaiveRMSNorm(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.tensor([[300.0, -200.0, 100.0, 50.0], [3.0, -2.0, 1.0, 0.5]])
    model = ct.convert(torch.export.export(NaiveRMSNorm(), (x,)).run_decompositions({}),
                       minimum_deployment_target=iOS18, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT16)
    model.save(str(tmp_path / "norm.mlpackage"))
    fp16, fp32 = (Interpreter(tmp_path / "norm.mlpackage", mode=m) for m in ("fp16", "fp32"))
    name = fp16.package.functions["main"].inputs[0][0]
    (out16,) = fp16.run("main", {name: x.numpy()}).values()
    (out32,) = fp32.run("main", {name: x.numpy()}).values()
    eager16 = NaiveRMSNorm()(x.half()).float().numpy()
    np.testing.assert_array_equal(out16[0], eager16[0])
    assert np.all(out16[0] == 0)  # row 0 collapsed: rsqrt(inf) = 0
    np.testing.assert_allclose(out16[1], eager16[1], atol=2e-3)
    np.testing.assert_allclose(out32, NaiveRMSNorm()(x).numpy(), rtol=1e-5)
    values = fp16.trace("main", {name: x.numpy()})
    first_inf = next(n for n, v in values.items() if v.dtype.kind == "f" and not np.all(np.isfinite(v)))
    assert "pow" in first_inf
