// pocketllm::moe_ffn.out / pocketllm::moe_ffn_any4.out: routed experts, CPU, fp32 activations and sums.
//
// One call, in passes over lists of work items on ExecuTorch's threadpool (parallel_dynamic):
//   1. route: the (token, slot) pairs grouped by expert (counting sort: experts ascending, tokens ascending), so each
//      routed expert runs once for all its tokens and no other expert's weights are touched;
//   2. gate/up. Experts with kPanelTokens tokens or more (prefill), items = (expert, 16 neurons): tiles of 2 weight
//      rows x 4 tokens for gate and up (any4 rows dequantised exactly first), h = act(g) * u. Decode-like experts
//      (fewer tokens; decode: all of them): the gate rows (same items), then per pair the list of neurons whose up
//      row is read (ReGLU: only those with relu(gate) > 0 when few enough are, see NeuronSparsity), then the listed
//      up rows, items = (expert, 128 listed neurons), prefetched ahead of use. any4 calls with no panel expert take
//      gate rows (and down rows, below) 128 to an item, so that each thread streams long runs;
//   3. down. Float experts (down_t [F, H]), items = (expert, 64 output columns): y[p, cols] = sum over the pair's
//      listed neurons of h[p, f] * down_t[f, cols], 8 register accumulators (unlisted rows are never read); prefill
//      experts: 6 tokens x 16 columns register tiles. any4 experts (down [H, F], quantised along F), items = (expert,
//      16 output rows; 128 in calls without panel experts): any4_decode.h's row dot over the whole h row (a neuron's
//      down weights are one code in each of the H rows' groups: nothing to skip), or dequantised tiles for prefill;
//   4. combine: out[t] = sum over t's slots, experts ascending, of w * y[pair]: multiply, then add, as the reference
//      (export/ops/moe_ffn.py) does, in its order.
// Dot products use explicit fused multiply-adds (fma8); the file builds with -ffp-contract=off, so any4 values keep
// their two roundings (lut * s, then + z) when dequantised.
#include "moe_ffn.h"

#include <algorithm>
#include <numeric>
#include <string_view>
#include <type_traits>
#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "any4_decode.h"
#include "common.h"
#include "prefetch.h"

namespace pocketllm {
namespace {

constexpr int64_t kNeuronBlock = 16;  // gate/up rows per work item
constexpr int64_t kDecodeRowBlock = 128;  // any4 gate and down rows per work item in a call without panel experts
constexpr int64_t kColumnBlock = 64;  // down_t columns per work item (8 accumulators of 8 lanes)
constexpr int64_t kUpChunk = 128;     // up rows (of one expert's neuron list) per work item: long runs to stream
constexpr int64_t kPrefetchRows = 4;  // listed rows are irregular: they are prefetched this far ahead

// ------------------------------------------------------------------------------------------ weight elements
// Float expert weights are fp32, or bf16 held as uint16_t bit patterns. Loops take weights 16 at a time as two fp32
// vectors (load16): fp32 in order (elements 0..7, 8..15); bf16 as even and odd elements, since a 32-bit lane holds
// two bf16 values and each widens exactly with one instruction (the low one: shift left 16; the high one: mask),
// where widening in order costs ~6 on AVX2. Whatever meets a weight vector lane by lane (x in a dot product) is put
// in the same order once per call (weight_order); outputs indexed by weight columns are stored back in order
// (store16). Elements past the last whole block of 16 are used one by one, in order.
typedef uint32_t v8u32 __attribute__((vector_size(32)));

inline float widen(float v) { return v; }
inline float widen(uint16_t bf16) { return any4::bf16_to_float(bf16); }

inline void load16(const float* p, v8f& a, v8f& b) {
  a = load8(p);
  b = load8(p + 8);
}
inline void load16(const uint16_t* p, v8f& a, v8f& b) {
  v8u32 w;
  std::memcpy(&w, p, sizeof(w));
  const v8u32 even = w << 16, odd = w & 0xFFFF0000u;
  std::memcpy(&a, &even, sizeof(a));
  std::memcpy(&b, &odd, sizeof(b));
}

template <typename W>
inline void store16(float* y, v8f a, v8f b) {
  if constexpr (std::is_same_v<W, float>) {
    store8(y, a);
    store8(y + 8, b);
  } else {
    for (int i = 0; i < 8; ++i) y[2 * i] = a[i], y[2 * i + 1] = b[i];
  }
}

// v [n] in load16's order for W (fp32: unchanged).
template <typename W>
void weight_order(const float* v, int64_t n, float* out) {
  int64_t i = 0;
  if constexpr (std::is_same_v<W, uint16_t>)
    for (; i + 16 <= n; i += 16)
      for (int j = 0; j < 8; ++j) out[i + j] = v[i + 2 * j], out[i + 8 + j] = v[i + 2 * j + 1];
  for (; i < n; ++i) out[i] = v[i];
}

inline v8f splat(float v) { return v8f{v, v, v, v, v, v, v, v}; }

// w . x over n (x in weight order), four independent accumulators.
template <typename W>
inline float dot_w(const W* w, const float* x, int64_t n) {
  v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, w0, w1, w2, w3;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    load16(w + i, w0, w1);
    load16(w + i + 16, w2, w3);
    a0 = fma8(w0, load8(x + i), a0);
    a1 = fma8(w1, load8(x + i + 8), a1);
    a2 = fma8(w2, load8(x + i + 16), a2);
    a3 = fma8(w3, load8(x + i + 24), a3);
  }
  for (; i + 16 <= n; i += 16) {
    load16(w + i, w0, w1);
    a0 = fma8(w0, load8(x + i), a0);
    a1 = fma8(w1, load8(x + i + 8), a1);
  }
  float s = hsum8((a0 + a1) + (a2 + a3));
  for (; i < n; ++i) s += widen(w[i]) * x[i];
  return s;
}

// out[m * ldo + r] = w_r . xs[m] for R consecutive weight rows (stride K) and M token rows (in weight order): each
// weight vector loaded once serves M tokens.
template <int R, int M, typename W>
inline void dot_tile(const W* w, int64_t K, const float* const* xs, float* out, int64_t ldo) {
  v8f acc[M][R][2];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v8f wa[R], wb[R];
    for (int r = 0; r < R; ++r) load16(w + r * K + k, wa[r], wb[r]);
    for (int m = 0; m < M; ++m) {
      const v8f xa = load8(xs[m] + k), xb = load8(xs[m] + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[m][r][0] = fma8(wa[r], xa, acc[m][r][0]);
        acc[m][r][1] = fma8(wb[r], xb, acc[m][r][1]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float s = hsum8(acc[m][r][0] + acc[m][r][1]);
      for (int64_t j = k; j < K; ++j) s += widen(w[r * K + j]) * xs[m][j];
      out[m * ldo + r] = s;
    }
}

template <int R, typename W>
inline void dot_tile_m(const W* w, int64_t K, const float* const* xs, int64_t m, float* out, int64_t ldo) {
  switch (m) {
    case 4: dot_tile<R, 4>(w, K, xs, out, ldo); break;
    case 3: dot_tile<R, 3>(w, K, xs, out, ldo); break;
    case 2: dot_tile<R, 2>(w, K, xs, out, ldo); break;
    default: dot_tile<R, 1>(w, K, xs, out, ldo); break;
  }
}

// out[m * ldo + r] = w_r . xs[m], r < rows, m < M: tiles of 2 rows x 4 tokens.
template <typename W>
void rows_times_tokens(const W* w, int64_t rows, int64_t K, const float* const* xs, int64_t M, float* out,
                       int64_t ldo) {
  for (int64_t m = 0; m < M; m += 4) {
    const int64_t mm = std::min<int64_t>(4, M - m);
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) dot_tile_m<2>(w + r * K, K, xs + m, mm, out + m * ldo + r, ldo);
    if (r < rows) dot_tile_m<1>(w + r * K, K, xs + m, mm, out + m * ldo + r, ldo);
  }
}

// y_m[c] = sum_f h_m[f] * wt[f * ldw + c] for c < 16 and M tokens (wt k-major: down_t's rows).
template <int M, typename W>
inline void axpy_tile(const W* wt, int64_t ldw, int64_t F, const float* const* hs, float* const* ys) {
  v8f acc[M][2], w0, w1;
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t f = 0; f < F; ++f) {
    load16(wt + f * ldw, w0, w1);
    for (int m = 0; m < M; ++m) {
      const v8f b = splat(hs[m][f]);
      acc[m][0] = fma8(b, w0, acc[m][0]);
      acc[m][1] = fma8(b, w1, acc[m][1]);
    }
  }
  for (int m = 0; m < M; ++m) store16<W>(ys[m], acc[m][0], acc[m][1]);
}

// y_m[c0 .. c1) = h_m @ wt[:, c0 .. c1) for the M tokens (ys[m] points at column 0 of token m's output row).
template <typename W>
void tokens_times_columns(const W* wt, int64_t H, int64_t F, const float* const* hs, float* const* ys, int64_t M,
                          int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < M; m += 6) {
    const int64_t mm = std::min<int64_t>(6, M - m);
    float* yc[6];
    int64_t c = c0;
    for (; c + 16 <= c1; c += 16) {
      for (int64_t i = 0; i < mm; ++i) yc[i] = ys[m + i] + c;
      switch (mm) {
        case 6: axpy_tile<6>(wt + c, H, F, hs + m, yc); break;
        case 5: axpy_tile<5>(wt + c, H, F, hs + m, yc); break;
        case 4: axpy_tile<4>(wt + c, H, F, hs + m, yc); break;
        case 3: axpy_tile<3>(wt + c, H, F, hs + m, yc); break;
        case 2: axpy_tile<2>(wt + c, H, F, hs + m, yc); break;
        default: axpy_tile<1>(wt + c, H, F, hs + m, yc); break;
      }
    }
    for (; c < c1; ++c)  // columns past the last whole 16 (H % 16 != 0)
      for (int64_t i = 0; i < mm; ++i) {
        float s = 0.0f;
        for (int64_t f = 0; f < F; ++f) s += hs[m + i][f] * widen(wt[f * H + c]);
        ys[m + i][c] = s;
      }
  }
}

// y[c0 .. c1) = sum over the listed neurons f of h[f] * wt[f * H + c]: one token, only the rows of its active
// neurons (ReGLU's zeros are left out of the caller's list). 64 columns = 8 accumulators at a time.
template <typename W>
void active_rows_times_columns(const float* h, const int32_t* active, int64_t n_active, const W* wt, int64_t H,
                               int64_t c0, int64_t c1, float* y) {
  int64_t c = c0;
  v8f w0, w1;
  for (; c + 64 <= c1; c += 64) {
    v8f acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n_active; ++i) {
      const int64_t f = active[i];
      if (i + kPrefetchRows < n_active) prefetch_range(wt + active[i + kPrefetchRows] * H + c, 64 * sizeof(W));
      const v8f b = splat(h[f]);
      const W* row = wt + f * H + c;
      for (int j = 0; j < 4; ++j) {
        load16(row + 16 * j, w0, w1);
        acc[2 * j] = fma8(b, w0, acc[2 * j]);
        acc[2 * j + 1] = fma8(b, w1, acc[2 * j + 1]);
      }
    }
    for (int j = 0; j < 4; ++j) store16<W>(y + c + 16 * j, acc[2 * j], acc[2 * j + 1]);
  }
  for (; c + 16 <= c1; c += 16) {
    v8f a0 = {0, 0, 0, 0, 0, 0, 0, 0}, a1 = a0;
    for (int64_t i = 0; i < n_active; ++i) {
      load16(wt + active[i] * H + c, w0, w1);
      a0 = fma8(splat(h[active[i]]), w0, a0);
      a1 = fma8(splat(h[active[i]]), w1, a1);
    }
    store16<W>(y + c, a0, a1);
  }
  for (; c < c1; ++c) {
    float s = 0.0f;
    for (int64_t i = 0; i < n_active; ++i) s += h[active[i]] * widen(wt[active[i] * H + c]);
    y[c] = s;
  }
}

inline float activate(MoeActivation act, float g) {
  if (act == MoeActivation::kReglu) return g <= 0.0f ? 0.0f : g;  // NaN passes through, as torch.relu
  return g / (1.0f + std::exp(-g));                                // silu
}

// ------------------------------------------------------------------------------------------ routing + combine
struct Routing {
  std::vector<int64_t> expert;  // [A] routed experts, ascending
  std::vector<int64_t> begin;   // [A + 1]: the pairs of expert[a] are begin[a] .. begin[a + 1]
  std::vector<int64_t> token;   // [P] token of pair p
  std::vector<int64_t> pair;    // [T * k] pair of (t, j)
  int64_t tokens_of(int64_t a) const { return begin[a + 1] - begin[a]; }
  bool tiled(int64_t a) const { return tokens_of(a) >= kPanelTokens; }
  bool any_tiled() const {
    for (size_t a = 0; a < expert.size(); ++a)
      if (tiled(static_cast<int64_t>(a))) return true;
    return false;
  }
};

// slot: nullptr, or [E] with slot[e] < 0 for experts left out of this call (their pairs get pair = -1).
bool route(const int64_t* ids, int64_t T, int64_t k, int64_t E, const int64_t* slot, Routing& r) {
  std::vector<int64_t> count(E, 0), next(E, 0);
  for (int64_t i = 0; i < T * k; ++i)
    if (ids[i] < 0 || ids[i] >= E) return false;
  for (int64_t i = 0; i < T * k; ++i)
    if (!slot || slot[ids[i]] >= 0) ++count[ids[i]];
  int64_t P = 0;
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) {
      r.expert.push_back(e);
      r.begin.push_back(P);
      next[e] = P;
      P += count[e];
    }
  r.begin.push_back(P);
  r.token.resize(P);
  r.pair.resize(T * k);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (slot && slot[e] < 0) {
        r.pair[t * k + j] = -1;
        continue;
      }
      const int64_t p = next[e]++;
      r.token[p] = t;
      r.pair[t * k + j] = p;
    }
  return true;
}

// Where expert e's block of a tensor starts (see MoeFloatExperts): stacked (stride 0) or at block(e) * stride bytes.
template <typename T>
inline const T* expert_block(const void* base, int64_t e, const int64_t* slot, int64_t stride_bytes,
                             int64_t elements_per_expert) {
  const int64_t b = slot ? slot[e] : e;
  if (stride_bytes) return reinterpret_cast<const T*>(static_cast<const char*>(base) + b * stride_bytes);
  return static_cast<const T*>(base) + b * elements_per_expert;
}

// out[t] = sum over t's slots in ascending expert order (slot order on ties) of w[t, j] * y[pair(t, j)]; slots left
// out of the call (pair -1) are skipped; accumulate: the sum continues from out's values instead of zero.
void combine(const Routing& r, const int64_t* ids, const float* w, const float* y, int64_t T, int64_t k, int64_t H,
             bool accumulate, float* out) {
  parallel_dynamic(T, 4, [&](int64_t b, int64_t e) {
    std::vector<int64_t> order(k);
    for (int64_t t = b; t < e; ++t) {
      const int64_t* id = ids + t * k;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return id[i] < id[j]; });
      float* o = out + t * H;
      if (!accumulate) std::fill(o, o + H, 0.0f);
      for (const int64_t j : order) {
        if (r.pair[t * k + j] < 0) continue;
        const float wt = w[t * k + j];
        const float* yp = y + r.pair[t * k + j] * H;
        const v8f wv = splat(wt);
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) store8(o + i, load8(o + i) + wv * load8(yp + i));  // two roundings
        for (; i < H; ++i) o[i] = o[i] + wt * yp[i];
      }
    }
  });
}

// The expert's pairs' rows of a [P, n] buffer, as pointers (tiles take token rows by pointer).
std::vector<const float*> pair_rows(const float* base, int64_t n, int64_t first, int64_t count) {
  std::vector<const float*> rows(count);
  for (int64_t i = 0; i < count; ++i) rows[i] = base + (first + i) * n;
  return rows;
}

// Decode-like experts (fewer than kPanelTokens tokens) run in three passes: gate rows (h[p, f] = gate_f . x), the
// neuron list below, then the up rows of the listed neurons (up_pass). The list is also what float experts' down
// step reads: unlisted neurons have h = 0 exactly.

// The most active neurons (of F) at which a token's inactive ones are skipped; -1: never.
int64_t skip_limit(MoeActivation act, NeuronSparsity sparsity, int64_t F, int64_t auto_eighths) {
  if (act != MoeActivation::kReglu || sparsity == NeuronSparsity::kOff) return -1;
  return sparsity == NeuronSparsity::kAlways ? F : F * auto_eighths / 8;
}

// Per pair of a decode-like expert: the neurons whose up row is read, ascending. When at most skip_max of them have
// a positive gate: those (the others get h = 0 now: relu(gate) = 0, they contribute nothing); otherwise all.
void list_neurons(const Routing& r, float* h, int64_t F, int64_t skip_max, std::vector<int32_t>& list,
                  std::vector<int64_t>& count) {
  const int64_t P = r.begin.back();
  list.resize(P * F);
  count.assign(P, 0);
  parallel_dynamic(static_cast<int64_t>(r.expert.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t a = b; a < e; ++a) {
      if (r.tiled(a)) continue;
      for (int64_t p = r.begin[a]; p < r.begin[a + 1]; ++p) {
        int32_t* l = list.data() + p * F;
        float* hp = h + p * F;
        int64_t n = 0;
        for (int64_t f = 0; f < F; ++f) {
          l[n] = static_cast<int32_t>(f);
          n += !(hp[f] <= 0.0f);  // branch-free compaction; NaN gates stay (relu(NaN) = NaN)
        }
        if (n <= skip_max) {
          for (int64_t f = 0; f < F; ++f) hp[f] = hp[f] <= 0.0f ? 0.0f : hp[f];
        } else {
          std::iota(l, l + F, 0);
          n = F;
        }
        count[p] = n;
      }
    }
  });
}

// h[p, f] = act(h[p, f]) * up_dot(a, p, f) over the listed neurons of every decode-like pair; work items = (expert,
// kUpChunk list positions). Rows are prefetched kPrefetchRows ahead in list order, since skipped rows break the
// hardware prefetcher's stream: without it (GCC had dropped these prefetches, kernels/prefetch.h) any4's skip path
// ran 1.3x slower than reading every row at 50 % active neurons; with it, never slower (see kAuto in moe_ffn.h).
template <typename UpDot, typename PrefetchRow>
void up_pass(const Routing& r, float* h, int64_t F, MoeActivation act, const std::vector<int32_t>& list,
             const std::vector<int64_t>& count, const UpDot& up_dot, const PrefetchRow& prefetch_row) {
  const int64_t chunks = (F + kUpChunk - 1) / kUpChunk;
  parallel_dynamic(static_cast<int64_t>(r.expert.size()) * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t a = item / chunks, i0 = (item % chunks) * kUpChunk;
      if (r.tiled(a)) continue;
      for (int64_t p = r.begin[a]; p < r.begin[a + 1]; ++p) {
        const int32_t* l = list.data() + p * F;
        const int64_t n = count[p], i1 = std::min(n, i0 + kUpChunk);
        for (int64_t i = i0; i < std::min(n, i0 + kPrefetchRows); ++i) prefetch_row(a, l[i]);
        for (int64_t i = i0; i < i1; ++i) {
          if (i + kPrefetchRows < n) prefetch_row(a, l[i + kPrefetchRows]);
          h[p * F + l[i]] = activate(act, h[p * F + l[i]]) * up_dot(a, p, l[i]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ float experts
template <typename W>
void run_float(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
               const MoeFloatExperts& ex, MoeActivation act, NeuronSparsity sparsity, const Routing& r, float* out) {
  const int64_t F = ex.ffn, A = static_cast<int64_t>(r.expert.size()), P = r.begin.back();
  const W* gate = static_cast<const W*>(ex.gate);
  const W* up = static_cast<const W*>(ex.up);
  const W* down_t = static_cast<const W*>(ex.down_t);
  std::vector<float> h(P * F), y(P * H);

  // gate/up, on the tokens in weight order (xw)
  std::vector<float> x_ordered;
  const float* xw = x;
  if constexpr (std::is_same_v<W, uint16_t>) {
    x_ordered.resize(T * H);
    for (int64_t t = 0; t < T; ++t) weight_order<W>(x + t * H, H, x_ordered.data() + t * H);
    xw = x_ordered.data();
  }
  const int64_t nb = (F + kNeuronBlock - 1) / kNeuronBlock;
  parallel_dynamic(A * nb, 1, [&](int64_t b, int64_t e) {
    std::vector<float> g, u;
    for (int64_t item = b; item < e; ++item) {
      const int64_t a = item / nb, f0 = (item % nb) * kNeuronBlock, f1 = std::min(F, f0 + kNeuronBlock);
      const W* ge = expert_block<W>(gate, r.expert[a], ex.slot, ex.expert_stride, F * H);
      const W* ue = expert_block<W>(up, r.expert[a], ex.slot, ex.expert_stride, F * H);
      const int64_t first = r.begin[a], n = r.tokens_of(a);
      if (!r.tiled(a)) {
        for (int64_t p = first; p < first + n; ++p) {
          const float* xt = xw + r.token[p] * H;
          float* hp = h.data() + p * F;
          for (int64_t f = f0; f < f1; ++f) hp[f] = dot_w(ge + f * H, xt, H);
        }
        continue;
      }
      std::vector<const float*> xs(n);
      for (int64_t i = 0; i < n; ++i) xs[i] = xw + r.token[first + i] * H;
      g.resize(n * kNeuronBlock);
      u.resize(n * kNeuronBlock);
      rows_times_tokens(ge + f0 * H, f1 - f0, H, xs.data(), n, g.data(), kNeuronBlock);
      rows_times_tokens(ue + f0 * H, f1 - f0, H, xs.data(), n, u.data(), kNeuronBlock);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = f0; f < f1; ++f)
          h[(first + i) * F + f] = activate(act, g[i * kNeuronBlock + f - f0]) * u[i * kNeuronBlock + f - f0];
    }
  });

  std::vector<int32_t> list;
  std::vector<int64_t> count;
  const int64_t eighths = std::is_same_v<W, float> ? kAutoSkipEighthsFp32 : kAutoSkipEighthsBf16;
  list_neurons(r, h.data(), F, skip_limit(act, sparsity, F, eighths), list, count);
  const int64_t row_bytes = std::min<int64_t>(1024, H * sizeof(W));  // the hardware prefetcher does the rest
  auto up_of = [&](int64_t a) { return expert_block<W>(up, r.expert[a], ex.slot, ex.expert_stride, F * H); };
  up_pass(
      r, h.data(), F, act, list, count,
      [&](int64_t a, int64_t p, int64_t f) { return dot_w(up_of(a) + f * H, xw + r.token[p] * H, H); },
      [&](int64_t a, int64_t f) { prefetch_range(up_of(a) + f * H, row_bytes); });

  // down: decode-like experts read the rows of their listed neurons only
  const int64_t nc = (H + kColumnBlock - 1) / kColumnBlock;
  parallel_dynamic(A * nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t item = b; item < e; ++item) {
      const int64_t a = item / nc, c0 = (item % nc) * kColumnBlock, c1 = std::min(H, c0 + kColumnBlock);
      const W* de = expert_block<W>(down_t, r.expert[a], ex.slot, ex.expert_stride, F * H);
      const int64_t first = r.begin[a], n = r.tokens_of(a);
      if (!r.tiled(a)) {
        for (int64_t p = first; p < first + n; ++p) {
          active_rows_times_columns(h.data() + p * F, list.data() + p * F, count[p], de, H, c0, c1,
                                    y.data() + p * H);
        }
        continue;
      }
      const auto hs = pair_rows(h.data(), F, first, n);
      std::vector<float*> ys(n);
      for (int64_t i = 0; i < n; ++i) ys[i] = y.data() + (first + i) * H;
      tokens_times_columns(de, H, F, hs.data(), ys.data(), n, c0, c1);
    }
  });
  combine(r, ids, weights, y.data(), T, k, H, ex.accumulate, out);
}

// ------------------------------------------------------------------------------------------ any4 experts
inline float lut_value(any4::Lut kind, uint16_t bits) {
  return kind == any4::Lut::kBf16 ? any4::bf16_to_float(bits) : any4::half_to_float(bits);
}

// One any4 projection of one expert: rows [N, K] quantised along K in groups of g.
template <any4::Lut kind, typename SZ>
struct Any4Rows {
  const uint8_t* q;
  const uint16_t* lut;
  const SZ* s;
  const SZ* z;
  int64_t K, G, g;
  bool simd;  // any4_decode.h's row dot handles this K and g

  Any4Rows(const Any4Stack& st, const MoeAny4Experts& ex, int64_t expert, int64_t N, int64_t K_)
      : q(expert_block<uint8_t>(st.qweight, expert, ex.slot, ex.expert_stride, N * (K_ / 2))),
        lut(expert_block<uint16_t>(st.lut, expert, ex.slot, ex.expert_stride, N * 16)),
        s(expert_block<SZ>(st.scales, expert, ex.slot, ex.expert_stride, N * st.groups)),
        z(expert_block<SZ>(st.zeros, expert, ex.slot, ex.expert_stride, N * st.groups)),
        K(K_),
        G(st.groups),
        g(K_ / st.groups),
        simd(any4::decode_supported(K_, K_ / st.groups)) {}

  // Row i dequantised exactly: w[j] = lut[code] * s + z (two roundings), j < K.
  void dequant(int64_t i, float* w) const {
    float lf[16], t[16];
    for (int c = 0; c < 16; ++c) lf[c] = lut_value(kind, lut[i * 16 + c]);
    const uint8_t* qr = q + i * (K / 2);
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      const float sv = any4::to_f32(s[i * G + gi]), zv = any4::to_f32(z[i * G + gi]);
      for (int c = 0; c < 16; ++c) {
        const float m = lf[c] * sv;
        t[c] = m + zv;
      }
      for (int64_t j = j0; j < j0 + g; j += 2) {
        w[j] = t[qr[j / 2] & 15];
        w[j + 1] = t[qr[j / 2] >> 4];
      }
    }
  }

  void prefetch(int64_t i) const {
    prefetch_range(q + i * (K / 2), K / 2);
    prefetch_line(lut + i * 16);
    prefetch_line(s + i * G);
    prefetch_line(z + i * G);
  }

  // Row i . x. xp, xsum: any4_decode.h's permuted x and per-group sums (used when simd); x otherwise.
  float dot(int64_t i, const float* x, const float* xp, const float* xsum) const {
    if (simd) return any4::row_dot<kind>(q + i * (K / 2), lut + i * 16, s + i * G, z + i * G, xp, xsum, K, g);
    float lf[16], t[16], y = 0.0f;
    for (int c = 0; c < 16; ++c) lf[c] = lut_value(kind, lut[i * 16 + c]);
    const uint8_t* qr = q + i * (K / 2);
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      const float sv = any4::to_f32(s[i * G + gi]), zv = any4::to_f32(z[i * G + gi]);
      for (int c = 0; c < 16; ++c) {
        const float m = lf[c] * sv;
        t[c] = m + zv;
      }
      float d = 0.0f;
      for (int64_t j = j0; j < j0 + g; j += 2) d += x[j] * t[qr[j / 2] & 15] + x[j + 1] * t[qr[j / 2] >> 4];
      y += d;
    }
    return y;
  }
};

// Per row of v [n, K]: the any4 decode inputs (permuted row, per-group sums for groups of g).
void decode_inputs(const float* v, int64_t K, int64_t g, any4::Lut kind, float* vp, float* vsum) {
  any4::permute_x(v, K, vp, kind);
  for (int64_t gi = 0; gi < K / g; ++gi) {
    float s = 0.0f;
    for (int64_t j = gi * g; j < (gi + 1) * g; ++j) s += v[j];
    vsum[gi] = s;
  }
}

template <any4::Lut kind, typename SZ>
void run_any4(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
              const MoeAny4Experts& ex, MoeActivation act, NeuronSparsity sparsity, const Routing& r, float* out) {
  using Rows = Any4Rows<kind, SZ>;
  const int64_t F = ex.ffn, A = static_cast<int64_t>(r.expert.size()), P = r.begin.back();
  const int64_t Gg = ex.gate.groups, Gu = ex.up.groups, Gd = ex.down.groups;
  std::vector<float> h(P * F), y(P * H);

  // decode inputs of every token (permutation + group sums for gate's and up's group sizes), where the SIMD row
  // dot takes them
  const bool gate_simd = any4::decode_supported(H, H / Gg), up_simd = any4::decode_supported(H, H / Gu);
  std::vector<float> xp(T * H), xsum_g(T * Gg), xsum_u(T * Gu);
  parallel_dynamic(gate_simd || up_simd ? T : 0, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (gate_simd) decode_inputs(x + t * H, H, H / Gg, kind, xp.data() + t * H, xsum_g.data() + t * Gg);
      if (up_simd) decode_inputs(x + t * H, H, H / Gu, kind, xp.data() + t * H, xsum_u.data() + t * Gu);
    }
  });

  // A call with no panel expert (decode) hands out runs of up to 128 rows: 16-row items alternating between threads
  // read 6-12 KB pieces, too short to stream (see common.h, decode_rows_per_block).
  const int64_t rows = r.any_tiled() ? kNeuronBlock : kDecodeRowBlock;
  const int64_t nb = (F + rows - 1) / rows;
  parallel_dynamic(A * nb, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wbuf, g, u;
    for (int64_t item = b; item < e; ++item) {
      const int64_t a = item / nb, f0 = (item % nb) * rows, f1 = std::min(F, f0 + rows);
      const Rows gr(ex.gate, ex, r.expert[a], F, H), ur(ex.up, ex, r.expert[a], F, H);
      const int64_t first = r.begin[a], n = r.tokens_of(a);
      if (!r.tiled(a)) {
        for (int64_t p = first; p < first + n; ++p) {
          const int64_t t = r.token[p];
          const float *xt = x + t * H, *xpt = xp.data() + t * H;
          float* hp = h.data() + p * F;
          for (int64_t f = f0; f < f1; ++f) hp[f] = gr.dot(f, xt, xpt, xsum_g.data() + t * Gg);
        }
        continue;
      }
      std::vector<const float*> xs(n);
      for (int64_t i = 0; i < n; ++i) xs[i] = x + r.token[first + i] * H;
      wbuf.resize(kNeuronBlock * H);
      g.resize(n * kNeuronBlock);
      u.resize(n * kNeuronBlock);
      for (int64_t f = f0; f < f1; ++f) gr.dequant(f, wbuf.data() + (f - f0) * H);
      rows_times_tokens(wbuf.data(), f1 - f0, H, xs.data(), n, g.data(), kNeuronBlock);
      for (int64_t f = f0; f < f1; ++f) ur.dequant(f, wbuf.data() + (f - f0) * H);
      rows_times_tokens(wbuf.data(), f1 - f0, H, xs.data(), n, u.data(), kNeuronBlock);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = f0; f < f1; ++f)
          h[(first + i) * F + f] = activate(act, g[i * kNeuronBlock + f - f0]) * u[i * kNeuronBlock + f - f0];
    }
  });

  // up rows are quantised along H: a skipped neuron's up row is skipped whole
  std::vector<int32_t> list;
  std::vector<int64_t> count;
  list_neurons(r, h.data(), F, skip_limit(act, sparsity, F, kAutoSkipEighthsAny4), list, count);
  up_pass(
      r, h.data(), F, act, list, count,
      [&](int64_t a, int64_t p, int64_t f) {
        const int64_t t = r.token[p];
        return Rows(ex.up, ex, r.expert[a], F, H).dot(f, x + t * H, xp.data() + t * H, xsum_u.data() + t * Gu);
      },
      [&](int64_t a, int64_t f) { Rows(ex.up, ex, r.expert[a], F, H).prefetch(f); });

  // down [H, F]: decode inputs of each decode-like pair's h, then rows (all neurons: each row holds every neuron's
  // weight in its groups)
  std::vector<float> hp(P * F), hsum(P * Gd);
  parallel_dynamic(any4::decode_supported(F, F / Gd) ? A : 0, 1, [&](int64_t b, int64_t e) {
    for (int64_t a = b; a < e; ++a)
      if (!r.tiled(a))
        for (int64_t p = r.begin[a]; p < r.begin[a + 1]; ++p)
          decode_inputs(h.data() + p * F, F, F / Gd, kind, hp.data() + p * F, hsum.data() + p * Gd);
  });
  const int64_t nr = (H + rows - 1) / rows;
  parallel_dynamic(A * nr, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wbuf;
    for (int64_t item = b; item < e; ++item) {
      const int64_t a = item / nr, r0 = (item % nr) * rows, r1 = std::min(H, r0 + rows);
      const Rows dr(ex.down, ex, r.expert[a], H, F);
      const int64_t first = r.begin[a], n = r.tokens_of(a);
      if (!r.tiled(a)) {
        for (int64_t p = first; p < first + n; ++p)
          for (int64_t i = r0; i < r1; ++i)
            y[p * H + i] = dr.dot(i, h.data() + p * F, hp.data() + p * F, hsum.data() + p * Gd);
        continue;
      }
      wbuf.resize(kNeuronBlock * F);
      for (int64_t i = r0; i < r1; ++i) dr.dequant(i, wbuf.data() + (i - r0) * F);
      const auto hs = pair_rows(h.data(), F, first, n);
      rows_times_tokens(wbuf.data(), r1 - r0, F, hs.data(), n, y.data() + first * H + r0, H);
    }
  });
  combine(r, ids, weights, y.data(), T, k, H, ex.accumulate, out);
}

}  // namespace

bool moe_ffn_float(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                   const MoeFloatExperts& experts, MoeActivation act, NeuronSparsity sparsity, float* out) {
  Routing r;
  if (!route(ids, T, k, experts.num_experts, experts.slot, r)) return false;
  if (experts.bf16) run_float<uint16_t>(x, ids, weights, T, k, H, experts, act, sparsity, r, out);
  else run_float<float>(x, ids, weights, T, k, H, experts, act, sparsity, r, out);
  return true;
}

bool moe_ffn_any4(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                  const MoeAny4Experts& experts, MoeActivation act, NeuronSparsity sparsity, float* out) {
  Routing r;
  if (!route(ids, T, k, experts.num_experts, experts.slot, r)) return false;
  constexpr auto kBf16 = any4::Lut::kBf16, kFp16 = any4::Lut::kFp16;
  const auto& e = experts;
  if (e.lut_bf16 && e.scales_fp16) run_any4<kBf16, uint16_t>(x, ids, weights, T, k, H, e, act, sparsity, r, out);
  else if (e.lut_bf16) run_any4<kBf16, float>(x, ids, weights, T, k, H, e, act, sparsity, r, out);
  else if (e.scales_fp16) run_any4<kFp16, uint16_t>(x, ids, weights, T, k, H, e, act, sparsity, r, out);
  else run_any4<kFp16, float>(x, ids, weights, T, k, H, e, act, sparsity, r, out);
  return true;
}

// ------------------------------------------------------------------------------------------ ExecuTorch kernels
namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

bool parse_activation(std::string_view name, MoeActivation* act) {
  if (name == "reglu") *act = MoeActivation::kReglu;
  else if (name == "swiglu") *act = MoeActivation::kSwiglu;
  else return false;
  return true;
}

// x [T, H] fp32, expert_ids int64 [T, k], expert_weights fp32 [T, k]; out resized to [T, H].
bool check_routing(KernelRuntimeContext& ctx, const char* op, const Tensor& x, const Tensor& ids, const Tensor& w,
                   Tensor& out) {
  const bool ok = x.dim() == 2 && x.scalar_type() == ScalarType::Float && ids.dim() == 2 &&
                  ids.scalar_type() == ScalarType::Long && ids.size(0) == x.size(0) && ids.size(1) >= 1 &&
                  w.dim() == 2 && w.scalar_type() == ScalarType::Float && w.size(0) == ids.size(0) &&
                  w.size(1) == ids.size(1) && out.scalar_type() == ScalarType::Float;
  if (!ok) {
    ET_LOG(Error, "%s: expected x fp32 [T, H], expert_ids int64 [T, k], expert_weights fp32 [T, k], fp32 out", op);
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  const SizesType sizes[2] = {static_cast<SizesType>(x.size(0)), static_cast<SizesType>(x.size(1))};
  if (executorch::runtime::resize_tensor(out, {sizes, 2}) != Error::Ok) {
    ET_LOG(Error, "%s: could not resize out to [T, H]", op);
    ctx.fail(Error::InvalidArgument);
    return false;
  }
  return true;
}

bool fail(KernelRuntimeContext& ctx, const char* message) {
  ET_LOG(Error, "%s", message);
  ctx.fail(Error::InvalidArgument);
  return false;
}

Tensor& moe_ffn_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& expert_ids,
                    const Tensor& expert_weights, const Tensor& gate, const Tensor& up, const Tensor& down_t,
                    std::string_view activation, Tensor& out) {
  MoeActivation act;
  if (!parse_activation(activation, &act)) {
    fail(ctx, "moe_ffn: activation must be reglu or swiglu");
    return out;
  }
  if (!check_routing(ctx, "moe_ffn", x, expert_ids, expert_weights, out)) return out;
  const ScalarType wt = gate.scalar_type();
  const bool ok = gate.dim() == 3 && gate.size(2) == x.size(1) && up.sizes() == gate.sizes() &&
                  down_t.sizes() == gate.sizes() && (wt == ScalarType::Float || wt == ScalarType::BFloat16) &&
                  up.scalar_type() == wt && down_t.scalar_type() == wt;
  if (!ok) {
    fail(ctx, "moe_ffn: gate, up, down_t must be [E, F, H], all fp32 or all bf16");
    return out;
  }
  const MoeFloatExperts ex{gate.const_data_ptr(), up.const_data_ptr(), down_t.const_data_ptr(),
                           wt == ScalarType::BFloat16, gate.size(0), gate.size(1)};
  if (!moe_ffn_float(x.const_data_ptr<float>(), expert_ids.const_data_ptr<int64_t>(),
                     expert_weights.const_data_ptr<float>(), x.size(0), expert_ids.size(1), x.size(1), ex, act,
                     NeuronSparsity::kAuto, out.mutable_data_ptr<float>()))
    fail(ctx, "moe_ffn: expert_ids must lie in [0, E)");
  return out;
}

// One stacked any4 projection [E, N, K/2] / [E, N, 16] / [E, N, G] x 2.
bool check_any4_stack(const Tensor& q, const Tensor& lut, const Tensor& s, const Tensor& z, int64_t E, int64_t N,
                      int64_t K, ScalarType lut_t, ScalarType sz_t) {
  return K % 2 == 0 && q.dim() == 3 && q.scalar_type() == ScalarType::Byte && q.size(0) == E && q.size(1) == N &&
         q.size(2) == K / 2 && lut.dim() == 3 && lut.size(0) == E && lut.size(1) == N && lut.size(2) == 16 &&
         lut.scalar_type() == lut_t && s.dim() == 3 && s.size(0) == E && s.size(1) == N && s.size(2) >= 1 &&
         K % s.size(2) == 0 && (K / s.size(2)) % 2 == 0 && s.scalar_type() == sz_t && z.sizes() == s.sizes() &&
         z.scalar_type() == sz_t;
}

Tensor& moe_ffn_any4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& expert_ids,
                         const Tensor& expert_weights, const Tensor& gate_qweight, const Tensor& gate_lut,
                         const Tensor& gate_scales, const Tensor& gate_zeros, const Tensor& up_qweight,
                         const Tensor& up_lut, const Tensor& up_scales, const Tensor& up_zeros,
                         const Tensor& down_qweight, const Tensor& down_lut, const Tensor& down_scales,
                         const Tensor& down_zeros, std::string_view activation, Tensor& out) {
  MoeActivation act;
  if (!parse_activation(activation, &act)) {
    fail(ctx, "moe_ffn_any4: activation must be reglu or swiglu");
    return out;
  }
  if (!check_routing(ctx, "moe_ffn_any4", x, expert_ids, expert_weights, out)) return out;
  if (gate_qweight.dim() != 3) {
    fail(ctx, "moe_ffn_any4: gate_qweight must be uint8 [E, F, H/2]");
    return out;
  }
  const int64_t E = gate_qweight.size(0), F = gate_qweight.size(1), H = x.size(1);
  const ScalarType lut_t = gate_lut.scalar_type(), sz_t = gate_scales.scalar_type();
  if (!(lut_t == ScalarType::BFloat16 || lut_t == ScalarType::Half) ||
      !(sz_t == ScalarType::Half || sz_t == ScalarType::Float)) {
    fail(ctx, "moe_ffn_any4: LUTs must be bf16 or fp16, scales and zeros fp16 or fp32");
    return out;
  }
  if (!check_any4_stack(gate_qweight, gate_lut, gate_scales, gate_zeros, E, F, H, lut_t, sz_t) ||
      !check_any4_stack(up_qweight, up_lut, up_scales, up_zeros, E, F, H, lut_t, sz_t) ||
      !check_any4_stack(down_qweight, down_lut, down_scales, down_zeros, E, H, F, lut_t, sz_t)) {
    fail(ctx, "moe_ffn_any4: expected gate/up [E, F, H/2] codes, [E, F, 16] LUT, [E, F, G] scales/zeros and down "
              "[E, H, F/2], [E, H, 16], [E, H, G']; one LUT dtype and one scales dtype for all three");
    return out;
  }
  auto stack = [](const Tensor& q, const Tensor& lut, const Tensor& s, const Tensor& z) {
    return Any4Stack{q.const_data_ptr<uint8_t>(), static_cast<const uint16_t*>(lut.const_data_ptr()),
                     s.const_data_ptr(), z.const_data_ptr(), s.size(2)};
  };
  const MoeAny4Experts ex{stack(gate_qweight, gate_lut, gate_scales, gate_zeros),
                          stack(up_qweight, up_lut, up_scales, up_zeros),
                          stack(down_qweight, down_lut, down_scales, down_zeros),
                          lut_t == ScalarType::BFloat16, sz_t == ScalarType::Half, E, F};
  if (!moe_ffn_any4(x.const_data_ptr<float>(), expert_ids.const_data_ptr<int64_t>(),
                    expert_weights.const_data_ptr<float>(), x.size(0), expert_ids.size(1), H, ex, act,
                    NeuronSparsity::kAuto, out.mutable_data_ptr<float>()))
    fail(ctx, "moe_ffn_any4: expert_ids must lie in [0, E)");
  return out;
}

}  // namespace
}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "moe_ffn.out", pocketllm::moe_ffn_out);
EXECUTORCH_LIBRARY(pocketllm, "moe_ffn_any4.out", pocketllm::moe_ffn_any4_out);

// C entry points (tests/ops/test_moe_ffn.py, benchmarks/moe_ffn_speed.py through ctypes). activation: 0 reglu,
// 1 swiglu; sparsity: 0 off, 1 auto, 2 always (NeuronSparsity). Return 1, or 0 when an expert id is out of range
// (out untouched).
extern "C" int pocketllm_moe_ffn(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k,
                                 int64_t H, const void* gate, const void* up, const void* down_t, int64_t bf16,
                                 int64_t E, int64_t F, int64_t activation, int64_t sparsity, float* out) {
  const pocketllm::MoeFloatExperts ex{gate, up, down_t, bf16 != 0, E, F};
  return pocketllm::moe_ffn_float(x, ids, weights, T, k, H, ex, static_cast<pocketllm::MoeActivation>(activation),
                                  static_cast<pocketllm::NeuronSparsity>(sparsity), out);
}

// Each projection: qweight, lut (bf16 bits if lut_bf16 else fp16 bits), scales, zeros (fp16 bits if scales_fp16
// else fp32), groups per row.
extern "C" int pocketllm_moe_ffn_any4(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k,
                                      int64_t H, const uint8_t* gate_q, const uint16_t* gate_lut,
                                      const void* gate_scales, const void* gate_zeros, int64_t gate_groups,
                                      const uint8_t* up_q, const uint16_t* up_lut, const void* up_scales,
                                      const void* up_zeros, int64_t up_groups, const uint8_t* down_q,
                                      const uint16_t* down_lut, const void* down_scales, const void* down_zeros,
                                      int64_t down_groups, int64_t lut_bf16, int64_t scales_fp16, int64_t E,
                                      int64_t F, int64_t activation, int64_t sparsity, float* out) {
  const pocketllm::MoeAny4Experts ex{{gate_q, gate_lut, gate_scales, gate_zeros, gate_groups},
                                     {up_q, up_lut, up_scales, up_zeros, up_groups},
                                     {down_q, down_lut, down_scales, down_zeros, down_groups},
                                     lut_bf16 != 0,
                                     scales_fp16 != 0,
                                     E,
                                     F};
  return pocketllm::moe_ffn_any4(x, ids, weights, T, k, H, ex, static_cast<pocketllm::MoeActivation>(activation),
                                 static_cast<pocketllm::NeuronSparsity>(sparsity), out);
}
