// pocketllm::infllm_attention.out — InfLLM v2 block-sparse attention over a static KV cache.
// Selection rule: docs/infllm_v2.md (exactly what export/ops/infllm_attention.py and runtime_py implement; the block
// scores are bit-identical to theirs, see step 3a there).
#pragma once

#include <cstdint>

#include <executorch/runtime/kernel/kernel_includes.h>

namespace pocketllm {

// How a compressed key is scored (docs/infllm_v2.md step 3); the op's `score_rule` argument.
enum InfllmScoreRule : int64_t {
  kInfllmScoresUpstream = 0,  // exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))), Kc2 with 4x kernel and stride
  kInfllmScoresExact = 1,     // softmax of q.Kc1/sqrt(d) over the visible Kc1
};

struct InfllmParams {
  int64_t kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len, score_rule;
  // The coarse compressed keys Kc2 that normalise the upstream scores.
  int64_t coarse_size() const { return 4 * kernel_size; }
  int64_t coarse_stride() const { return 4 * kernel_stride; }
};

// Number of complete windows of `size` keys every `stride` among the first L keys.
int64_t infllm_num_kernels(int64_t L, int64_t size, int64_t stride);

// Compressed keys are stored per KV head, interleaved by 8 (the scoring loop streams 8 keys per row of head_dim):
// in a buffer for `capacity` entries, entry j of KV head h, channel d sits at
// kc[infllm_kc_index(j, h, d, D, capacity)]; the buffer holds infllm_kc_floats(capacity, Hkv, D) floats.
constexpr int64_t kInfllmKcLanes = 8;
inline int64_t infllm_kc_groups(int64_t capacity) { return (capacity + kInfllmKcLanes - 1) / kInfllmKcLanes; }
inline int64_t infllm_kc_index(int64_t j, int64_t h, int64_t d, int64_t D, int64_t capacity) {
  return ((h * infllm_kc_groups(capacity) + j / kInfllmKcLanes) * D + d) * kInfllmKcLanes + j % kInfllmKcLanes;
}
inline int64_t infllm_kc_floats(int64_t capacity, int64_t Hkv, int64_t D) {
  return Hkv * infllm_kc_groups(capacity) * D * kInfllmKcLanes;
}

// kc[j] = fp32(sum_t k[stride*j + t] / size) for j in [j_begin, j_end) (< capacity): summed in double over t in
// order.
// k: the fp32 cache, or an fp16 one (bits; each value widened exactly).
void infllm_compress_keys(const float* k, int64_t Hkv, int64_t D, int64_t size, int64_t stride, int64_t capacity,
                          int64_t j_begin, int64_t j_end, float* kc);
void infllm_compress_keys(const uint16_t* k, int64_t Hkv, int64_t D, int64_t size, int64_t stride, int64_t capacity,
                          int64_t j_begin, int64_t j_end, float* kc);

// The two compressed key sets of one call (coarse unused by the exact rule).
struct InfllmKeys {
  const float* fine;  // Kc1: kernel_size / kernel_stride
  int64_t n_fine, fine_capacity;
  const float* coarse;  // Kc2: coarse_size() / coarse_stride()
  int64_t n_coarse, coarse_capacity;
};

// Block scores for one call (docs step 4), double [Hkv, T, n_blocks], -inf where no visible kernel touches a block.
// q: [T, Hq, D] fp32 (post-RoPE) at positions start_pos...
void infllm_block_scores(const float* q, const InfllmKeys& keys, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                         int64_t start_pos, const InfllmParams& p, double* scores);

// Block selection for one call. Writes mask [Hkv, T, n_blocks] (1 = block attended).
void infllm_select_blocks(const float* q, const InfllmKeys& keys, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t start_pos, const InfllmParams& p, uint8_t* mask);

// The whole op on raw fp32 buffers (compressed keys computed here, no memo): out [T, Hq, D].
void infllm_attention_f32(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, float* out);
// ... and over an fp16 cache (k, v: fp16 bits), the same arithmetic on the widened values.
void infllm_attention_f16kv(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, int64_t Hq,
                            int64_t Hkv, int64_t D, int64_t start_pos, const InfllmParams& p, float* out);

executorch::aten::Tensor& infllm_attention_out(
    executorch::runtime::KernelRuntimeContext& ctx, const executorch::aten::Tensor& q,
    const executorch::aten::Tensor& k_cache, const executorch::aten::Tensor& v_cache, int64_t start_pos,
    int64_t kernel_size, int64_t kernel_stride, int64_t block_size, int64_t init_blocks, int64_t window_size,
    int64_t topk, int64_t dense_len, int64_t score_rule, executorch::aten::Tensor& out);

}  // namespace pocketllm
