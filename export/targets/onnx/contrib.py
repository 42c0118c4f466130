"""ONNX Runtime contrib kernels and fixed node sequences for quantized linears, as torch ops that exist only to be
translated 1:1 into ONNX nodes by `torch.onnx.export` (`translation_table()`); their eager implementations are the
readable reference of what the nodes compute.

- `pocketllm_onnx::matmul_nbits` -> `com.microsoft::MatMulNBits` (int4 / int8 weights, every ORT build ships it,
  Mobile included). Exactly the checkpoint's values: int8 `q * s` is `(u - 128) * s` with u = q + 128 and
  MatMulNBits' default 8-bit zero point 128; int4 `(c - 8) * s + z` is MatMulNBits' default 4-bit zero point 8
  (`(c - 8) * s`, exact in fp32) plus `z * sum(x over the group)`, one tiny MatMul (swaps.NBitsLinear). A float
  zero point `8 - z / s` would round, and it also takes ORT off its prepacked fast path.
- `pocketllm_onnx::any4_matmul` -> the exact any4 form: ONNX has no LUT op. Per call, each group's 16 dequantized
  values `lut * s + z` (the checkpoint's fp32 arithmetic) are built from the fp16 tensors, the codes (the
  checkpoint's bytes as a UINT4 [N, K] initializer) become int32 through DequantizeLinear + Cast, GatherElements
  picks the values, Gemm multiplies. Nothing dequantized is stored: memory stays at 4 bits per weight plus the fp16
  LUT / scales / zeros. Every any4 node hangs off the layer's own input (a 1.0 / 0.0 computed from its row count),
  so no constant folding (exporter or ORT) can re-materialise fp32 or int32 weights at session start, and ORT cannot
  schedule every layer's dequantization before the first matmul either (input-independent chains run first: with
  an input_ids-derived guard, a 0.5b any4 decode step peaked 1.1 GiB above the session).
"""

from __future__ import annotations

import torch

DOMAIN = "com.microsoft"

# ------------------------------------------------------------------------------------------ contrib-op torch ops
LIB = torch.library.Library("pocketllm_onnx", "DEF")
LIB.define("matmul_nbits(Tensor x, Tensor b, Tensor scales, int n, int k, int bits, int block_size, "
           "int accuracy_level) -> Tensor")
LIB.define("any4_matmul(Tensor x, Tensor qweight, Tensor lut, Tensor scales, Tensor zeros, int group_size) -> Tensor")


def nbits_dequantize(b: torch.Tensor, scales: torch.Tensor, n: int, k: int, bits: int, block_size: int):
    """What MatMulNBits computes for B without zero points: fp32 [N, K], W = (code - 2^(bits-1)) * scale."""
    blocks = b.shape[1]
    if bits == 4:
        q = b.to(torch.int64)
        codes = torch.stack([q & 15, torch.div(q, 16, rounding_mode="floor")], dim=-1).reshape(n, blocks, block_size)
    else:
        codes = b.to(torch.int64).reshape(n, blocks, block_size)
    w = (codes - (1 << (bits - 1))).to(torch.float32) * scales.reshape(n, blocks, 1).to(torch.float32)
    return w.reshape(n, blocks * block_size)[:, :k]


@torch.library.impl(LIB, "matmul_nbits", "CompositeExplicitAutograd")
def _matmul_nbits(x, b, scales, n, k, bits, block_size, accuracy_level):
    return x @ nbits_dequantize(b, scales, n, k, bits, block_size).T.to(x.dtype)


@torch.library.register_fake("pocketllm_onnx::matmul_nbits")
def _matmul_nbits_fake(x, b, scales, n, k, bits, block_size, accuracy_level):
    return x.new_empty((*x.shape[:-1], n))


def any4_value_table(lut: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """fp32 [N, G, 16]: the dequantized value of each code in each group, lut * s + z (two roundings, exactly the
    checkpoint's arithmetic: docs/quantization.md)."""
    return lut.float()[:, None, :] * scales.float()[:, :, None] + zeros.float()[:, :, None]


@torch.library.impl(LIB, "any4_matmul", "CompositeExplicitAutograd")
def _any4_matmul(x, qweight, lut, scales, zeros, group_size):
    """x: [M, K] fp32 -> [M, N]. Reference of the node sequence `any4_matmul_onnx` emits."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    q = qweight.to(torch.int64)
    codes = torch.stack([q & 15, torch.div(q, 16, rounding_mode="floor")], dim=-1)  # low nibble = even column
    table = any4_value_table(lut, scales, zeros)  # [N, G, 16]
    w = torch.gather(table, 2, codes.reshape(N, K // group_size, group_size)).reshape(N, K)
    return x @ w.T


@torch.library.register_fake("pocketllm_onnx::any4_matmul")
def _any4_matmul_fake(x, qweight, lut, scales, zeros, group_size):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def register_matmul_nbits_schema() -> None:
    """The onnx package knows no com.microsoft ops; onnxscript needs a schema to emit one. Registered once per
    process (inputs and attributes as in ORT's contrib op; the optional ones we never pass are left out)."""
    from onnx import defs

    if defs.has("MatMulNBits", DOMAIN):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    defs.register_schema(defs.OpSchema(
        "MatMulNBits", DOMAIN, 1, doc="ONNX Runtime contrib op: A x dequantize(B)^T, B blockwise 2/4/8-bit",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1")], outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], "")],
        attributes=[A("K", defs.OpSchema.AttrType.INT, ""), A("N", defs.OpSchema.AttrType.INT, ""),
                    A("bits", defs.OpSchema.AttrType.INT, ""), A("block_size", defs.OpSchema.AttrType.INT, ""),
                    A("accuracy_level", defs.OpSchema.AttrType.INT, "")]))


CODES_DOMAIN = "pocketllm_onnx.export"  # marker ops that exist only between export and lower.rewrite_markers


def register_codes4_schema() -> None:
    """`Codes4(packed uint8 [N, K/2], one) -> int32 [N, K]`: a marker the any4 translation emits, rewritten right
    after export (lower.rewrite_markers) into DequantizeLinear(the same bytes viewed as a UINT4 [N, K] initializer,
    scale `one`) + Cast(int32). The torch exporter cannot emit 4-bit initializers; the marker carries the bytes."""
    from onnx import defs

    if defs.has("Codes4", CODES_DOMAIN):
        return
    P = defs.OpSchema.FormalParameter
    defs.register_schema(defs.OpSchema(
        "Codes4", CODES_DOMAIN, 1, doc="marker: unpack 4-bit codes (low nibble first) to int32",
        inputs=[P("packed", "tensor(uint8)"), P("one", "tensor(float)")], outputs=[P("codes", "tensor(int32)")]))


def translation_table() -> dict:
    """torch op -> onnxscript function emitting its ONNX nodes (torch.onnx.export's custom_translation_table)."""
    import onnxscript
    from onnxscript import opset18 as op

    register_matmul_nbits_schema()
    register_codes4_schema()
    msft = onnxscript.values.Opset(DOMAIN, 1)
    marker = onnxscript.values.Opset(CODES_DOMAIN, 1)

    def matmul_nbits_onnx(x, b, scales, n: int, k: int, bits: int, block_size: int, accuracy_level: int):
        return msft.MatMulNBits(x, b, scales, K=k, N=n, bits=bits, block_size=block_size,
                                accuracy_level=accuracy_level)

    def any4_matmul_onnx(x, qweight, lut, scales, zeros, group_size: int):
        # one = min(rows of x, 1) = 1.0 and zero = 0.0 at run time (an expert no token chose has 0 rows: its Gemm
        # is empty anyway). The codes' DequantizeLinear takes its scale and the value table its LUT from them, so
        # every weight-sized node depends on this layer's input: no constant folding can materialise fp32 / int32
        # weights at session start, and ORT runs each dequantization right before its Gemm.
        rows = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
        one = op.Squeeze(op.Cast(op.Min(rows, op.Constant(value_ints=[1])), to=1))  # scalar 1.0
        zero = op.Sub(one, op.Constant(value_float=1.0))
        lut32 = op.Add(op.Cast(lut, to=1), zero)  # [N, 16]
        table = op.Add(op.Mul(op.Unsqueeze(lut32, [1]), op.Unsqueeze(op.Cast(scales, to=1), [2])),
                       op.Unsqueeze(op.Cast(zeros, to=1), [2]))  # [N, G, 16]: lut * s + z, the dequantized values
        codes = marker.Codes4(qweight, one)  # int32 [N, K]
        shape_q = op.Concat(op.Shape(scales), op.Constant(value_ints=[group_size]), axis=0)  # [N, G, g]
        w = op.Reshape(op.GatherElements(table, op.Reshape(codes, shape_q), axis=2), op.Constant(value_ints=[0, -1]))
        return op.Gemm(x, w, transB=1)

    return {torch.ops.pocketllm_onnx.matmul_nbits.default: matmul_nbits_onnx,
            torch.ops.pocketllm_onnx.any4_matmul.default: any4_matmul_onnx}


