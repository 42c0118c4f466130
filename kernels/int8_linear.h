// pocketllm::int8_linear.out — y = x @ W^T with W stored as int8 per output channel: W[i, j] = q[i, j] * s[i]
// (export/ops/int8_linear.py). Activations stay fp32: y[t, i] = s[i] * sum_j x[t, j] * q[i, j].
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw form. x [M, K] fp32; qweight [N, K] int8; scales [N] fp32; y [M, N]. Rows go to ExecuTorch's threadpool.
void int8_linear_f32(const float* x, const int8_t* qweight, const float* scales, int64_t M, int64_t N, int64_t K,
                     float* y);

}  // namespace pocketllm
