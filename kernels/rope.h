// pocketllm::rope.out — rotary position embedding of q or k, fp32 (export/ops/rope.py):
//   y[..., :d] = x[..., :d] * cos + rotate_half(x[..., :d]) * sin,   rotate_half(v) = [-v[d/2:], v[:d/2]]
//   y[..., d:] = x[..., d:]                                           (partial RoPE: d = cos's last dim <= D)
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// Raw form. x, y [T, heads, D]; cos, sin [T, d] (the rows of the positions being rotated), d even, d <= D.
void rope_f32(const float* x, const float* cos, const float* sin, int64_t T, int64_t heads, int64_t D, int64_t d,
              float* y);

}  // namespace pocketllm
