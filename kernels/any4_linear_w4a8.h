// pocketllm::any4_linear_w4a8.out — y = x @ W^T with W stored as any4 (4-bit codes, per-row int8 LUT + fp32 LUT
// scale, fp16 scale and zero per (row, group)) and x quantized to int8 per token on the fly; integer dot products.
// Numerics: export/ops/any4_linear_w4a8.py (every ISA path here reproduces them bit for bit).
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw form. x [M, K] fp32; qweight [N, K/2] (low nibble = even column); lut_i8 [N, 16]; lut_scale [N];
// scales, zeros as fp16 bits in 8-row blocks [ceil(N/8), K/g, 8]; y [M, N]. Rows go to ExecuTorch's threadpool.
void any4_linear_w4a8_f32(const float* x, const uint8_t* qweight, const int8_t* lut_i8, const float* lut_scale,
                          const uint16_t* scales, const uint16_t* zeros, int64_t M, int64_t N, int64_t K,
                          int64_t group_size, float* y);

}  // namespace pocketllm
