// pocketllm::any4_linear.out — y = x @ W^T with W stored as any4: 4-bit codes + per-row 16-entry LUT + per-group
// scale/zero. Dequantisation W[i, j] = lut[i, c_ij] * s[i, j / g] + z[i, j / g] (multiply, then add: two fp32
// roundings, no FMA), exactly as export/ops/any4_linear.py.
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw fp32 form. x [M, K]; qweight [N, K/2] (low nibble = even column); lut [N, 16]; scales, zeros [N, K/g];
// y [M, N].
void any4_linear_f32(const float* x, const uint8_t* qweight, const float* lut, const float* scales,
                     const float* zeros, int64_t M, int64_t N, int64_t K, int64_t group_size, float* y);

}  // namespace pocketllm
