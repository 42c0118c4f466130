"""The ONNX target's quantized linears alone, in onnxruntime (export/targets/onnx/contrib.py, swaps.py):

- int4 and int8 through com.microsoft::MatMulNBits with exactly the checkpoint's weights (the zero of int4 added as
  a group-sum MatMul; int8 codes shifted by 128);
- any4 (pocketllm::any4_linear) in its exact form: the checkpoint's bytes as a UINT4 initializer, the per-group value
  table built per call; after ORT's own graph optimizations (what a session runs) no initializer holds a
  dequantized weight or unpacked codes, so session memory stays at ~4.5 bits per weight.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketllm.export.nn.quant_linear import dequantize_packed
from pocketllm.export.quant.format import TensorQuant

ort = pytest.importorskip("onnxruntime")
N, K, G = 48, 64, 16  # out, in, group


def packed(scheme: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    groups = K // G if scheme != "int8" else 1
    t = {"scales": (torch.rand(N, groups, generator=g) * 0.1 + 0.01).half()}
    if scheme == "int8":
        t["qweight"] = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    else:
        t["qweight"] = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
        t["zeros"] = (torch.randn(N, groups, generator=g) * 0.05).half()
    if scheme == "any4":
        t["lut"] = torch.randn(N, 16, generator=g).half()
    return t


class Stack(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def session(linear, tmp_path, optimized: str | None = None):
    """torch.onnx.export of one swapped linear through the target's own passes -> an onnxruntime session."""
    from torch.export import Dim

    from pocketllm.export.targets.onnx import contrib
    from pocketllm.export.targets.onnx.lower import optimize, rewrite_markers

    with torch.no_grad():
        program = torch.onnx.export(Stack(linear).eval(), (torch.randn(3, K),), dynamo=True, input_names=["x"],
                                    output_names=["y"], dynamic_shapes=({0: Dim("M", min=1)},), opset_version=21,
                                    optimize=False, custom_translation_table=contrib.translation_table())
    rewrite_markers(program.model)
    optimize(program.model)
    path = tmp_path / "linear.onnx"
    program.save(str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), path


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_matmul_nbits_holds_exactly_the_checkpoint_weights(tmp_path, scheme):
    from pocketllm.export.targets.onnx.swaps import NBitsLinear

    t = packed(scheme)
    if scheme == "int4":
        linear = NBitsLinear.from_int4(t["qweight"], t["scales"], t["zeros"], G, accuracy_level=0)
    else:
        linear = NBitsLinear.from_int8(t["qweight"], t["scales"], accuracy_level=0)
    w = dequantize_packed(TensorQuant(scheme, G if scheme == "int4" else 0), t, K)  # the checkpoint's values
    sess, path = session(linear, tmp_path)
    import onnx

    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = np.random.default_rng(0).standard_normal((5, K)).astype(np.float32)
    got = sess.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.numpy().T, rtol=1e-5, atol=1e-5)
    # one-hot rows read single weights: exact
    eye = np.eye(K, dtype=np.float32)
    if scheme == "int8":
        np.testing.assert_array_equal(sess.run(None, {"x": eye})[0], w.numpy().T)
    else:  # (c - 8) s by MatMulNBits, + z by the group-sum MatMul: one fp32 addition, as the checkpoint computes
        np.testing.assert_allclose(sess.run(None, {"x": eye})[0], w.numpy().T, rtol=0, atol=1e-6)


def test_any4_exact_form_is_exact_and_stays_packed_after_ort_optimizations(tmp_path):
    import onnx

    from pocketllm.export.targets.onnx.swaps import Any4ExactLinear

    t = packed("any4")
    linear = Any4ExactLinear(t["qweight"], t["lut"], t["scales"], t["zeros"], G)
    optimized = tmp_path / "optimized.onnx"
    sess, _ = session(linear, tmp_path, optimized=str(optimized))
    x = np.random.default_rng(1).standard_normal((4, K)).astype(np.float32)
    want = torch.ops.pocketllm.any4_linear(torch.from_numpy(x), t["qweight"], t["lut"], t["scales"], t["zeros"], G)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], want.numpy(), rtol=1e-6, atol=1e-6)
    eye = np.eye(K, dtype=np.float32)  # single weights: the dequantized values exactly
    w = dequantize_packed(TensorQuant("any4", G), t, K)
    np.testing.assert_array_equal(sess.run(None, {"x": eye})[0], w.numpy().T)
    model = onnx.load(str(optimized))  # what the session actually runs
    dense = {(N, K), (K, N), (N, K // 2), (K // 2, N), (N, K // G, G), (N, K // G, 16)}
    unpacked = [(i.name, i.data_type, list(i.dims)) for i in model.graph.initializer
                if i.data_type != onnx.TensorProto.UINT4 and tuple(i.dims) in dense]
    assert unpacked == [], f"dequantized weights or unpacked codes were folded into initializers: {unpacked}"
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT4]
    assert len(codes) == 1 and list(codes[0].dims) == [N, K]  # the checkpoint's bytes, 4 bits per weight
