// pocketllm::silu_mul.out — the SwiGLU product silu(gate) * up, fp32 (export/ops/silu_mul.py), with
// silu(g) = g / (1 + exp(-g)).
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw form. gate, up, y [n] fp32. Large calls (prefill) split over ExecuTorch's threadpool.
void silu_mul_f32(const float* gate, const float* up, int64_t n, float* y);

}  // namespace pocketllm
