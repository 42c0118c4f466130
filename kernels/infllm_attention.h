// pocketllm::infllm_attention.out — InfLLM v2 block-sparse attention over a static KV cache.
// Selection rule: docs/infllm_v2.md (exactly what export/ops/infllm_attention.py and runtime_py implement).
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

struct InfllmParams {
  int64_t kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len;
};

// Block selection for one call. q: [T, Hq, D] fp32 (post-RoPE), k: cache rows [>= L, Hkv, D] fp32,
// kc: compressed keys [n_kernels, Hkv, D]. Writes mask [Hkv, T, n_blocks] (1 = block attended).
void infllm_select_blocks(const float* q, const float* kc, int64_t n_kernels, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, uint8_t* mask);

// Compressed keys kc[j] = mean(k[s*j : s*j + ksize]) for j in [j_begin, j_end), fp32.
void infllm_compress_keys(const float* k, int64_t Hkv, int64_t D, const InfllmParams& p, int64_t j_begin,
                          int64_t j_end, float* kc);

// The whole op on raw fp32 buffers: out [T, Hq, D].
void infllm_attention_f32(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, float* out);

executorch::aten::Tensor& infllm_attention_out(
    executorch::runtime::KernelRuntimeContext& ctx, const executorch::aten::Tensor& q,
    const executorch::aten::Tensor& k_cache, const executorch::aten::Tensor& v_cache, int64_t start_pos,
    int64_t kernel_size, int64_t kernel_stride, int64_t block_size, int64_t init_blocks, int64_t window_size,
    int64_t topk, int64_t dense_len, executorch::aten::Tensor& out);

}  // namespace pocketllm
