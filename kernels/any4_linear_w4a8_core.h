// pocketllm::any4_linear_w4a8 math, with no ExecuTorch dependency so it can be tested on its own
// (kernels/tests/any4_w4a8_test.cpp, also under qemu-aarch64 for the NEON paths). The numerics are defined in
// export/ops/any4_linear_w4a8.py and docs/quantization.md ("W4A8"); every path here computes them bit for bit:
//
//   xq = clamp(rint(x / sx), -127, 127), sx = max|x| / 127             per token (row of x)
//   A[t, i, g] = sum_{j in g} xq[t, j] * lut_i8[i, code[i, j]]          int32, exact
//   B[t, g] = sum_{j in g} xq[t, j]
//   acc = 0; for g: acc = acc + (float(A) * (ls_i * s[i, g]) + float(B) * z[i, g]);  y = acc * sx
//
// Integer dot products:
//   x86 AVX-512 (VNNI + VBMI): vpermb looks up 64 codes at once (the LUT repeated in all four 128-bit lanes, so the
//             high nibble needs a shift but no mask), vpdpbusd(acc, lut_i8 + 128 as u8, xq as s8), A = acc - 128 B;
//   x86 AVX-VNNI: the same with vpshufb (32 codes per lookup);
//   x86 AVX2: llama.cpp-style sign trick, vpmaddubsw(|xq|, sign(w, xq)) + vpmaddwd(1) (pairs of products stay
//             within int16: 2 * 127 * 127 = 32258);
//   arm64 dotprod: tbl + sdot (vdotq_s32); arm64 without it: smull + smlal2 into int16 pairs, sadalp into int32;
//   portable: scalar int32.
// The low and high nibbles of a code byte are an even and an odd column, so each token's xq is stored once per call
// in "block order": within each block of 128 (AVX-512), 64 or 32 columns, the even columns, then the odd ones.
//
// Rows go in tiles of kRows (8 with AVX-512, else 4) consecutive rows: per group, the tile's integer sums are reduced
// together into one vector with the rows in lanes (A[g][0..kRows)), and the float part runs on that vector in the
// definition's order (groups one after the other), so every ISA produces the same bits. The fp16 scales and zeros
// arrive in blocks of 8 rows ([ceil(N/8)][G][8]) so that one load gives a tile's values for a group. Prefill
// (several tokens) first expands a tile's codes into int8 weights (a panel) once, then runs 2 tokens x kRows rows
// of dot products per step over it.
//
// Build with -ffp-contract=off (the float part must not fuse multiply-adds).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "any4_decode.h"  // any4::half_to_float
#include "prefetch.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define POCKETLLM_W4A8_X86 1
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define POCKETLLM_W4A8_VNNI 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__)
#define POCKETLLM_W4A8_AVX512 1  // 128 codes per step in zmm registers; 32 vector registers for 8-row tiles
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define POCKETLLM_W4A8_NEON 1
#if defined(__ARM_FEATURE_DOTPROD)
#define POCKETLLM_W4A8_DOTPROD 1
#endif
#endif

// GCC 12 warns about its own AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pocketllm::w4a8 {

#if defined(POCKETLLM_W4A8_AVX512)
constexpr int kRows = 8;  // output rows per tile (the float part runs them as vector lanes)
#else
constexpr int kRows = 4;
#endif

inline const char* isa_name() {
#if defined(POCKETLLM_W4A8_AVX512)
  return "avx512-vnni";
#elif defined(POCKETLLM_W4A8_VNNI)
  return "avx2-vnni";
#elif defined(POCKETLLM_W4A8_X86)
  return "avx2";
#elif defined(POCKETLLM_W4A8_DOTPROD)
  return "neon-dotprod";
#elif defined(POCKETLLM_W4A8_NEON)
  return "neon";
#else
  return "portable";
#endif
}

// Columns per block of the block order: 128 (AVX-512), 64 or 32 (the codes one SIMD step reads); 2 (natural order,
// the scalar loop) when the group size is not a multiple of 32.
inline int64_t block_cols(int64_t g) {
#if defined(POCKETLLM_W4A8_AVX512)
  if (g % 128 == 0) return 128;
#endif
  return g % 64 == 0 ? 64 : g % 32 == 0 ? 32 : 2;
}
inline bool simd_supported(int64_t g) { return g % 32 == 0; }

// Position in block order of natural column j.
inline int64_t block_position(int64_t j, int64_t block) {
  const int64_t b0 = j - j % block, k = j - b0;
  return b0 + (k % 2) * (block / 2) + k / 2;
}

// ------------------------------------------------------------------------------------------------ activations
// One token: x [K] -> xq [K] (block order), bsum [G] = B[t, :], returns sx; *finite = 0 when x holds NaN or inf
// (then xq = 0, sx = 0 and the caller writes NaN outputs). xq_natural: scratch [K] (natural order).
inline float quantize_token(const float* x, int64_t K, int64_t g, int8_t* xq, int32_t* bsum, uint8_t* finite,
                            int8_t* xq_natural) {
  float amax = 0.0f;
  bool ok = true;
  int64_t j = 0;
#if defined(POCKETLLM_W4A8_X86)
  {
    const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(FLT_MAX);
    __m256 m = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (; j + 8 <= K; j += 8) {
      const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j));
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, big, _CMP_NLE_UQ));  // > FLT_MAX or NaN
      m = _mm256_max_ps(m, a);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float v : lanes) amax = v > amax ? v : amax;
    ok = _mm256_movemask_ps(bad) == 0;
  }
#elif defined(POCKETLLM_W4A8_NEON)
  {
    const float32x4_t big = vdupq_n_f32(FLT_MAX);
    float32x4_t m = vdupq_n_f32(0.0f);
    uint32x4_t good = vdupq_n_u32(0xffffffffu);
    for (; j + 4 <= K; j += 4) {
      const float32x4_t a = vabsq_f32(vld1q_f32(x + j));
      good = vandq_u32(good, vcleq_f32(a, big));  // false for inf and NaN
      m = vmaxq_f32(m, a);
    }
    amax = vmaxvq_f32(m);
    ok = vminvq_u32(good) != 0;
  }
#endif
  for (; j < K; ++j) {
    const float a = std::fabs(x[j]);
    ok = ok && a <= FLT_MAX;
    amax = a > amax ? a : amax;
  }
  const int64_t G = K / g;
  *finite = ok ? 1 : 0;
  const float sx = ok ? amax / 127.0f : 0.0f;
  if (sx == 0.0f) {
    std::memset(xq, 0, K);
    std::fill(bsum, bsum + G, 0);
    return 0.0f;
  }
  j = 0;
#if defined(POCKETLLM_W4A8_X86)
  {
    const __m256 s = _mm256_set1_ps(sx), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; j + 32 <= K; j += 32) {
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {  // division, clamp, then round half to even (MXCSR default)
        const __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + j + 8 * i), s), lo), hi);
        v[i] = _mm256_cvtps_epi32(q);
      }
      // packs work per 128-bit lane: [0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31], undone by one dword permute
      const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq_natural + j), _mm256_permutevar8x32_epi32(p, order));
    }
  }
#elif defined(POCKETLLM_W4A8_NEON)
  {
    const float32x4_t s = vdupq_n_f32(sx), lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
    for (; j + 8 <= K; j += 8) {
      const float32x4_t q0 = vminq_f32(vmaxq_f32(vdivq_f32(vld1q_f32(x + j), s), lo), hi);
      const float32x4_t q1 = vminq_f32(vmaxq_f32(vdivq_f32(vld1q_f32(x + j + 4), s), lo), hi);
      const int16x8_t h = vcombine_s16(vqmovn_s32(vcvtnq_s32_f32(q0)), vqmovn_s32(vcvtnq_s32_f32(q1)));
      vst1_s8(xq_natural + j, vqmovn_s16(h));  // vcvtnq: round half to even
    }
  }
#endif
  for (; j < K; ++j) {
    const float q = std::min(std::max(x[j] / sx, -127.0f), 127.0f);
    xq_natural[j] = static_cast<int8_t>(std::nearbyint(q));  // default rounding mode: half to even
  }
  for (int64_t gi = 0; gi < G; ++gi) {
    int32_t s = 0;
    for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += xq_natural[k];
    bsum[gi] = s;
  }
  const int64_t block = block_cols(g), half = block / 2;
  for (int64_t b0 = 0; b0 < K; b0 += block)
    for (int64_t k = 0; k < half; ++k) {
      xq[b0 + k] = xq_natural[b0 + 2 * k];
      xq[b0 + half + k] = xq_natural[b0 + 2 * k + 1];
    }
  return sx;
}

// ------------------------------------------------------------------------------------------------ tiles
// kRows consecutive output rows. scales and zeros come in blocks of 8 rows, [ceil(N / 8)][G][8] (w4a8_pack lays them
// out so): the float part of a tile reads its rows' values for one group as one vector.
constexpr int kRowBlock = 8;
static_assert(kRowBlock % kRows == 0, "a tile lies inside one block of scales");

struct Tile {
  const uint8_t* q;       // row r's K/2 code bytes at q + r * stride
  int64_t stride;
  const int8_t* lut;      // row r's 16 int8 entries at lut + 16 r
  const float* ls;        // [kRows] LUT scales
  const uint16_t* s16;    // s[g][r] = s16[g * 8 + r], fp16 bits (the tile's rows inside their 8-row block)
  const uint16_t* z16;
};

// ------------------------------------------------------------------------------------------------ float part
// y[r] = sx * (sum over groups, in order, of float(A[g][r]) * (ls[r] * s[g][r]) + float(B[g]) * z[g][r]), r < kRows.
// Bf[g] = float(B[t, g]) (exact).
inline void tile_epilogue(const int32_t* A, const float* Bf, const Tile& t, int64_t G, float sx, bool finite,
                          float* y) {
  const uint16_t *s16 = t.s16, *z16 = t.z16;
#if defined(POCKETLLM_W4A8_X86) && defined(POCKETLLM_W4A8_AVX512)
  const __m256 lsv = _mm256_loadu_ps(t.ls);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 d = _mm256_mul_ps(
        lsv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + g * kRowBlock))));
    const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16 + g * kRowBlock)));
    const __m256 p = _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + g * kRows))), d);
    acc = _mm256_add_ps(acc, _mm256_add_ps(p, _mm256_mul_ps(_mm256_set1_ps(Bf[g]), z)));
  }
  _mm256_storeu_ps(y, _mm256_mul_ps(acc, _mm256_set1_ps(sx)));
#elif defined(POCKETLLM_W4A8_X86)
  const __m128 lsv = _mm_loadu_ps(t.ls);
  __m128 acc = _mm_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m128 d =
        _mm_mul_ps(lsv, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s16 + g * kRowBlock))));
    const __m128 z = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(z16 + g * kRowBlock)));
    const __m128 p = _mm_mul_ps(_mm_cvtepi32_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(A + g * kRows))), d);
    acc = _mm_add_ps(acc, _mm_add_ps(p, _mm_mul_ps(_mm_set1_ps(Bf[g]), z)));
  }
  _mm_storeu_ps(y, _mm_mul_ps(acc, _mm_set1_ps(sx)));
#elif defined(POCKETLLM_W4A8_NEON)
  const float32x4_t lsv = vld1q_f32(t.ls);
  float32x4_t acc = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < G; ++g) {
    const float32x4_t d = vmulq_f32(lsv, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s16 + g * kRowBlock))));
    const float32x4_t z = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(z16 + g * kRowBlock)));
    const float32x4_t p = vmulq_f32(vcvtq_f32_s32(vld1q_s32(A + g * kRows)), d);
    acc = vaddq_f32(acc, vaddq_f32(p, vmulq_f32(vdupq_n_f32(Bf[g]), z)));
  }
  vst1q_f32(y, vmulq_f32(acc, vdupq_n_f32(sx)));
#else
  for (int r = 0; r < kRows; ++r) {
    float acc = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      const float d = t.ls[r] * any4::half_to_float(s16[g * kRowBlock + r]);
      const float p = static_cast<float>(A[g * kRows + r]) * d;
      const float q = Bf[g] * any4::half_to_float(z16[g * kRowBlock + r]);
      acc = acc + (p + q);
    }
    y[r] = acc * sx;
  }
#endif
  if (!finite)
    for (int r = 0; r < kRows; ++r) y[r] = NAN;
}

// ------------------------------------------------------------------------------------------------ integer part
#if defined(POCKETLLM_W4A8_X86)
// The row's int8 LUT in both 128-bit lanes; VNNI wants the unsigned operand, so it gets lut + 128 (xor 0x80).
inline __m256i lane_lut(const int8_t* lut) {
  const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
#if defined(POCKETLLM_W4A8_VNNI)
  return _mm256_xor_si256(t, _mm256_set1_epi8(static_cast<char>(0x80)));
#else
  return t;
#endif
}

// acc += 32 products w * x in 8 int32 lanes (VNNI: w is lut + 128, corrected per group by the caller; ax = |x|,
// unused with VNNI).
inline __m256i dot32(__m256i acc, __m256i w, __m256i x, __m256i ax) {
#if defined(POCKETLLM_W4A8_VNNI)
  (void)ax;
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_dpbusd_epi32(acc, w, x);
#endif
#else
  const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

inline __m256i abs_if_needed(__m256i x) {
#if defined(POCKETLLM_W4A8_VNNI)
  return x;
#else
  return _mm256_abs_epi8(x);
#endif
}

// Totals of 4 accumulators (one per row) as [row0 row1 row2 row3].
inline __m128i reduce4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// A[0 .. kRows) = totals of the tile's accumulators, less 128 * B on the VNNI path (sum (w + 128) x - 128 sum x).
inline void store_group(int32_t* A, const __m256i* acc, int32_t b) {
  const __m128i corr = _mm_set1_epi32(128 * b);
  for (int r0 = 0; r0 < kRows; r0 += 4) {
    __m128i s = reduce4(acc[r0], acc[r0 + 1], acc[r0 + 2], acc[r0 + 3]);
#if defined(POCKETLLM_W4A8_VNNI)
    s = _mm_sub_epi32(s, corr);
#else
    (void)corr;
#endif
    _mm_storeu_si128(reinterpret_cast<__m128i*>(A + r0), s);
  }
}

#if defined(POCKETLLM_W4A8_AVX512)
inline __m512i lane_lut512(const int8_t* lut) {
  const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
  return _mm512_xor_si512(t, _mm512_set1_epi8(static_cast<char>(0x80)));
}

// Totals of 8 accumulators (one per row) as [row0 .. row7]. Each halving adds a blend of two vectors to a shuffle of
// them (blends run on any vector pipe, shuffles compete with the vpermb lookups): 256-bit halves, then 128-bit
// lanes, then pairs of int32, then int32.
inline __m256i reduce8(const __m512i* a) {
  __m512i t[4];
  for (int i = 0; i < 4; ++i)  // [a.lo + a.hi | b.hi + b.lo] (256-bit halves) for rows a = 2i, b = 2i + 1
    t[i] = _mm512_add_epi32(_mm512_mask_blend_epi64(0xF0, a[2 * i], a[2 * i + 1]),
                            _mm512_shuffle_i64x2(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 3, 2)));
  // 128-bit lanes: [t0.L0 + t0.L1, t1.L1 + t1.L0, t0.L2 + t0.L3, t1.L3 + t1.L2] = rows [4i, 4i + 2, 4i + 1, 4i + 3]
  const __m512i swap = _mm512_setr_epi64(2, 3, 8, 9, 6, 7, 12, 13);
  __m512i u[2];
  for (int i = 0; i < 2; ++i)
    u[i] = _mm512_add_epi32(_mm512_mask_blend_epi64(0xCC, t[2 * i], t[2 * i + 1]),
                            _mm512_permutex2var_epi64(t[2 * i], swap, t[2 * i + 1]));
  // pairs within each lane: [u0[0] + u0[1], u1[0] + u1[1], u0[2] + u0[3], u1[2] + u1[3]]
  const __m512i lo = _mm512_mask_blend_epi32(0x5555, u[0], u[1]);  // [u1[0], u0[1], u1[2], u0[3]]
  const __m512i hi = _mm512_mask_blend_epi32(0x5555, u[1], u[0]);  // [u0[0], u1[1], u0[2], u1[3]]
  __m512i v = _mm512_add_epi32(hi, _mm512_shuffle_epi32(lo, _MM_PERM_CDAB));
  v = _mm512_add_epi32(v, _mm512_shuffle_epi32(v, _MM_PERM_BADC));  // lane k: [u0 total, u1 total, ...]
  // lane k holds rows (4 * 0 + p(k), 4 * 1 + p(k)) with p = [0, 2, 1, 3]: gather them in row order
  const __m512i order = _mm512_setr_epi32(0, 8, 4, 12, 1, 9, 5, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, v));
}

inline void store_group8(int32_t* A, const __m512i* acc, int32_t b) {
  const __m256i s = _mm256_sub_epi32(reduce8(acc), _mm256_set1_epi32(128 * b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(A), s);
}
#endif
#endif

#if defined(POCKETLLM_W4A8_NEON)
inline int32x4_t dot16(int32x4_t acc, int8x16_t w, int8x16_t x) {
#if defined(POCKETLLM_W4A8_DOTPROD)
  return vdotq_s32(acc, w, x);
#else
  // two products per int16 lane (at most 2 * 127 * 127), then pairwise into int32
  const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(w), vget_low_s8(x)), w, x);
  return vpadalq_s16(acc, p);
#endif
}

inline int32x4_t reduce4(int32x4_t a0, int32x4_t a1, int32x4_t a2, int32x4_t a3) {
  return vpaddq_s32(vpaddq_s32(a0, a1), vpaddq_s32(a2, a3));
}
#endif

// Decode reads a tile's kRows rows side by side, K / 2 bytes each: runs too short for the hardware prefetcher to
// follow (8 cache lines a row at K = 1024), which held a decode step's linears to ~1/3 of this machine's streaming
// bandwidth on one thread. Tiles lie one after the other, so while group gi of this tile is read, as many bytes of
// the tile two ahead are requested (benchmarks/w4a8_decode_step.cpp: one tile ahead ~1.5x, two ~1.6x, four no better).
inline void prefetch_ahead(const Tile& t, int64_t gi, int64_t g) {
  const uint8_t* p = t.q + 2 * kRows * t.stride + gi * (kRows * g / 2);
  prefetch_range(p, kRows * g / 2);
}

// Decode (one token), integer part: A[g * kRows + r] = sum_{j in g} xq[j] * lut[r][code[r][j]] for the tile's rows;
// xq in block order; bsum = B[t, :]. (AVX-512 builds run 128-column blocks through decode_tile.)
inline void decode_dots(const Tile& t, const int8_t* xq, const int32_t* bsum, int64_t K, int64_t g, int32_t* A) {
  const int64_t block = block_cols(g);
  const int64_t stride = t.stride;
#if defined(POCKETLLM_W4A8_X86)
  if (block >= 32) {
    __m256i L[kRows];
    for (int r = 0; r < kRows; ++r) L[r] = lane_lut(t.lut + 16 * r);
    const __m256i m0f = _mm256_set1_epi8(0x0F);
    const __m256i shift = _mm256_setr_epi64x(0, 0, 4, 4);
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      prefetch_ahead(t, gi, g);
      __m256i a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = _mm256_setzero_si256();
      if (block >= 64) {
        // 32 code bytes = 64 columns: their low nibbles are even columns of the block, the high nibbles odd ones
        for (int64_t j = j0; j < j0 + g; j += 64) {
          const int64_t b0 = j - j % block, o = j - b0;
          const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b0 + o / 2));
          const __m256i xo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b0 + block / 2 + o / 2));
          const __m256i ae = abs_if_needed(xe), ao = abs_if_needed(xo);
          const uint8_t* qj = t.q + j / 2;
#pragma GCC unroll 8
          for (int r = 0; r < kRows; ++r) {
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qj + r * stride));
            a[r] = dot32(a[r], _mm256_shuffle_epi8(L[r], _mm256_and_si256(b, m0f)), xe, ae);
            a[r] = dot32(a[r], _mm256_shuffle_epi8(L[r], _mm256_and_si256(_mm256_srli_epi16(b, 4), m0f)), xo, ao);
          }
        }
      } else {
        // 16 code bytes = 32 columns in both lanes; the high lane shifts right by 4 to reach the high nibbles
        for (int64_t j = j0; j < j0 + g; j += 32) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j));
          const __m256i ax = abs_if_needed(x);
          const uint8_t* qj = t.q + j / 2;
#pragma GCC unroll 8
          for (int r = 0; r < kRows; ++r) {
            const __m256i b =
                _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qj + r * stride)));
            a[r] = dot32(a[r], _mm256_shuffle_epi8(L[r], _mm256_and_si256(_mm256_srlv_epi64(b, shift), m0f)), x, ax);
          }
        }
      }
      store_group(A + gi * kRows, a, bsum[gi]);
    }
    return;
  }
#elif defined(POCKETLLM_W4A8_NEON)
  if (block >= 32) {
    int8x16_t L[kRows];
    for (int r = 0; r < kRows; ++r) L[r] = vld1q_s8(t.lut + 16 * r);
    const uint8x16_t m0f = vdupq_n_u8(0x0F);
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      prefetch_ahead(t, gi, g);
      int32x4_t acc[kRows];
      for (int r = 0; r < kRows; ++r) acc[r] = vdupq_n_s32(0);
      for (int64_t j = j0; j < j0 + g; j += 32) {
        // 16 code bytes = 32 columns: even ones at xq[b0 + o/2 ..], odd ones half a block further
        const int64_t b0 = j - j % block, o = j - b0;
        const int8x16_t xe = vld1q_s8(xq + b0 + o / 2), xo = vld1q_s8(xq + b0 + block / 2 + o / 2);
        for (int r = 0; r < kRows; ++r) {
          const uint8x16_t b = vld1q_u8(t.q + r * stride + j / 2);
          acc[r] = dot16(acc[r], vqtbl1q_s8(L[r], vandq_u8(b, m0f)), xe);
          acc[r] = dot16(acc[r], vqtbl1q_s8(L[r], vshrq_n_u8(b, 4)), xo);
        }
      }
      vst1q_s32(A + gi * kRows, reduce4(acc[0], acc[1], acc[2], acc[3]));
    }
    return;
  }
#endif
  // portable: any block size (2 = natural order); sums are exact, no correction
  (void)bsum;
  const int64_t half = block / 2;
  for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi)
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* q = t.q + r * stride;
      const int8_t* lut = t.lut + 16 * r;
      int32_t s = 0;
      for (int64_t j = j0; j < j0 + g; j += 2) {
        const int64_t b0 = j - j % block, k = (j - b0) / 2;
        const uint8_t byte = q[j / 2];
        s += lut[byte & 15] * xq[b0 + k] + lut[byte >> 4] * xq[b0 + half + k];
      }
      A[gi * kRows + r] = s;
    }
}

// Decode of one tile: y[r] for its rows. The AVX-512 path (128-column blocks: 64 code bytes per row and step) runs
// the float part group by group as the integer sums come out: the same operations as tile_epilogue, same bits.
inline void decode_tile(const Tile& t, const int8_t* xq, const int32_t* bsum, const float* Bf, int64_t K, int64_t g,
                        float sx, bool finite, int32_t* A, float* y) {
  const int64_t G = K / g;
#if defined(POCKETLLM_W4A8_AVX512)
  if (block_cols(g) == 128) {
    __m512i L[kRows];
    for (int r = 0; r < kRows; ++r) L[r] = lane_lut512(t.lut + 16 * r);
    const __m256 lsv = _mm256_loadu_ps(t.ls);
    const int64_t stride = t.stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      prefetch_ahead(t, gi, g);
      __m512i a[kRows];
      for (int r = 0; r < kRows; ++r) a[r] = _mm512_setzero_si512();
      for (int64_t j = j0; j < j0 + g; j += 128) {
        const __m512i xe = _mm512_loadu_si512(xq + j), xo = _mm512_loadu_si512(xq + j + 64);
        const uint8_t* qj = t.q + j / 2;
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          // vpermb reads 6 index bits and L holds the LUT 4 times: the high nibble needs no mask
          const __m512i b = _mm512_loadu_si512(qj + r * stride);
          a[r] = _mm512_dpbusd_epi32(a[r], _mm512_permutexvar_epi8(b, L[r]), xe);
          a[r] = _mm512_dpbusd_epi32(a[r], _mm512_permutexvar_epi8(_mm512_srli_epi16(b, 4), L[r]), xo);
        }
      }
      const __m256i Ag = _mm256_sub_epi32(reduce8(a), _mm256_set1_epi32(128 * bsum[gi]));
      const __m256 d = _mm256_mul_ps(
          lsv, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.s16 + gi * kRowBlock))));
      const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.z16 + gi * kRowBlock)));
      const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(Ag), d);
      acc = _mm256_add_ps(acc, _mm256_add_ps(p, _mm256_mul_ps(_mm256_set1_ps(Bf[gi]), z)));
    }
    _mm256_storeu_ps(y, finite ? _mm256_mul_ps(acc, _mm256_set1_ps(sx)) : _mm256_set1_ps(NAN));
    return;
  }
#endif
  decode_dots(t, xq, bsum, K, g, A);
  tile_epilogue(A, Bf, t, G, sx, finite, y);
}

// ------------------------------------------------------------------------------------------------ prefill
// The tile's weights as bytes in block order (rows of K): lut values, + 128 (as u8) on the VNNI path.
inline void expand_panel(const Tile& t, int64_t K, int64_t g, int8_t* panel) {
  const int64_t block = block_cols(g), half = block / 2;
  for (int r = 0; r < kRows; ++r) {
    int8_t lut[16];
    for (int c = 0; c < 16; ++c) {
#if defined(POCKETLLM_W4A8_VNNI)
      lut[c] = static_cast<int8_t>(static_cast<uint8_t>(t.lut[16 * r + c]) ^ 0x80u);
#else
      lut[c] = t.lut[16 * r + c];
#endif
    }
    const uint8_t* q = t.q + r * t.stride;
    int8_t* w = panel + r * K;
    for (int64_t b0 = 0; b0 < K; b0 += block)
      for (int64_t k = 0; k < half; ++k) {
        const uint8_t byte = q[b0 / 2 + k];
        w[b0 + k] = lut[byte & 15];
        w[b0 + half + k] = lut[byte >> 4];
      }
  }
}

// The weight a panel byte stands for.
inline int32_t panel_value(int8_t byte) {
#if defined(POCKETLLM_W4A8_VNNI)
  return static_cast<int32_t>(static_cast<uint8_t>(byte)) - 128;
#else
  return byte;
#endif
}

// Two tokens (xq0, xq1: block order; bsum0, bsum1) x the 4 rows of a panel: A0 / A1 [G][4] as decode_dots.
inline void panel_dots2(const int8_t* panel, const int8_t* xq0, const int8_t* xq1, const int32_t* bsum0,
                        const int32_t* bsum1, int64_t K, int64_t g, int32_t* A0, int32_t* A1) {
#if defined(POCKETLLM_W4A8_X86)
#if defined(POCKETLLM_W4A8_AVX512)
  if (g % 64 == 0) {
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      __m512i a[2][kRows];
      for (auto& t : a)
        for (auto& v : t) v = _mm512_setzero_si512();
      for (int64_t j = j0; j < j0 + g; j += 64) {
        const __m512i x0 = _mm512_loadu_si512(xq0 + j), x1 = _mm512_loadu_si512(xq1 + j);
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          const __m512i w = _mm512_loadu_si512(panel + r * K + j);
          a[0][r] = _mm512_dpbusd_epi32(a[0][r], w, x0);
          a[1][r] = _mm512_dpbusd_epi32(a[1][r], w, x1);
        }
      }
      store_group8(A0 + gi * kRows, a[0], bsum0[gi]);
      store_group8(A1 + gi * kRows, a[1], bsum1[gi]);
    }
    return;
  }
#endif
  if (simd_supported(g)) {
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      __m256i a[2][kRows];
      for (auto& t : a)
        for (auto& v : t) v = _mm256_setzero_si256();
      for (int64_t j = j0; j < j0 + g; j += 32) {
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq0 + j));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq1 + j));
        const __m256i ax0 = abs_if_needed(x0), ax1 = abs_if_needed(x1);
#pragma GCC unroll 8
        for (int r = 0; r < kRows; ++r) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + r * K + j));
          a[0][r] = dot32(a[0][r], w, x0, ax0);
          a[1][r] = dot32(a[1][r], w, x1, ax1);
        }
      }
      store_group(A0 + gi * kRows, a[0], bsum0[gi]);
      store_group(A1 + gi * kRows, a[1], bsum1[gi]);
    }
    return;
  }
#elif defined(POCKETLLM_W4A8_NEON)
  if (simd_supported(g)) {
    for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
      int32x4_t a[2][kRows];
      for (auto& t : a)
        for (auto& v : t) v = vdupq_n_s32(0);
      for (int64_t j = j0; j < j0 + g; j += 16) {
        const int8x16_t x0 = vld1q_s8(xq0 + j), x1 = vld1q_s8(xq1 + j);
        for (int r = 0; r < kRows; ++r) {
          const int8x16_t w = vld1q_s8(panel + r * K + j);
          a[0][r] = dot16(a[0][r], w, x0);
          a[1][r] = dot16(a[1][r], w, x1);
        }
      }
      vst1q_s32(A0 + gi * kRows, reduce4(a[0][0], a[0][1], a[0][2], a[0][3]));
      vst1q_s32(A1 + gi * kRows, reduce4(a[1][0], a[1][1], a[1][2], a[1][3]));
    }
    return;
  }
#endif
  for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi)
    for (int r = 0; r < kRows; ++r) {
      int32_t s0 = 0, s1 = 0;
      for (int64_t j = j0; j < j0 + g; ++j) {
        const int32_t w = panel_value(panel[r * K + j]);
        s0 += w * xq0[j];
        s1 += w * xq1[j];
      }
      A0[gi * kRows + r] = s0;
      A1[gi * kRows + r] = s1;
    }
  (void)bsum0, (void)bsum1;
}

#if defined(POCKETLLM_W4A8_AVX512)
// ------------------------------------------------------------------------------------------------ prefill, AVX-512
// Several tokens, 128-column blocks: 16 rows per tile with the rows in the 16 int32 lanes, so that no horizontal
// reduction is needed. The tile's weights (lut_i8 + 128, block order) are expanded once into a panel of k-quads,
// panel[q][r][0..3] = weights of row r at block-order positions 4q..4q+3 (one zmm per quad); then per quad and
// token one vpdpbusd with the token's 4 activations broadcast: acc[t] lane r += sum_i w[r][4q + i] * xq[t][4q + i].
constexpr int kPanelRows = 16;
constexpr int kPanelTokens = 8;  // tokens per pass: 8 integer + 8 float accumulators

// r[c] <- column c of the 16 x 16 int32 matrix whose rows are r[0..15].
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[4a + b], 128-bit lane l: column 4l + b of rows 4a .. 4a + 3
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int b = 0; b < 4; ++b) {  // 4 x 4 transpose of 128-bit lanes
    const __m512i x0 = _mm512_shuffle_i32x4(u[b], u[4 + b], 0x44), x1 = _mm512_shuffle_i32x4(u[b], u[4 + b], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(u[8 + b], u[12 + b], 0xEE);
    r[b] = _mm512_shuffle_i32x4(x0, x2, 0x88), r[4 + b] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    r[8 + b] = _mm512_shuffle_i32x4(x1, x3, 0x88), r[12 + b] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// panel [K/4][16][4] bytes (lut + 128) for 16 consecutive rows (row r: codes q + r * stride, LUT lut + 16 r).
inline void expand_panel16(const uint8_t* q, int64_t stride, const int8_t* lut, int64_t K, uint8_t* panel) {
  __m512i L[kPanelRows];
  for (int r = 0; r < kPanelRows; ++r) L[r] = lane_lut512(lut + 16 * r);
  for (int64_t j = 0; j < K; j += 128) {  // one block: 64 code bytes per row -> 128 bytes per row
    __m512i lo[kPanelRows], hi[kPanelRows];
    for (int r = 0; r < kPanelRows; ++r) {
      const __m512i b = _mm512_loadu_si512(q + r * stride + j / 2);
      lo[r] = _mm512_permutexvar_epi8(b, L[r]);                         // block positions 0..63
      hi[r] = _mm512_permutexvar_epi8(_mm512_srli_epi16(b, 4), L[r]);   // block positions 64..127
    }
    transpose16(lo);  // lo[c]: dword c (positions 4c..4c+3) of all 16 rows
    transpose16(hi);
    uint8_t* dst = panel + (j / 4) * 64;
    for (int c = 0; c < 16; ++c) {
      _mm512_storeu_si512(dst + c * 64, lo[c]);
      _mm512_storeu_si512(dst + (16 + c) * 64, hi[c]);
    }
  }
}

// y[t][r] (row stride 16) for T tokens (xq, bsum, Bf, sx, finite from the first) and the 16 rows of the panel.
// s16[2] / z16[2]: the 8-row blocks of rows 0..7 and 8..15 (s16[h] + g * 8 + r); ls: 16 LUT scales.
template <int T>
inline void panel16_tokens(const uint8_t* panel, const int8_t* xq, const int32_t* bsum, const float* Bf,
                           const float* sx, const uint8_t* finite, int64_t K, int64_t g,
                           const uint16_t* const s16[2], const uint16_t* const z16[2], const float* ls, float* y) {
  const int64_t G = K / g;
  const __m512 lsv = _mm512_loadu_ps(ls);
  __m512 facc[T];
  for (int t = 0; t < T; ++t) facc[t] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    __m512i acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_si512();
    const uint8_t* w = panel + gi * g * 16;
    const int8_t* x = xq + gi * g;
    for (int64_t k = 0; k < g; k += 4) {
      const __m512i wq = _mm512_loadu_si512(w + k * 16);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        int32_t quad;
        std::memcpy(&quad, x + t * K + k, 4);
        acc[t] = _mm512_dpbusd_epi32(acc[t], wq, _mm512_set1_epi32(quad));
      }
    }
    const __m256i s2 = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16[0] + gi * kRowBlock))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(s16[1] + gi * kRowBlock)), 1);
    const __m256i z2 = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16[0] + gi * kRowBlock))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(z16[1] + gi * kRowBlock)), 1);
    const __m512 d = _mm512_mul_ps(lsv, _mm512_cvtph_ps(s2));
    const __m512 z = _mm512_cvtph_ps(z2);
    for (int t = 0; t < T; ++t) {
      const __m512i A = _mm512_sub_epi32(acc[t], _mm512_set1_epi32(128 * bsum[t * G + gi]));
      const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(A), d);
      facc[t] = _mm512_add_ps(facc[t], _mm512_add_ps(p, _mm512_mul_ps(_mm512_set1_ps(Bf[t * G + gi]), z)));
    }
  }
  for (int t = 0; t < T; ++t)
    _mm512_storeu_ps(y + t * kPanelRows,
                     finite[t] ? _mm512_mul_ps(facc[t], _mm512_set1_ps(sx[t])) : _mm512_set1_ps(NAN));
}
#endif

// ------------------------------------------------------------------------------------------------ driver
// One call's tokens, quantized once and shared by every row.
struct Activations {
  int64_t M = 0, K = 0, g = 0, G = 0;
  std::vector<int8_t> xq;        // [M][K], block order
  std::vector<int32_t> bsum;     // [M][G]
  std::vector<float> bsumf;      // [M][G], float(bsum): exact (|B| <= 127 * g < 2^24)
  std::vector<float> sx;         // [M]
  std::vector<uint8_t> finite;   // [M]

  void resize(int64_t m, int64_t k, int64_t group) {
    M = m, K = k, g = group, G = k / group;
    xq.resize(M * K), bsum.resize(M * G), bsumf.resize(M * G), sx.resize(M), finite.resize(M);
  }
  // Tokens [t0, t1) of x [M][K]; scratch: K bytes.
  void quantize(const float* x, int64_t t0, int64_t t1, int8_t* scratch) {
    for (int64_t t = t0; t < t1; ++t) {
      sx[t] = quantize_token(x + t * K, K, g, xq.data() + t * K, bsum.data() + t * G, finite.data() + t, scratch);
      for (int64_t i = t * G; i < (t + 1) * G; ++i) bsumf[i] = static_cast<float>(bsum[i]);
    }
  }
};

// The op's weight inputs (export/ops/any4_linear_w4a8.py): qweight [N][K/2], lut_i8 [N][16], lut_scale [N], scales
// and zeros as fp16 bits in blocks of 8 rows, [ceil(N / 8)][G][8].
struct Weights {
  const uint8_t* qweight;
  const int8_t* lut_i8;
  const float* lut_scale;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t N, K, g;
};

// Per-thread buffers.
struct Scratch {
  std::vector<int32_t> A0, A1;
  std::vector<int8_t> panel;
  std::vector<uint8_t> q;  // a short last tile, its last row repeated
  int8_t lut[16 * kRows];
  float ls[kRows];
#if defined(POCKETLLM_W4A8_AVX512)
  int8_t lut16[16 * kPanelRows];
  float ls16[kPanelRows];
#endif
};

#if defined(POCKETLLM_W4A8_AVX512)
// Prefill of rows [n0, n1) (n0 % 8 == 0) on the AVX-512 panel path (block order of 128 columns).
inline void prefill_rows16(const Weights& w, const Activations& a, int64_t n0, int64_t n1, float* y, Scratch& s) {
  const int64_t K = w.K, g = w.g, G = K / g, N = w.N, blocks = (N + kRowBlock - 1) / kRowBlock;
  s.panel.resize(kPanelRows * K);
  uint8_t* panel = reinterpret_cast<uint8_t*>(s.panel.data());
  alignas(64) float out[kPanelTokens * kPanelRows];
  for (int64_t i0 = n0; i0 < n1; i0 += kPanelRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kPanelRows, n1 - i0));
    const uint8_t* q = w.qweight + i0 * (K / 2);
    const int8_t* lut = w.lut_i8 + i0 * 16;
    const float* ls = w.lut_scale + i0;
    if (rows < kPanelRows) {  // a short last tile: its last row repeated
      s.q.resize(kPanelRows * (K / 2));
      for (int r = 0; r < kPanelRows; ++r) {
        const int64_t i = i0 + std::min(r, rows - 1);
        std::copy(w.qweight + i * (K / 2), w.qweight + (i + 1) * (K / 2), s.q.begin() + r * (K / 2));
        std::copy(w.lut_i8 + i * 16, w.lut_i8 + (i + 1) * 16, s.lut16 + 16 * r);
        s.ls16[r] = w.lut_scale[i];
      }
      q = s.q.data(), lut = s.lut16, ls = s.ls16;
    }
    const int64_t b0 = i0 / kRowBlock, b1 = std::min(b0 + 1, blocks - 1);
    const uint16_t* s16[2] = {w.scales + b0 * G * kRowBlock, w.scales + b1 * G * kRowBlock};
    const uint16_t* z16[2] = {w.zeros + b0 * G * kRowBlock, w.zeros + b1 * G * kRowBlock};
    expand_panel16(q, K / 2, lut, K, panel);
    for (int64_t m = 0; m < a.M; m += kPanelTokens) {
      const int T = static_cast<int>(std::min<int64_t>(kPanelTokens, a.M - m));
      const int8_t* xq = a.xq.data() + m * K;
      const int32_t* bsum = a.bsum.data() + m * G;
      const float *Bf = a.bsumf.data() + m * G, *sx = a.sx.data() + m;
      const uint8_t* fin = a.finite.data() + m;
#define POCKETLLM_W4A8_PANEL(n) \
  case n: panel16_tokens<n>(panel, xq, bsum, Bf, sx, fin, K, g, s16, z16, ls, out); break;
      switch (T) {
        POCKETLLM_W4A8_PANEL(1) POCKETLLM_W4A8_PANEL(2) POCKETLLM_W4A8_PANEL(3) POCKETLLM_W4A8_PANEL(4)
        POCKETLLM_W4A8_PANEL(5) POCKETLLM_W4A8_PANEL(6) POCKETLLM_W4A8_PANEL(7) POCKETLLM_W4A8_PANEL(8)
        default: break;
      }
#undef POCKETLLM_W4A8_PANEL
      for (int t = 0; t < T; ++t) std::copy(out + t * kPanelRows, out + t * kPanelRows + rows, y + (m + t) * N + i0);
    }
  }
}
#endif

// y[t][i] (y: [M][N]) for rows i in [n0, n1) and every token; n0 % 8 == 0. Tiles of kRows rows; a short last tile
// is copied with its last row repeated, and only its real rows are written. One token: table lookups straight from
// the codes; several: the tile's weights are expanded into a panel once, then two tokens at a time.
inline void linear_rows(const Weights& w, const Activations& a, int64_t n0, int64_t n1, float* y, Scratch& s) {
  const int64_t K = w.K, g = w.g, G = K / g, N = w.N;
#if defined(POCKETLLM_W4A8_AVX512)
  if (a.M > 1 && block_cols(g) == 128) {
    prefill_rows16(w, a, n0, n1, y, s);
    return;
  }
#endif
  s.A0.resize(G * kRows), s.A1.resize(G * kRows);
  if (a.M > 1) s.panel.resize(kRows * K);
  for (int64_t i0 = n0; i0 < n1; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n1 - i0));
    const int64_t block = (i0 / kRowBlock) * G * kRowBlock + i0 % kRowBlock;
    Tile t{w.qweight + i0 * (K / 2), K / 2, w.lut_i8 + i0 * 16, w.lut_scale + i0, w.scales + block, w.zeros + block};
    if (rows < kRows) {
      s.q.resize(kRows * (K / 2));
      for (int r = 0; r < kRows; ++r) {
        const int64_t i = i0 + std::min(r, rows - 1);
        std::copy(w.qweight + i * (K / 2), w.qweight + (i + 1) * (K / 2), s.q.begin() + r * (K / 2));
        std::copy(w.lut_i8 + i * 16, w.lut_i8 + (i + 1) * 16, s.lut + 16 * r);
        s.ls[r] = w.lut_scale[i];
      }
      t.q = s.q.data(), t.lut = s.lut, t.ls = s.ls;
    }
    float out[kRows];
    if (a.M == 1) {
      decode_tile(t, a.xq.data(), a.bsum.data(), a.bsumf.data(), K, g, a.sx[0], a.finite[0] != 0, s.A0.data(), out);
      std::copy(out, out + rows, y + i0);
      continue;
    }
    expand_panel(t, K, g, s.panel.data());
    for (int64_t m = 0; m < a.M; m += 2) {
      const int64_t m1 = std::min(m + 1, a.M - 1);  // an odd last token pairs with itself
      panel_dots2(s.panel.data(), a.xq.data() + m * K, a.xq.data() + m1 * K, a.bsum.data() + m * G,
                  a.bsum.data() + m1 * G, K, g, s.A0.data(), s.A1.data());
      tile_epilogue(s.A0.data(), a.bsumf.data() + m * G, t, G, a.sx[m], a.finite[m] != 0, out);
      std::copy(out, out + rows, y + m * N + i0);
      if (m1 != m) {
        tile_epilogue(s.A1.data(), a.bsumf.data() + m1 * G, t, G, a.sx[m1], a.finite[m1] != 0, out);
        std::copy(out, out + rows, y + m1 * N + i0);
      }
    }
  }
}

}  // namespace pocketllm::w4a8

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
