// pocketllm::lightning_attention.out — lightning (decayed linear) attention with an explicit recurrent state.
// Math: export/ops/lightning_attention.py (block form, the same expressions in the same order).
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// One call on raw fp32 buffers. q, k, v: [B, T, H, D]; state, new_state: [B, H, D, D]; decay: [H].
void lightning_attention_f32(const float* q, const float* k, const float* v, const float* state, const float* decay,
                             int64_t B, int64_t T, int64_t H, int64_t D, int64_t block_size, float* out,
                             float* new_state);

}  // namespace pocketllm
