"""How the Core ML target runs each pocketllm op (no coremltools import here: the converters themselves are in
converters.py, registered with coremltools when lower.py imports it). Core ML has no custom kernels: every op is a
coremltools converter emitting MIL, or unsupported with the reason."""

from pocketllm.export.targets.base import Lowering

LOWERINGS = {
    "any4_linear": Lowering("converter", "converters.py: constexpr_lut_to_dense (uint4 codes, per-row LUT) + group "
                                         "scales and zeros on per-group partial sums"),
    "any4_linear_w4a8": Lowering("unsupported", "int8 activations: Core ML has no int8-activation matmul; any4 "
                                                "weights run as any4_linear (fp16 activations)"),
    "int8_linear": Lowering("unsupported", "int8 layers: swaps.CoreMLQuantLinear holds the int8 weight and its "
                                           "scales as constants (dequantized in MIL); the LM head and the embedding "
                                           "table stay in floating point for Core ML (export's --lm-head auto = none)"),
    "infllm_attention": Lowering("converter", "converters.py: composite MIL (compressed keys, block scores, topk, "
                                              "gather of the selected blocks); the swapped core keeps the compressed "
                                              "keys in a state (pocketllm_coreml::infllm_attention)"),
    "lightning_attention": Lowering("converter", "converters.py: block form in MIL, recurrent state as a Core ML "
                                                 "state"),
    "moe_ffn": Lowering("unsupported", "MoE layers export from export/nn/moe.py's experts: decode runs only the "
                                       "routed experts through one `cond` per expert (swaps.CoreMLDispatch), prefill "
                                       "every expert; the fused op's stacked weights would be gathered per call"),
    "moe_ffn_any4": Lowering("unsupported", "as moe_ffn: routed experts through `cond` per expert "
                                            "(swaps.CoreMLDispatch), any4 experts as any4_linear"),
    "expert_store_moe_ffn": Lowering("unsupported", "the expert store (experts.bin) is read by pocketllm's ExecuTorch "
                                                    "kernel library (kernels/expert_store.cpp); a Core ML package "
                                                    "holds its experts, so --experts is refused for --target coreml"),
    "expert_store_prefetch": Lowering("unsupported", "as expert_store_moe_ffn: no expert store in a Core ML package"),
    "rms_norm": Lowering("decomposition", "never emitted for Core ML: the model's own RMSNorm / RoPE / SiLU modules "
                                          "trace to MIL ops that coremltools fuses (the fused ops are an ExecuTorch "
                                          "swap, executorch/swaps.use_fused_elementwise)"),
    "rope": Lowering("decomposition", "as rms_norm: export/nn/rope.py's RotaryAt traces to MIL mul/add/concat"),
    "silu_mul": Lowering("decomposition", "as rms_norm: GatedMLP.glu traces to MIL silu and mul"),
}
