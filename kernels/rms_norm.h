// pocketllm::rms_norm.out — y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, fp32
// (export/ops/rms_norm.py). One call instead of the six elementwise ops (or an XNNPACK partition) a norm costs.
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw form. x, y [rows, H] fp32; weight [H] fp32. Large calls (prefill) split rows over ExecuTorch's threadpool.
void rms_norm_f32(const float* x, const float* weight, int64_t rows, int64_t H, float eps, float* y);

}  // namespace pocketllm
