"""How the ExecuTorch target runs each pocketllm op: every op stays one custom op in the program (never
decomposed) and runs on our C++ kernel (kernels/<op>.cpp, registered as `pocketllm::<op>.out`)."""

from pocketllm.export.targets.base import Lowering

LOWERINGS = {
    "infllm_attention": Lowering("kernel", "kernels/infllm_attention.cpp"),
    "lightning_attention": Lowering("kernel", "kernels/lightning_attention.cpp"),
    "any4_linear": Lowering("kernel", "kernels/any4_linear.cpp"),
    "any4_linear_w4a8": Lowering("kernel", "kernels/any4_linear_w4a8.cpp"),
    "int8_linear": Lowering("kernel", "kernels/int8_linear.cpp"),
    "moe_ffn": Lowering("kernel", "kernels/moe_ffn.cpp"),
    "moe_ffn_any4": Lowering("kernel", "kernels/moe_ffn.cpp"),
    "expert_store_prefetch": Lowering("kernel", "kernels/expert_store.cpp"),
    "expert_store_moe_ffn": Lowering("kernel", "kernels/expert_store.cpp"),
    "rms_norm": Lowering("kernel", "kernels/rms_norm.cpp"),
    "rope": Lowering("kernel", "kernels/rope.cpp"),
    "silu_mul": Lowering("kernel", "kernels/silu_mul.cpp"),
}
