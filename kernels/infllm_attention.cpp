// pocketllm::infllm_attention.out: InfLLM v2 (MiniCPM4) sparse attention, CPU, fp32.
//
// Per call of T queries at positions start_pos.., with L = start_pos + T keys in the cache:
//   dense  (dense_len != -1 and L < dense_len): causal attention over keys 0..i;
//   sparse: compressed keys (means of kernel_size keys every kernel_stride), exact-softmax kernel scores summed over
//           the GQA group, block score = max over the kernels touching the block, forced init + local blocks,
//           top-k of the rest (ties to the lower block), then exact softmax attention over the chosen blocks.
// Work is split over (KV head, query) on ExecuTorch's threadpool; each task handles the whole GQA group so that
// every key and value row is read once per query.
//
// Compressed keys are memoised per KV-cache buffer: entry j depends only on cache rows [s*j, s*j + ksize), and a call
// at start_pos only writes rows >= start_pos, so entries ending at or before start_pos stay valid; a call at
// start_pos 0 (a new sequence) drops them all. This keeps decode at long context from re-reading the whole cache.
#include "infllm_attention.h"

#include <algorithm>
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

int64_t num_kernels(int64_t L, const InfllmParams& p) {
  return L >= p.kernel_size ? (L - p.kernel_size) / p.kernel_stride + 1 : 0;
}

// Kernels visible to the query at position pos: s*j + k - 1 <= pos.
int64_t visible_kernels(int64_t pos, int64_t n_kernels, const InfllmParams& p) {
  if (pos < p.kernel_size - 1) return 0;
  return std::min(n_kernels, (pos - p.kernel_size + 1) / p.kernel_stride + 1);
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

typedef float v4f __attribute__((vector_size(16)));

// Four dot products q . k_r (D % 8 == 0): one vector accumulator per key, reduced together at the end (a
// transpose-add instead of four horizontal sums).
inline v4f dot4(const float* q, const float* const kr[4], int64_t D) {
  v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
  for (int64_t d = 0; d < D; d += 8) {
    const v8f qv = load8(q + d);
    a0 += qv * load8(kr[0] + d);
    a1 += qv * load8(kr[1] + d);
    a2 += qv * load8(kr[2] + d);
    a3 += qv * load8(kr[3] + d);
  }
  const v8f b0 = __builtin_shufflevector(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f b1 = __builtin_shufflevector(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f c = __builtin_shufflevector(b0, b1, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b0, b1, 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c, c, 0, 1, 2, 3) + __builtin_shufflevector(c, c, 4, 5, 6, 7);
}

// Selection for one (KV head, query): writes sel[n_blocks].
void select_one(const float* qg /* [G, D] */, const float* kc, int64_t n_kernels, int64_t Hkv, int64_t h,
                int64_t G, int64_t D, int64_t pos, int64_t n_blocks, const InfllmParams& p, uint8_t* sel,
                std::vector<float>& score, std::vector<float>& logit, std::vector<float>& bscore,
                std::vector<int64_t>& order) {
  const int64_t nv = visible_kernels(pos, n_kernels, p);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  score.assign(nv, 0.0f);
  logit.resize(nv);
  for (int64_t g = 0; g < G; ++g) {
    const float* qv = qg + g * D;
    int64_t j = 0;
    if (D % 8 == 0) {
      for (; j + 4 <= nv; j += 4) {
        const float* kr[4] = {kc + (j * Hkv + h) * D, kc + ((j + 1) * Hkv + h) * D, kc + ((j + 2) * Hkv + h) * D,
                              kc + ((j + 3) * Hkv + h) * D};
        const v4f d4 = dot4(qv, kr, D) * scale;
        std::memcpy(&logit[j], &d4, sizeof(d4));
      }
    }
    for (; j < nv; ++j) logit[j] = dot(qv, kc + (j * Hkv + h) * D, D) * scale;
    if (nv == 0) continue;
    const float sum = softmax_numerator(logit.data(), nv);
    for (int64_t j = 0; j < nv; ++j) score[j] += logit[j] / sum;
  }
  // Block scores: max over visible kernels touching block b.
  bscore.assign(n_blocks, kNegInf);
  for (int64_t b = 0; b < n_blocks; ++b) {
    int64_t lo = floor_div(p.block_size * b - p.kernel_size + p.kernel_stride, p.kernel_stride);
    lo = std::max<int64_t>(lo, 0);
    int64_t hi = (p.block_size * b + p.block_size - 1) / p.kernel_stride;
    hi = std::min(hi, nv - 1);
    for (int64_t j = lo; j <= hi; ++j) bscore[b] = std::max(bscore[b], score[j]);
  }
  const int64_t bq = pos / p.block_size;
  const int64_t local = p.window_size / p.block_size;
  int64_t n_forced = 0;
  order.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const bool valid = b <= bq;
    const bool forced = valid && (b < p.init_blocks || b >= bq - local);
    sel[b] = forced ? 1 : 0;
    n_forced += forced;
    if (valid && !forced && std::isfinite(bscore[b])) order.push_back(b);
  }
  const int64_t slots = std::max<int64_t>(p.topk + local - n_forced, 0);
  if (static_cast<int64_t>(order.size()) > slots) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return bscore[a] > bscore[c]; });
    order.resize(slots);
  }
  for (int64_t b : order) sel[b] = 1;
}

// out[g, :] = sum_i p[g, i] v_{key i} for the G heads, D % 8 == 0. Keys go in chunks of 64: a chunk of V rows
// (16 KiB at D = 64) stays in L1 while every head of the group reads it, and each head's output row is held in
// registers across the chunk (no load/store of the output per key), NV vectors at a time.
template <int NV>
void weighted_v_rows(const float* p, int64_t n, const float* v, const int64_t* keys, int64_t row, int64_t G,
                     int64_t D, float* outg) {
  constexpr int64_t kChunk = 64;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    for (int64_t g = 0; g < G; ++g) {
      const float* pg = p + g * n;
      for (int64_t d0 = 0; d0 < D; d0 += 8 * NV) {
        v8f acc[NV];
        for (int u = 0; u < NV; ++u) acc[u] = load8(outg + g * D + d0 + 8 * u);
        for (int64_t i = i0; i < i1; ++i) {
          const float* vr = v + keys[i] * row + d0;
          const float w = pg[i];
          const v8f wv = {w, w, w, w, w, w, w, w};
          for (int u = 0; u < NV; ++u) acc[u] += wv * load8(vr + 8 * u);
        }
        for (int u = 0; u < NV; ++u) store8(outg + g * D + d0 + 8 * u, acc[u]);
      }
    }
  }
}

// Exact softmax attention of the G query heads of one KV head over the keys j <= pos inside selected blocks
// (sel == nullptr: all keys 0..pos). out_g: [G, D] with row stride out_stride.
void attend_one(const float* qg, const float* k, const float* v, int64_t Hkv, int64_t h, int64_t G, int64_t D,
                int64_t pos, const uint8_t* sel, int64_t block_size, float* outg, std::vector<float>& logits,
                std::vector<int64_t>& keys) {
  keys.clear();
  if (sel == nullptr) {
    keys.resize(pos + 1);
    std::iota(keys.begin(), keys.end(), 0);
  } else {
    const int64_t n_blocks = pos / block_size + 1;
    for (int64_t b = 0; b < n_blocks; ++b) {
      if (!sel[b]) continue;
      const int64_t end = std::min((b + 1) * block_size, pos + 1);
      for (int64_t j = b * block_size; j < end; ++j) keys.push_back(j);
    }
  }
  const int64_t n = static_cast<int64_t>(keys.size());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  logits.resize(G * n);
  const int64_t row = Hkv * D;
  int64_t i = 0;
  if (D % 8 == 0) {
    for (; i + 4 <= n; i += 4) {
      const float* kr[4] = {k + keys[i] * row + h * D, k + keys[i + 1] * row + h * D, k + keys[i + 2] * row + h * D,
                            k + keys[i + 3] * row + h * D};
      for (int64_t g = 0; g < G; ++g) {
        const v4f d4 = dot4(qg + g * D, kr, D) * scale;
        std::memcpy(&logits[g * n + i], &d4, sizeof(d4));
      }
    }
  }
  for (; i < n; ++i) {
    const float* kr = k + keys[i] * row + h * D;
    for (int64_t g = 0; g < G; ++g) logits[g * n + i] = dot(qg + g * D, kr, D) * scale;
  }
  for (int64_t g = 0; g < G; ++g) {
    float* lg = logits.data() + g * n;
    const float sum = softmax_numerator(lg, n);
    for (int64_t i = 0; i < n; ++i) lg[i] /= sum;
    std::fill(outg + g * D, outg + (g + 1) * D, 0.0f);
  }
  const float* vh = v + h * D;
  if (D % 64 == 0) {
    weighted_v_rows<8>(logits.data(), n, vh, keys.data(), row, G, D, outg);
  } else if (D % 32 == 0) {
    weighted_v_rows<4>(logits.data(), n, vh, keys.data(), row, G, D, outg);
  } else if (D % 8 == 0) {
    weighted_v_rows<1>(logits.data(), n, vh, keys.data(), row, G, D, outg);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float* vr = vh + keys[i] * row;
      for (int64_t g = 0; g < G; ++g) axpy(outg + g * D, logits[g * n + i], vr, D);
    }
  }
}

struct KcMemo {
  std::vector<float> kc;  // [capacity, Hkv, D]
  int64_t count = 0;      // valid leading entries
  int64_t Hkv = 0, D = 0, ksize = 0, stride = 0;
};

std::mutex memo_mutex;
std::unordered_map<const void*, KcMemo> memo;

// Compressed keys for the first n_kernels entries, reusing those still valid for this cache buffer.
const float* compressed_keys(const float* k, int64_t Hkv, int64_t D, int64_t start_pos,
                             int64_t n_kernels, const InfllmParams& p, KcMemo& m) {
  if (m.Hkv != Hkv || m.D != D || m.ksize != p.kernel_size || m.stride != p.kernel_stride) {
    m = KcMemo{};
    m.Hkv = Hkv, m.D = D, m.ksize = p.kernel_size, m.stride = p.kernel_stride;
  }
  // Entries whose windows end at or before start_pos were not touched by this call's cache write.
  m.count = std::min(m.count, start_pos == 0 ? int64_t{0} : num_kernels(start_pos, p));
  const size_t need = static_cast<size_t>(n_kernels * Hkv * D);
  if (m.kc.size() < need) m.kc.resize(std::max(need, 2 * m.kc.size()));
  if (m.count < n_kernels) infllm_compress_keys(k, Hkv, D, p, m.count, n_kernels, m.kc.data());
  m.count = std::max(m.count, n_kernels);
  return m.kc.data();
}

}  // namespace

void infllm_compress_keys(const float* k, int64_t Hkv, int64_t D, const InfllmParams& p, int64_t j_begin,
                          int64_t j_end, float* kc) {
  const int64_t row = Hkv * D;
  parallel(j_end - j_begin, 8, [&](int64_t b, int64_t e) {
    std::vector<double> acc(row);
    for (int64_t jj = b; jj < e; ++jj) {
      const int64_t j = j_begin + jj;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < p.kernel_size; ++t) {
        const float* kr = k + (p.kernel_stride * j + t) * row;
        for (int64_t c = 0; c < row; ++c) acc[c] += kr[c];
      }
      float* dst = kc + j * row;
      for (int64_t c = 0; c < row; ++c) dst[c] = static_cast<float>(acc[c] / static_cast<double>(p.kernel_size));
    }
  });
}

void infllm_select_blocks(const float* q, const float* kc, int64_t n_kernels, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, uint8_t* mask) {
  const int64_t G = Hq / Hkv;
  const int64_t L = start_pos + T;
  const int64_t n_blocks = (L + p.block_size - 1) / p.block_size;
  parallel(Hkv * T, 1, [&](int64_t b, int64_t e) {
    std::vector<float> score, logit, bscore;
    std::vector<int64_t> order;
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / T, t = task % T;
      select_one(q + (t * Hq + h * G) * D, kc, n_kernels, Hkv, h, G, D, start_pos + t, n_blocks, p,
                 mask + (h * T + t) * n_blocks, score, logit, bscore, order);
    }
  });
}

static void infllm_attention_impl(const float* q, const float* k, const float* v, int64_t T, int64_t Hq,
                                  int64_t Hkv, int64_t D, int64_t start_pos, const InfllmParams& p, float* out,
                                  const float* kc, int64_t n_kernels) {
  const int64_t G = Hq / Hkv;
  const int64_t L = start_pos + T;
  const bool dense = p.dense_len != -1 && L < p.dense_len;
  const int64_t n_blocks = (L + p.block_size - 1) / p.block_size;
  parallel(Hkv * T, 1, [&](int64_t b, int64_t e) {
    std::vector<float> score, logit, bscore, logits;
    std::vector<int64_t> order, keys;
    std::vector<uint8_t> sel(n_blocks);
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / T, t = task % T;
      const float* qg = q + (t * Hq + h * G) * D;
      const int64_t pos = start_pos + t;
      if (!dense) {
        select_one(qg, kc, n_kernels, Hkv, h, G, D, pos, n_blocks, p, sel.data(), score, logit, bscore, order);
      }
      attend_one(qg, k, v, Hkv, h, G, D, pos, dense ? nullptr : sel.data(), p.block_size,
                 out + (t * Hq + h * G) * D, logits, keys);
    }
  });
}

void infllm_attention_f32(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, float* out) {
  const int64_t L = start_pos + T;
  const int64_t nk = num_kernels(L, p);
  std::vector<float> kc(nk * Hkv * D);
  infllm_compress_keys(k, Hkv, D, p, 0, nk, kc.data());
  infllm_attention_impl(q, k, v, T, Hq, Hkv, D, start_pos, p, out, kc.data(), nk);
}

Tensor& infllm_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache,
                             const Tensor& v_cache, int64_t start_pos, int64_t kernel_size, int64_t kernel_stride,
                             int64_t block_size, int64_t init_blocks, int64_t window_size, int64_t topk,
                             int64_t dense_len, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, InvalidArgument, out,
                      "infllm_attention: q, k_cache, v_cache must be 4-D [1, S, H, D]");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && k_cache.scalar_type() == ScalarType::Float &&
                               v_cache.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "infllm_attention: only float32 is supported");
  const int64_t T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2);
  ET_KERNEL_CHECK_MSG(ctx, q.size(0) == 1 && Hkv > 0 && Hq % Hkv == 0 && k_cache.size(3) == D, InvalidArgument,
                      out, "infllm_attention: batch 1, num heads a multiple of KV heads, same head_dim");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + T <= k_cache.size(1), InvalidArgument, out,
                      "infllm_attention: start_pos + T exceeds the cache");
  ET_KERNEL_CHECK_MSG(ctx, kernel_size > 0 && kernel_stride > 0 && block_size > 0, InvalidArgument, out,
                      "infllm_attention: kernel_size, kernel_stride, block_size must be positive");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok, InvalidArgument, out);

  const InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len};
  const float* k = k_cache.const_data_ptr<float>();
  const int64_t L = start_pos + T;
  const bool dense = dense_len != -1 && L < dense_len;
  std::lock_guard<std::mutex> lock(memo_mutex);
  KcMemo& m = memo[k];
  // Every call (dense ones too) writes cache rows >= start_pos: drop the memo entries they invalidate.
  const int64_t nk = dense ? 0 : num_kernels(L, p);
  const float* kc = compressed_keys(k, Hkv, D, start_pos, nk, p, m);
  infllm_attention_impl(q.const_data_ptr<float>(), k, v_cache.const_data_ptr<float>(), T, Hq, Hkv, D, start_pos, p,
                        out.mutable_data_ptr<float>(), kc, nk);
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "infllm_attention.out", pocketllm::infllm_attention_out);

// C entry points for tests (ctypes): the selection and the whole op on raw fp32 buffers.
extern "C" {
void pocketllm_infllm_block_mask(const float* q, const float* k, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                                 int64_t start_pos, int64_t kernel_size, int64_t kernel_stride, int64_t block_size,
                                 int64_t init_blocks, int64_t window_size, int64_t topk, uint8_t* mask) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, -1};
  const int64_t L = start_pos + T;
  const int64_t nk = L >= kernel_size ? (L - kernel_size) / kernel_stride + 1 : 0;
  std::vector<float> kc(nk * Hkv * D);
  pocketllm::infllm_compress_keys(k, Hkv, D, p, 0, nk, kc.data());
  pocketllm::infllm_select_blocks(q, kc.data(), nk, T, Hq, Hkv, D, start_pos, p, mask);
}

void pocketllm_infllm_attention(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                                int64_t D, int64_t start_pos, int64_t kernel_size, int64_t kernel_stride,
                                int64_t block_size, int64_t init_blocks, int64_t window_size, int64_t topk,
                                int64_t dense_len, float* out) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len};
  pocketllm::infllm_attention_f32(q, k, v, T, Hq, Hkv, D, start_pos, p, out);
}
}
