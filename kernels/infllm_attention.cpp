// pocketllm::infllm_attention.out: InfLLM v2 (MiniCPM4) sparse attention, CPU, fp32.
//
// Per call of T queries at positions start_pos.., with L = start_pos + T keys in the cache:
//   dense  (dense_len != -1 and L < dense_len): causal attention over keys 0..i;
//   sparse: compressed keys (means of kernel_size keys every kernel_stride, and the coarse keys of 4x that), kernel
//           scores summed over the GQA group (upstream rule: exp(q.Kc1/sqrt(d) - LSE(q.Kc2/sqrt(d))); or the exact
//           softmax over Kc1), block score = max over the kernels touching the block, forced init + local blocks,
//           top-k of the rest (ties to the lower block), then exact softmax attention over the chosen blocks.
// Work is split over (KV head, query) on ExecuTorch's threadpool; each task handles the whole GQA group so that
// every key and value row is read once per query.
//
// Compressed keys (both sets) are memoised per KV-cache buffer: entry j depends only on cache rows
// [stride*j, stride*j + size), and a call at start_pos only writes rows >= start_pos, so entries ending at or before
// start_pos stay valid; a call at start_pos 0 (a new sequence) drops them all. This keeps decode at long context
// from re-reading the whole cache.
#include "infllm_attention.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "common.h"
#include "prefetch.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

int64_t infllm_num_kernels(int64_t L, int64_t size, int64_t stride) {
  return L >= size ? (L - size) / stride + 1 : 0;
}

namespace {

// Compressed keys visible to the query at position pos: stride*j + size - 1 <= pos.
int64_t visible_kernels(int64_t pos, int64_t n_kernels, int64_t size, int64_t stride) {
  if (pos < size - 1) return 0;
  return std::min(n_kernels, (pos - size + 1) / stride + 1);
}

int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

typedef float v4f __attribute__((vector_size(16)));

// The attention loops (dot4, weighted_rows) are written for a vector type V of 8 or 16 fp32 lanes: VecW is the
// widest the build has (16 with AVX-512: half the multiply-adds and loads of 8), v8f elsewhere (NEON: two q
// registers per v8f).
template <typename V>
inline V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
inline v8f fmav(v8f a, v8f b, v8f c) { return fma8(a, b, c); }
inline v8f fold8(v8f a) { return a; }
#if defined(__AVX512F__)
typedef float v16f __attribute__((vector_size(64)));
inline v16f fmav(v16f a, v16f b, v16f c) { return (v16f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline v8f fold8(v16f a) {
  return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
}
typedef v16f VecW;
#else
typedef v8f VecW;
#endif

// Four dot products q . k_r (D a multiple of V's lanes): one vector accumulator per key, folded to 8 lanes and
// reduced together at the end (a transpose-add instead of four horizontal sums).
template <typename V>
inline v4f dot4(const float* q, const float* const kr[4], int64_t D) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  V a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t d = 0; d < D; d += L) {
    const V qv = loadv<V>(q + d);
    a0 = fmav(qv, loadv<V>(kr[0] + d), a0);
    a1 = fmav(qv, loadv<V>(kr[1] + d), a1);
    a2 = fmav(qv, loadv<V>(kr[2] + d), a2);
    a3 = fmav(qv, loadv<V>(kr[3] + d), a3);
  }
  const v8f f0 = fold8(a0), f1 = fold8(a1), f2 = fold8(a2), f3 = fold8(a3);
  const v8f b0 = __builtin_shufflevector(f0, f1, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(f0, f1, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f b1 = __builtin_shufflevector(f2, f3, 0, 8, 2, 10, 4, 12, 6, 14) +
                 __builtin_shufflevector(f2, f3, 1, 9, 3, 11, 5, 13, 7, 15);
  const v8f c = __builtin_shufflevector(b0, b1, 0, 1, 8, 9, 4, 5, 12, 13) +
                __builtin_shufflevector(b0, b1, 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c, c, 0, 1, 2, 3) + __builtin_shufflevector(c, c, 4, 5, 6, 7);
}

// ------------------------------------------------------------------ block scores (docs/infllm_v2.md steps 2-4)
// Bit-identical to the torch op and runtime_py (docs step 3a): every value below is a double computed by IEEE
// operations in one fixed order. Dot products are summed over head_dim in order; the products of two fp32 values are
// exact in double, so a fused multiply-add gives the same sum and fma4d may use one. Everything else (exp_fixed4,
// the sums) must not be contracted into FMAs: this file is built with -ffp-contract=off (CMakeLists.txt).

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

inline v4d splat4d(double x) { return v4d{x, x, x, x}; }

inline v4d load4d(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store4d(double* p, v4d v) { std::memcpy(p, &v, sizeof(v)); }

// Four fp32 values widened to double (exact).
inline v4d widen4(const float* p) {
#if defined(__AVX__)
  return (v4d)_mm256_cvtps_pd(_mm_loadu_ps(p));
#elif defined(__aarch64__)
  const float32x4_t v = vld1q_f32(p);
  const float64x2_t lo = vcvt_f64_f32(vget_low_f32(v)), hi = vcvt_high_f64_f32(v);
  v4d out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  v4f v;
  std::memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, v4d);
#endif
}

// a * b + c where a * b is exact (both widened from fp32): fused or not, the same double.
inline v4d fma4d(v4d a, v4d b, v4d c) {
#if defined(__FMA__)
  return (v4d)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#elif defined(__aarch64__)
  float64x2_t a2[2], b2[2], c2[2];
  std::memcpy(a2, &a, sizeof(a));
  std::memcpy(b2, &b, sizeof(b));
  std::memcpy(c2, &c, sizeof(c));
  c2[0] = vfmaq_f64(c2[0], a2[0], b2[0]);
  c2[1] = vfmaq_f64(c2[1], a2[1], b2[1]);
  std::memcpy(&c, c2, sizeof(c));
  return c;
#else
  return a * b + c;
#endif
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// exp_fixed (docs step 3a), four lanes: x = k ln2 + r, Taylor polynomial of degree 11 for exp(r), times 2^k from
// bits; 0 below -600, +inf above 700. Same constants and operation order as runtime_py/infllm.py::exp_fixed.
inline v4d exp_fixed4(v4d x) {
  const v4d lo = splat4d(-600.0), hi = splat4d(700.0);
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: y + magic rounds y to an integer, ties to even
  v4d xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v4d t = xc * 1.4426950408889634 + magic;
  const v4d k = t - magic;
  const v4d r = (xc - k * 0.6931471803691238) - k * 1.9082149292705877e-10;
  v4d y = splat4d(2.505210838544172e-08);
  y = y * r + 2.755731922398589e-07;
  y = y * r + 2.7557319223985893e-06;
  y = y * r + 2.48015873015873e-05;
  y = y * r + 0.0001984126984126984;
  y = y * r + 0.001388888888888889;
  y = y * r + 0.008333333333333333;
  y = y * r + 0.041666666666666664;
  y = y * r + 0.16666666666666666;
  y = y * r + 0.5;
  y = y * r + 1.0;
  y = y * r + 1.0;
  v4l ki, magic_bits;
  std::memcpy(&ki, &t, sizeof(ki));
  const v4d magic4 = splat4d(magic);
  std::memcpy(&magic_bits, &magic4, sizeof(magic_bits));
  const v4l two_k_bits = (ki - magic_bits + 1023) << 52;
  v4d two_k;
  std::memcpy(&two_k, &two_k_bits, sizeof(two_k));
  y = y * two_k;
  y = x > hi ? splat4d(kInf) : y;
  return x < lo ? splat4d(0.0) : y;
}

int64_t round_up8(int64_t n) { return (n + kInfllmKcLanes - 1) / kInfllmKcLanes * kInfllmKcLanes; }

// x[g * stride + j] = (sum_d q_g[d] kc[j][d]) * scale for the GN heads at qd ([GN][D] doubles) and the 8 keys of one
// interleaved group ([D][8] floats).
template <int GN>
void logits_tile(const double* qd, int64_t D, const float* group, double scale, double* x, int64_t stride) {
  v4d acc[GN][2] = {};
  for (int64_t d = 0; d < D; ++d) {
    const v4d k0 = widen4(group + d * 8), k1 = widen4(group + d * 8 + 4);
    for (int g = 0; g < GN; ++g) {
      const v4d qv = splat4d(qd[g * D + d]);
      acc[g][0] = fma4d(qv, k0, acc[g][0]);
      acc[g][1] = fma4d(qv, k1, acc[g][1]);
    }
  }
  for (int g = 0; g < GN; ++g) {
    store4d(x + g * stride, acc[g][0] * scale);
    store4d(x + g * stride + 4, acc[g][1] * scale);
  }
}

// Logits of the G heads against the first nv compressed keys of KV head h: x [G][round_up8(nv)], -inf past nv.
void kernel_logits(const double* qd, int64_t G, int64_t D, const float* kc, int64_t capacity, int64_t h, int64_t nv,
                   double* x) {
  const int64_t stride = round_up8(nv);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int64_t j = 0; j < stride; j += kInfllmKcLanes) {
    const float* group = kc + infllm_kc_index(j, h, 0, D, capacity);
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) logits_tile<4>(qd + g * D, D, group, scale, x + g * stride + j, stride);
    switch (G - g) {
      case 3: logits_tile<3>(qd + g * D, D, group, scale, x + g * stride + j, stride); break;
      case 2: logits_tile<2>(qd + g * D, D, group, scale, x + g * stride + j, stride); break;
      case 1: logits_tile<1>(qd + g * D, D, group, scale, x + g * stride + j, stride); break;
    }
  }
  for (int64_t g = 0; g < G; ++g) std::fill(x + g * stride + nv, x + (g + 1) * stride, -kInf);
}

// Attention work of one (KV head, query): the online softmax (per head the running max m and sum l; p: [G][kChunk]
// logits, then weights), the chunks to visit (first key, count) and the fp16 cache's rows widened (kbuf, vbuf).
struct AttendScratch {
  std::vector<float> m, l, p, kbuf, vbuf;
  std::vector<std::pair<int64_t, int64_t>> chunks;
};

// Per-thread work buffers, kept across calls: allocating them per call costs page faults at long context.
struct Scratch {
  std::vector<double> qd, x, x_norm, e, group, bscore;  // block scores
  std::vector<int64_t> order;                        // selection
  std::vector<uint8_t> sel;
  AttendScratch attend;                              // attention
};

// Not inlined: callers then hold a plain pointer (inlined, GCC re-derives the thread-local address, a
// __tls_get_addr call in a shared library, at every use).
__attribute__((noinline)) Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Block scores of one (KV head, query) (docs steps 2-4): bscore[n_blocks].
void block_scores_one(const float* qg /* [G, D] */, const InfllmKeys& keys, int64_t h, int64_t G,
                      int64_t D, int64_t pos, int64_t n_blocks, const InfllmParams& p, Scratch& s,
                      double* bscore) {
  std::fill(bscore, bscore + n_blocks, -kInf);
  const int64_t nv = visible_kernels(pos, keys.n_fine, p.kernel_size, p.kernel_stride);
  if (nv == 0) return;
  const bool exact = p.score_rule == kInfllmScoresExact;
  const int64_t nv_norm = exact ? nv : visible_kernels(pos, keys.n_coarse, p.coarse_size(), p.coarse_stride());
  s.qd.resize(G * D);
  for (int64_t i = 0; i < G * D; ++i) s.qd[i] = qg[i];
  const int64_t stride = round_up8(nv), stride_norm = round_up8(nv_norm);
  s.x.resize(G * stride);
  kernel_logits(s.qd.data(), G, D, keys.fine, keys.fine_capacity, h, nv, s.x.data());
  const double* x_norm = s.x.data();
  if (!exact) {
    s.x_norm.resize(G * stride_norm);
    kernel_logits(s.qd.data(), G, D, keys.coarse, keys.coarse_capacity, h, nv_norm, s.x_norm.data());
    x_norm = s.x_norm.data();
  }
  // group[j] = sum_g exp(x_g[j] - LSE_g) = sum_g exp(x_g[j] - m_g) * (1 / l_g), heads in order.
  s.group.assign(stride, nv_norm == 0 ? kInf : 0.0);  // no normalising key seen yet: LSE = -inf, scores +inf
  s.e.resize(stride_norm);
  for (int64_t g = 0; g < G && nv_norm > 0; ++g) {
    const double* xn = x_norm + g * stride_norm;
    const double* xg = s.x.data() + g * stride;
    double m = -kInf;
    for (int64_t j = 0; j < nv_norm; ++j) m = std::max(m, xn[j]);
    const v4d mv = splat4d(m);
    double* e = s.e.data();
    double l = 0.0;
    for (int64_t j = 0; j < stride_norm; j += 4) {  // in key order; lanes past nv_norm add exp(-inf) = 0
      store4d(e + j, exp_fixed4(load4d(xn + j) - mv));
      l = l + e[j];
      l = l + e[j + 1];
      l = l + e[j + 2];
      l = l + e[j + 3];
    }
    const v4d inv = splat4d(1.0 / l);
    for (int64_t j = 0; j < stride; j += 4) {  // exact: the numerators are the normaliser's terms, already computed
      const v4d numerator = exact ? load4d(e + j) : exp_fixed4(load4d(xg + j) - mv);
      store4d(&s.group[j], load4d(&s.group[j]) + numerator * inv);
    }
  }
  // Block score: max over the visible kernels touching block b.
  for (int64_t b = 0; b < n_blocks; ++b) {
    int64_t lo = floor_div(p.block_size * b - p.kernel_size + p.kernel_stride, p.kernel_stride);
    lo = std::max<int64_t>(lo, 0);
    int64_t hi = (p.block_size * b + p.block_size - 1) / p.kernel_stride;
    hi = std::min(hi, nv - 1);
    for (int64_t j = lo; j <= hi; ++j) bscore[b] = std::max(bscore[b], s.group[j]);
  }
}

// Selection for one (KV head, query) from its block scores (docs steps 5-6): writes sel[n_blocks].
void select_one(const double* bscore, int64_t pos, int64_t n_blocks, const InfllmParams& p, uint8_t* sel,
                std::vector<int64_t>& order) {
  const int64_t bq = pos / p.block_size;
  const int64_t local = p.window_size / p.block_size;
  int64_t n_forced = 0;
  order.clear();
  for (int64_t b = 0; b < n_blocks; ++b) {
    const bool valid = b <= bq;
    const bool forced = valid && (b < p.init_blocks || b >= bq - local);
    sel[b] = forced ? 1 : 0;
    n_forced += forced;
    if (valid && !forced && bscore[b] > -kInf) order.push_back(b);
  }
  const int64_t slots = std::max<int64_t>(p.topk + local - n_forced, 0);
  if (static_cast<int64_t>(order.size()) > slots) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return bscore[a] > bscore[c]; });
    order.resize(slots);
  }
  for (int64_t b : order) sel[b] = 1;
}

// ------------------------------------------------------------------ attention over the selected keys (step 7)
// Keys are visited in runs of consecutive positions (a selected block; 0..pos when dense), kChunk rows at a time:
// the chunk's K and V rows of KV head h are used in place (fp32 cache) or widened to fp32 once into per-thread
// scratch (fp16 cache: each value widened once, not once per query head), the G heads' logits computed against
// them, and an online softmax (running max m_g and sum l_g; the output rescaled when the max grows) accumulates
// p V. Logits, K and V rows of a chunk stay in L1: nothing of size O(keys) is written.
constexpr int64_t kChunk = 64;

// Rows j0..j0+n-1 of head h as fp32 rows: a pointer and its row stride.
inline const float* chunk_rows(const float* cache, int64_t j0, int64_t n, int64_t h, int64_t D, int64_t row,
                               std::vector<float>&, int64_t& stride) {
  stride = row;
  (void)n;
  return cache + j0 * row + h * D;
}

inline const float* chunk_rows(const uint16_t* cache, int64_t j0, int64_t n, int64_t h, int64_t D, int64_t row,
                               std::vector<float>& buf, int64_t& stride) {
  stride = D;
  buf.resize(kChunk * D);
  const uint16_t* src = cache + j0 * row + h * D;
  for (int64_t i = 0; i < n; ++i) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) store8(buf.data() + i * D + d, load8(src + i * row + d));
    for (; d < D; ++d) buf[i * D + d] = half_to_float(src[i * row + d]);
  }
  return buf.data();
}

// out[g, :] += sum_i p[g, i] v_i for the G heads (p: [G][kChunk]), D % (NV lanes of V) == 0; each head's output
// row is held in registers across the chunk, NV vectors at a time.
template <typename V, int NV>
void weighted_rows(const float* p, int64_t n, const float* v, int64_t vstride, int64_t G, int64_t D, float* outg) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  for (int64_t g = 0; g < G; ++g) {
    const float* pg = p + g * kChunk;
    for (int64_t d0 = 0; d0 < D; d0 += L * NV) {
      V acc[NV];
      for (int u = 0; u < NV; ++u) acc[u] = loadv<V>(outg + g * D + d0 + L * u);
      for (int64_t i = 0; i < n; ++i) {
        const float* vr = v + i * vstride + d0;
        const V wv = V{} + pg[i];
        for (int u = 0; u < NV; ++u) acc[u] = fmav(wv, loadv<V>(vr + L * u), acc[u]);
      }
      for (int u = 0; u < NV; ++u) storev<V>(outg + g * D + d0 + L * u, acc[u]);
    }
  }
}

// Prefetch rows j .. j + count - 1 of head h (their K and V): what the next chunk will read, issued a few rows at a
// time while this chunk computes (the rows of a block chosen by score are a jump no hardware prefetcher foresees;
// issued all at once, the requests overflow the core's miss buffers and are dropped).
template <typename KV>
inline void prefetch_rows(const KV* k, const KV* v, int64_t j, int64_t count, int64_t h, int64_t D, int64_t row) {
  const int64_t bytes = D * static_cast<int64_t>(sizeof(KV));
  for (int64_t r = j; r < j + count; ++r)
    for (int64_t b = 0; b < bytes; b += 64) {
      prefetch_line(reinterpret_cast<const char*>(k + r * row + h * D) + b);
      prefetch_line(reinterpret_cast<const char*>(v + r * row + h * D) + b);
    }
}

// One chunk of n consecutive keys (n <= kChunk) for the G heads at qg; the next chunk's (first key, count) are
// prefetched along the way (count 0: none).
template <typename KV>
void attend_chunk(const float* qg, const KV* k, const KV* v, int64_t j0, int64_t n, int64_t h, int64_t G, int64_t D,
                  int64_t row, float scale, AttendScratch& sm, float* outg, int64_t next_j0, int64_t next_n) {
  int64_t ks = 0, vs = 0;
  const float* kc = chunk_rows(k, j0, n, h, D, row, sm.kbuf, ks);
  float* logits = sm.p.data();
  int64_t i = 0;
  const bool wide = D % static_cast<int64_t>(sizeof(VecW) / sizeof(float)) == 0;  // dot4 in VecW lanes
  if (D % 8 == 0) {
    for (; i + 4 <= n; i += 4) {
      if (i < next_n) prefetch_rows(k, v, next_j0 + i, std::min<int64_t>(4, next_n - i), h, D, row);
      const float* kr[4] = {kc + i * ks, kc + (i + 1) * ks, kc + (i + 2) * ks, kc + (i + 3) * ks};
      for (int64_t g = 0; g < G; ++g) {
        const v4f d4 = (wide ? dot4<VecW>(qg + g * D, kr, D) : dot4<v8f>(qg + g * D, kr, D)) * scale;
        std::memcpy(logits + g * kChunk + i, &d4, sizeof(d4));
      }
    }
  }
  if (i < next_n) prefetch_rows(k, v, next_j0 + i, next_n - i, h, D, row);
  for (; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) logits[g * kChunk + i] = dot(qg + g * D, kc + i * ks, D) * scale;
  for (int64_t g = 0; g < G; ++g) {
    float* lg = logits + g * kChunk;
    float mx = sm.m[g];
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, lg[i]);
    if (mx > sm.m[g]) {  // the running max grows: rescale what was accumulated against the old one
      const float c = std::exp(sm.m[g] - mx);  // exp(-inf) = 0 on the first chunk
      sm.l[g] *= c;
      for (int64_t d = 0; d < D; ++d) outg[g * D + d] *= c;
      sm.m[g] = mx;
    }
    sm.l[g] += exp_shifted_sum(lg, n, mx);
  }
  const float* vc = chunk_rows(v, j0, n, h, D, row, sm.vbuf, vs);
  constexpr int64_t W = sizeof(VecW) / sizeof(float);  // 64 fp32 values = 8 accumulators of 8 lanes, 4 of 16
  if (D % 64 == 0) {
    weighted_rows<VecW, 64 / W>(logits, n, vc, vs, G, D, outg);
  } else if (D % 32 == 0) {
    weighted_rows<v8f, 4>(logits, n, vc, vs, G, D, outg);
  } else if (D % 8 == 0) {
    weighted_rows<v8f, 1>(logits, n, vc, vs, G, D, outg);
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t i = 0; i < n; ++i) axpy(outg + g * D, logits[g * kChunk + i], vc + i * vs, D);
  }
}

// Exact softmax attention of the G query heads of one KV head over the keys j <= pos inside selected blocks
// (sel == nullptr: all keys 0..pos). outg: [G, D]. KV: float, or uint16_t = fp16 bits.
template <typename KV>
void attend_one(const float* qg, const KV* k, const KV* v, int64_t Hkv, int64_t h, int64_t G, int64_t D,
                int64_t pos, const uint8_t* sel, int64_t block_size, float* outg, AttendScratch& sm) {
  const int64_t row = Hkv * D;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  sm.m.assign(G, kNegInfHelper());
  sm.l.assign(G, 0.0f);
  sm.p.resize(G * kChunk);
  std::fill(outg, outg + G * D, 0.0f);
  // The chunks to visit (first key, count), so that the next one's rows can be prefetched: its K and V rows sit at
  // a stride of Hkv * D from a block chosen by score, a jump the hardware prefetcher cannot foresee.
  sm.chunks.clear();
  auto add_run = [&](int64_t j0, int64_t j1) {  // keys j0 .. j1 - 1
    for (int64_t c = j0; c < j1; c += kChunk) sm.chunks.emplace_back(c, std::min(kChunk, j1 - c));
  };
  if (sel == nullptr) {
    add_run(0, pos + 1);
  } else {
    const int64_t n_blocks = pos / block_size + 1;
    for (int64_t b = 0; b < n_blocks; ++b)
      if (sel[b]) add_run(b * block_size, std::min((b + 1) * block_size, pos + 1));
  }
  for (size_t c = 0; c < sm.chunks.size(); ++c) {
    const auto next = c + 1 < sm.chunks.size() ? sm.chunks[c + 1] : std::pair<int64_t, int64_t>{0, 0};
    attend_chunk(qg, k, v, sm.chunks[c].first, sm.chunks[c].second, h, G, D, row, scale, sm, outg, next.first,
                 next.second);
  }
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.0f / sm.l[g];
    for (int64_t d = 0; d < D; ++d) outg[g * D + d] *= inv;
  }
}

struct KcMemo {
  // infllm_kc_index layout for `capacity` entries (every window the cache can hold); left uninitialised, so only
  // the pages of entries computed so far are ever touched (memory grows with the context, not the cache size).
  std::unique_ptr<float[]> kc;
  int64_t count = 0;  // valid leading entries
  int64_t Hkv = 0, D = 0, size = 0, stride = 0, capacity = 0;
};

struct CacheMemo {
  KcMemo fine, coarse;
};

std::mutex memo_mutex;
std::unordered_map<const void*, CacheMemo> memo;

// Compressed keys (window `size`, every `stride`) for the first n_needed entries of a cache of `rows` rows, reusing
// those still valid for this cache buffer. n_needed = 0 still drops the entries this call's cache write invalidates.
// The buffer is sized once for the whole cache, so each KV head's keys stay one contiguous stream.
template <typename KV>
const float* compressed_keys(const KV* k, int64_t rows, int64_t Hkv, int64_t D, int64_t start_pos,
                             int64_t n_needed, int64_t size, int64_t stride, KcMemo& m) {
  const int64_t capacity = infllm_num_kernels(rows, size, stride);
  if (m.Hkv != Hkv || m.D != D || m.size != size || m.stride != stride || m.capacity != capacity) {
    m = KcMemo{};
    m.Hkv = Hkv, m.D = D, m.size = size, m.stride = stride, m.capacity = capacity;
  }
  // Entries whose windows end at or before start_pos were not touched by this call's cache write.
  m.count = std::min(m.count, start_pos == 0 ? int64_t{0} : infllm_num_kernels(start_pos, size, stride));
  if (n_needed > 0 && !m.kc) m.kc.reset(new float[infllm_kc_floats(capacity, Hkv, D)]);
  if (m.count < n_needed) infllm_compress_keys(k, Hkv, D, size, stride, capacity, m.count, n_needed, m.kc.get());
  m.count = std::max(m.count, n_needed);
  return m.kc.get();
}

}  // namespace

namespace {

template <typename KV>
void compress_keys(const KV* k, int64_t Hkv, int64_t D, int64_t size, int64_t stride, int64_t capacity,
                   int64_t j_begin, int64_t j_end, float* kc) {
  const int64_t row = Hkv * D;
  parallel(j_end - j_begin, 8, [&](int64_t b, int64_t e) {
    std::vector<double> acc(row);
    for (int64_t jj = b; jj < e; ++jj) {
      const int64_t j = j_begin + jj;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < size; ++t) {
        const KV* kr = k + (stride * j + t) * row;
        for (int64_t c = 0; c < row; ++c) acc[c] += to_float(kr[c]);
      }
      for (int64_t h = 0; h < Hkv; ++h)
        for (int64_t d = 0; d < D; ++d)
          kc[infllm_kc_index(j, h, d, D, capacity)] = static_cast<float>(acc[h * D + d] / static_cast<double>(size));
    }
  });
  // The scoring loop reads whole groups of 8: give the lanes after the last entry a defined value.
  for (int64_t j = j_end; j < round_up8(j_end) && j_begin < j_end; ++j)
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t d = 0; d < D; ++d) kc[infllm_kc_index(j, h, d, D, capacity)] = 0.0f;
}

}  // namespace

void infllm_compress_keys(const float* k, int64_t Hkv, int64_t D, int64_t size, int64_t stride, int64_t capacity,
                          int64_t j_begin, int64_t j_end, float* kc) {
  compress_keys(k, Hkv, D, size, stride, capacity, j_begin, j_end, kc);
}

void infllm_compress_keys(const uint16_t* k, int64_t Hkv, int64_t D, int64_t size, int64_t stride, int64_t capacity,
                          int64_t j_begin, int64_t j_end, float* kc) {
  compress_keys(k, Hkv, D, size, stride, capacity, j_begin, j_end, kc);
}

void infllm_block_scores(const float* q, const InfllmKeys& keys, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                         int64_t start_pos, const InfllmParams& p, double* scores) {
  const int64_t G = Hq / Hkv;
  const int64_t n_blocks = (start_pos + T + p.block_size - 1) / p.block_size;
  parallel(Hkv * T, 1, [&](int64_t b, int64_t e) {
    Scratch& s = thread_scratch();
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / T, t = task % T;
      block_scores_one(q + (t * Hq + h * G) * D, keys, h, G, D, start_pos + t, n_blocks, p, s,
                       scores + (h * T + t) * n_blocks);
    }
  });
}

void infllm_select_blocks(const float* q, const InfllmKeys& keys, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t start_pos, const InfllmParams& p, uint8_t* mask) {
  const int64_t G = Hq / Hkv;
  const int64_t n_blocks = (start_pos + T + p.block_size - 1) / p.block_size;
  parallel(Hkv * T, 1, [&](int64_t b, int64_t e) {
    Scratch& s = thread_scratch();
    s.bscore.resize(n_blocks);
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / T, t = task % T;
      block_scores_one(q + (t * Hq + h * G) * D, keys, h, G, D, start_pos + t, n_blocks, p, s, s.bscore.data());
      select_one(s.bscore.data(), start_pos + t, n_blocks, p, mask + (h * T + t) * n_blocks, s.order);
    }
  });
}

template <typename KV>
static void infllm_attention_impl(const float* q, const KV* k, const KV* v, int64_t T, int64_t Hq,
                                  int64_t Hkv, int64_t D, int64_t start_pos, const InfllmParams& p, float* out,
                                  const InfllmKeys& keys) {
  const int64_t G = Hq / Hkv;
  const int64_t L = start_pos + T;
  const bool dense = p.dense_len != -1 && L < p.dense_len;
  const int64_t n_blocks = (L + p.block_size - 1) / p.block_size;
  parallel(Hkv * T, 1, [&](int64_t b, int64_t e) {
    Scratch& s = thread_scratch();
    s.bscore.resize(n_blocks);
    s.sel.resize(n_blocks);
    for (int64_t task = b; task < e; ++task) {
      const int64_t h = task / T, t = task % T;
      const float* qg = q + (t * Hq + h * G) * D;
      const int64_t pos = start_pos + t;
      if (!dense) {
        block_scores_one(qg, keys, h, G, D, pos, n_blocks, p, s, s.bscore.data());
        select_one(s.bscore.data(), pos, n_blocks, p, s.sel.data(), s.order);
      }
      attend_one(qg, k, v, Hkv, h, G, D, pos, dense ? nullptr : s.sel.data(), p.block_size,
                 out + (t * Hq + h * G) * D, s.attend);
    }
  });
}

// Compressed keys of the first L cache rows, without memo (C entry points, tests). The vectors own the storage.
template <typename KV>
static InfllmKeys compress_all(const KV* k, int64_t L, int64_t Hkv, int64_t D, const InfllmParams& p,
                               std::vector<float>& fine, std::vector<float>& coarse) {
  const int64_t n1 = infllm_num_kernels(L, p.kernel_size, p.kernel_stride);
  const int64_t n2 = p.score_rule == kInfllmScoresExact ? 0 : infllm_num_kernels(L, p.coarse_size(), p.coarse_stride());
  fine.assign(infllm_kc_floats(n1, Hkv, D), 0.0f);
  coarse.assign(infllm_kc_floats(n2, Hkv, D), 0.0f);
  infllm_compress_keys(k, Hkv, D, p.kernel_size, p.kernel_stride, n1, 0, n1, fine.data());
  infllm_compress_keys(k, Hkv, D, p.coarse_size(), p.coarse_stride(), n2, 0, n2, coarse.data());
  return InfllmKeys{fine.data(), n1, n1, coarse.data(), n2, n2};
}

// The whole op without memo: compressed keys of the first L rows, then the attention.
template <typename KV>
static void attention_without_memo(const float* q, const KV* k, const KV* v, int64_t T, int64_t Hq, int64_t Hkv,
                                   int64_t D, int64_t start_pos, const InfllmParams& p, float* out) {
  std::vector<float> fine, coarse;
  const InfllmKeys keys = compress_all(k, start_pos + T, Hkv, D, p, fine, coarse);
  infllm_attention_impl(q, k, v, T, Hq, Hkv, D, start_pos, p, out, keys);
}

void infllm_attention_f32(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                          int64_t D, int64_t start_pos, const InfllmParams& p, float* out) {
  attention_without_memo(q, k, v, T, Hq, Hkv, D, start_pos, p, out);
}

void infllm_attention_f16kv(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, int64_t Hq,
                            int64_t Hkv, int64_t D, int64_t start_pos, const InfllmParams& p, float* out) {
  attention_without_memo(q, k, v, T, Hq, Hkv, D, start_pos, p, out);
}

namespace {

// The memoised compressed keys of this call's cache, then the attention; KV = float or uint16_t (fp16 bits).
template <typename KV>
void run_out(const Tensor& q, const KV* k, const KV* v, int64_t rows, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
             int64_t start_pos, const InfllmParams& p, float* out) {
  const int64_t L = start_pos + T;
  const bool dense = p.dense_len != -1 && L < p.dense_len;
  std::lock_guard<std::mutex> lock(memo_mutex);
  CacheMemo& m = memo[k];
  // Every call (dense ones too) writes cache rows >= start_pos: drop the memo entries they invalidate, in both sets.
  const int64_t n1 = dense ? 0 : infllm_num_kernels(L, p.kernel_size, p.kernel_stride);
  const bool coarse = !dense && p.score_rule == kInfllmScoresUpstream;
  const int64_t n2 = coarse ? infllm_num_kernels(L, p.coarse_size(), p.coarse_stride()) : 0;
  const InfllmKeys keys{
      compressed_keys(k, rows, Hkv, D, start_pos, n1, p.kernel_size, p.kernel_stride, m.fine), n1, m.fine.capacity,
      compressed_keys(k, rows, Hkv, D, start_pos, n2, p.coarse_size(), p.coarse_stride(), m.coarse), n2,
      m.coarse.capacity};
  infllm_attention_impl(q.const_data_ptr<float>(), k, v, T, Hq, Hkv, D, start_pos, p, out, keys);
}

}  // namespace

Tensor& infllm_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache,
                             const Tensor& v_cache, int64_t start_pos, int64_t kernel_size, int64_t kernel_stride,
                             int64_t block_size, int64_t init_blocks, int64_t window_size, int64_t topk,
                             int64_t dense_len, int64_t score_rule, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, InvalidArgument, out,
                      "infllm_attention: q, k_cache, v_cache must be 4-D [1, S, H, D]");
  const ScalarType kv = k_cache.scalar_type();
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && v_cache.scalar_type() == kv &&
                               (kv == ScalarType::Float || kv == ScalarType::Half),
                      InvalidArgument, out,
                      "infllm_attention: q must be float32, k_cache and v_cache both float32 or both float16");
  const int64_t T = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k_cache.size(2);
  ET_KERNEL_CHECK_MSG(ctx, q.size(0) == 1 && Hkv > 0 && Hq % Hkv == 0 && k_cache.size(3) == D, InvalidArgument,
                      out, "infllm_attention: batch 1, num heads a multiple of KV heads, same head_dim");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + T <= k_cache.size(1), InvalidArgument, out,
                      "infllm_attention: start_pos + T exceeds the cache");
  ET_KERNEL_CHECK_MSG(ctx, kernel_size > 0 && kernel_stride > 0 && block_size > 0, InvalidArgument, out,
                      "infllm_attention: kernel_size, kernel_stride, block_size must be positive");
  ET_KERNEL_CHECK_MSG(ctx, score_rule == kInfllmScoresUpstream || score_rule == kInfllmScoresExact,
                      InvalidArgument, out, "infllm_attention: score_rule must be 0 (upstream) or 1 (exact)");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == Error::Ok, InvalidArgument, out);

  const InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len, score_rule};
  const int64_t rows = k_cache.size(1);
  if (kv == ScalarType::Half) {  // fp16 bits: ExecuTorch's Half is one uint16_t
    run_out(q, reinterpret_cast<const uint16_t*>(k_cache.const_data_ptr()),
            reinterpret_cast<const uint16_t*>(v_cache.const_data_ptr()), rows, T, Hq, Hkv, D, start_pos, p,
            out.mutable_data_ptr<float>());
  } else {
    run_out(q, k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(), rows, T, Hq, Hkv, D, start_pos, p,
            out.mutable_data_ptr<float>());
  }
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "infllm_attention.out", pocketllm::infllm_attention_out);

// C entry points for tests (ctypes): block scores, the selection, and the whole op on raw fp32 buffers.
extern "C" {
void pocketllm_infllm_block_scores(const float* q, const float* k, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                                   int64_t start_pos, int64_t kernel_size, int64_t kernel_stride, int64_t block_size,
                                   int64_t score_rule, double* scores) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, 0, 0, 0, -1, score_rule};
  std::vector<float> fine, coarse;
  const pocketllm::InfllmKeys keys = pocketllm::compress_all(k, start_pos + T, Hkv, D, p, fine, coarse);
  pocketllm::infllm_block_scores(q, keys, T, Hq, Hkv, D, start_pos, p, scores);
}

void pocketllm_infllm_block_mask(const float* q, const float* k, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                                 int64_t start_pos, int64_t kernel_size, int64_t kernel_stride, int64_t block_size,
                                 int64_t init_blocks, int64_t window_size, int64_t topk, int64_t score_rule,
                                 uint8_t* mask) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, -1,
                                  score_rule};
  std::vector<float> fine, coarse;
  const pocketllm::InfllmKeys keys = pocketllm::compress_all(k, start_pos + T, Hkv, D, p, fine, coarse);
  pocketllm::infllm_select_blocks(q, keys, T, Hq, Hkv, D, start_pos, p, mask);
}

void pocketllm_infllm_attention(const float* q, const float* k, const float* v, int64_t T, int64_t Hq, int64_t Hkv,
                                int64_t D, int64_t start_pos, int64_t kernel_size, int64_t kernel_stride,
                                int64_t block_size, int64_t init_blocks, int64_t window_size, int64_t topk,
                                int64_t dense_len, int64_t score_rule, float* out) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len,
                                  score_rule};
  pocketllm::infllm_attention_f32(q, k, v, T, Hq, Hkv, D, start_pos, p, out);
}

// The same with an fp16 cache (k, v: fp16 bits).
void pocketllm_infllm_attention_f16kv(const float* q, const uint16_t* k, const uint16_t* v, int64_t T, int64_t Hq,
                                      int64_t Hkv, int64_t D, int64_t start_pos, int64_t kernel_size,
                                      int64_t kernel_stride, int64_t block_size, int64_t init_blocks,
                                      int64_t window_size, int64_t topk, int64_t dense_len, int64_t score_rule,
                                      float* out) {
  const pocketllm::InfllmParams p{kernel_size, kernel_stride, block_size, init_blocks, window_size, topk, dense_len,
                                  score_rule};
  pocketllm::infllm_attention_f16kv(q, k, v, T, Hq, Hkv, D, start_pos, p, out);
}
}
