"""How the ONNX target runs each pocketllm op (no onnx import here). ONNX Runtime loads no pocketllm kernel: every op
becomes standard ONNX ops (a decomposition in decompose.py / contrib.py that `torch.onnx.export` turns into ai.onnx
nodes) or an ONNX Runtime contrib kernel every ORT build ships (`com.microsoft::MatMulNBits`), or is unsupported
with the reason. Linear layers of int4 / int8 checkpoints (no pocketllm op) go to MatMulNBits (swaps.NBitsLinear)."""

from pocketllm.export.targets.base import Lowering

LOWERINGS = {
    "infllm_attention": Lowering("decomposition", "decompose.py: the attention core is swapped (swaps.OnnxInfLLMCore):"
                                                  " compressed keys, float64 kernel scores in the reference's order "
                                                  "(CumSum sums, exp_fixed), block max, TopK ranks, masked softmax "
                                                  "over the selected blocks; dense fallback as an ONNX If"),
    "lightning_attention": Lowering("decomposition", "decompose.py: one float64 block per call (intra-block decay, "
                                                     "inter-block state read, state update); the recurrent state is "
                                                     "a graph input/output (swaps.StateIO)"),
    "any4_linear": Lowering("decomposition", "contrib.py: exact: UINT4 codes -> DequantizeLinear + Cast, per-group "
                                             "value table (fp16 LUT x scale + zero), GatherElements, Gemm, tied to "
                                             "the layer input; onnx.any4_form=int4 requantizes to MatMulNBits (not "
                                             "exact), dequant stores fp32 weights"),
    "any4_linear_w4a8": Lowering("unsupported", "int8-activation LUT matmul: ONNX has no LUT op and "
                                                "MatMulInteger needs affine weights; any4 weights run as any4_linear "
                                                "(fp32 activations, exact)"),
    "int8_linear": Lowering("unsupported", "int8 layers go to MatMulNBits (swaps.NBitsLinear); the LM head and the "
                                           "embedding table stay in fp32 for ONNX (export's --lm-head auto = none)"),
    "moe_ffn": Lowering("unsupported", "MoE layers export from export/nn/moe.py's experts with a routed dispatch "
                                       "(swaps.OnnxRoutedDispatch: per expert NonZero, Gather, the expert MLP, "
                                       "ScatterND add), so only the routed experts run; the fused op is not used"),
    "moe_ffn_any4": Lowering("unsupported", "as moe_ffn: routed experts through swaps.OnnxRoutedDispatch, any4 "
                                            "experts as any4_linear"),
    "expert_store_moe_ffn": Lowering("unsupported", "the expert store (experts.bin) is read by pocketllm's ExecuTorch "
                                                    "kernel library (kernels/expert_store.cpp); an ONNX model holds its "
                                                    "experts, so --experts is refused for --target onnx"),
    "expert_store_prefetch": Lowering("unsupported", "as expert_store_moe_ffn: no expert store in an ONNX model"),
    "rms_norm": Lowering("decomposition", "never emitted for ONNX: the model's own RMSNorm traces to Pow/ReduceMean/"
                                          "Sqrt/Div/Mul (the fused ops are an ExecuTorch swap, "
                                          "executorch/swaps.use_fused_elementwise)"),
    "rope": Lowering("decomposition", "as rms_norm: export/nn/rope.py's RotaryAt traces to Mul/Add/Concat"),
    "silu_mul": Lowering("decomposition", "as rms_norm: GatedMLP.glu traces to Sigmoid/Mul"),
}
