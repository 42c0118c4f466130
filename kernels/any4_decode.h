// any4 decode (one activation row, M == 1): the hot loop of pocketllm::any4_linear, with no ExecuTorch dependency
// so it can be tested on its own (kernels/tests/any4_decode_test.cpp, also under qemu-aarch64 for the NEON path).
//
//   y_i = sum_g  s_ig * (sum_{j in g} x_j * lut_i[c_ij])  +  z_ig * (sum_{j in g} x_j)
//
// The 16 LUT entries of a row (16-bit floats) are split into a low-byte and a high-byte plane; a 16-entry byte
// lookup (vpshufb on x86, tbl on arm64, 32 codes per instruction pair) picks both bytes, the planes are interleaved
// back into 16-bit values and widened to fp32 exactly, then one fp32 multiply-add per weight. Two LUT encodings:
//   Lut::kFp16 - any fp16 LUT; widened with vcvtph2ps / fcvtl. On Zen 3 vcvtph2ps is the bottleneck (2 cycles).
//   Lut::kBf16 - LUT entries that are also bf16 values (what `pocketllm quantize` writes, see
//                docs/quantization.md): widening is a 16-bit shift or mask, 1.4x faster on x86.
// No value is rounded to a lower precision anywhere: the result differs from dequantise-then-dot only in summation
// order, and a one-hot x still yields lut * s + z with the reference's two roundings (build with -ffp-contract=off).
// The lookup returns columns of a 32-column block in an ISA-specific order, so x is permuted once per call
// (permute_x) and shared by every row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define POCKETLLM_ANY4_DECODE_AVX2 1
#if defined(__AVX512F__)
// AVX-512 (Zen 4/5, Skylake-SP+): the row's 16 LUT entries widened to fp32 once, in one zmm; 16 code bytes widened
// to 16 dwords (vpmovzxbd) and looked up with vpermps, which reads only the low 4 bits of each index (the low
// nibble, i.e. the even column), then again after a 4-bit shift (the odd column). No byte planes, no widening per
// weight, no idiv per row: 2.5-4x the AVX2 loop's throughput on Zen 5.
#define POCKETLLM_ANY4_DECODE_AVX512 1
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define POCKETLLM_ANY4_DECODE_NEON 1
#endif

// GCC 12 warns about its own AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pocketllm::any4 {

using ::pocketllm::half_to_float;  // half.h

// binary32 -> binary16 when f is exactly representable; false otherwise (the caller then uses the fp32 path).
inline bool float_to_half_exact(float f, uint16_t* h) {
  if (!std::isfinite(f)) return false;
  const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  const float a = std::fabs(f);
  if (a == 0.0f) {
    *h = sign;
    return true;
  }
  int e;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  if (e > 16) return false;
  const int unit = e - 1 >= -14 ? e - 11 : -24;  // value of the last mantissa bit: normals, else subnormals
  const double m = std::ldexp(static_cast<double>(a), -unit);
  if (m != std::floor(m)) return false;
  const uint32_t mi = static_cast<uint32_t>(m);
  *h = e - 1 >= -14 ? static_cast<uint16_t>(sign | ((e - 1 + 15) << 10) | (mi & 0x3ffu))
                    : static_cast<uint16_t>(sign | mi);
  return half_to_float(*h) == a * (sign ? -1.0f : 1.0f);
}

inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t h) {
#if defined(POCKETLLM_ANY4_DECODE_AVX2)
  return _cvtsh_ss(h);
#else
  return half_to_float(h);
#endif
}

// The SIMD paths need whole 32-column blocks inside each group.
inline bool decode_supported(int64_t K, int64_t g) {
#if defined(POCKETLLM_ANY4_DECODE_AVX2) || defined(POCKETLLM_ANY4_DECODE_NEON)
  return g % 32 == 0 && K % g == 0;
#else
  return g % 2 == 0 && K % g == 0;
#endif
}

enum class Lut { kFp16, kBf16 };

// xp = x in the order the lookup produces columns (per 32-column block).
inline void permute_x(const float* x, int64_t K, float* xp, Lut kind) {
#if defined(POCKETLLM_ANY4_DECODE_AVX512)
  (void)kind;
  // even columns (low nibbles) then odd columns (high nibbles) per 32-column block, both encodings
  for (int64_t b = 0; b < K; b += 32)
    for (int64_t i = 0; i < 16; ++i) {
      xp[b + i] = x[b + 2 * i];
      xp[b + 16 + i] = x[b + 2 * i + 1];
    }
#elif defined(POCKETLLM_ANY4_DECODE_AVX2)
  // vpshufb and the byte-plane interleave (vpunpckl/hbw) work per 128-bit lane: the low lane holds even columns
  // (low nibbles), the high lane odd ones. fp16: vcvtph2ps widens 8 consecutive 16-bit values:
  //   [0 2 .. 14 | 1 3 .. 15 | 16 18 .. 30 | 17 19 .. 31]
  // bf16: a 32-bit shift takes the even 16-bit values of each lane, a mask the odd ones: output vector q, lane h,
  // element i holds column 16 (q / 2) + 2 (q % 2) + h + 4 i.
  for (int64_t b = 0; b < K; b += 32)
    for (int64_t i = 0; i < 8; ++i) {
      if (kind == Lut::kFp16) {
        xp[b + i] = x[b + 2 * i];
        xp[b + 8 + i] = x[b + 2 * i + 1];
        xp[b + 16 + i] = x[b + 16 + 2 * i];
        xp[b + 24 + i] = x[b + 17 + 2 * i];
      } else {
        for (int64_t q = 0; q < 4; ++q)
          xp[b + 8 * q + i] = x[b + 16 * (q / 2) + 2 * (q % 2) + i / 4 + 4 * (i % 4)];
      }
    }
#elif defined(POCKETLLM_ANY4_DECODE_NEON)
  // low nibbles (even columns) first, then high nibbles (odd columns): [0 2 .. 30 | 1 3 .. 31], both encodings
  (void)kind;
  for (int64_t b = 0; b < K; b += 32)
    for (int64_t i = 0; i < 16; ++i) {
      xp[b + i] = x[b + 2 * i];
      xp[b + 16 + i] = x[b + 2 * i + 1];
    }
#else
  (void)kind;
  std::memcpy(xp, x, sizeof(float) * K);
#endif
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#if defined(POCKETLLM_ANY4_DECODE_NEON)
template <Lut kind>
inline float32x4_t widen_low(uint16x8_t v) {
  if constexpr (kind == Lut::kFp16) return vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(v)));
  else return vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
}
template <Lut kind>
inline float32x4_t widen_high(uint16x8_t v) {
  if constexpr (kind == Lut::kFp16) return vcvt_high_f32_f16(vreinterpretq_f16_u16(v));
  else return vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
}
#endif

// One output: qrow = K/2 code bytes (low nibble = even column), lut16 = the row's 16 entries (fp16 or bf16 bits,
// as kind says), srow/zrow = the row's K/g scales and zeros (fp32, or fp16 bits), xp = permute_x(x, kind),
// xsum[G] = per-group sums of x.
template <Lut kind, typename SZ>
inline float row_dot(const uint8_t* qrow, const uint16_t* lut16, const SZ* srow, const SZ* zrow, const float* xp,
                     const float* xsum, int64_t K, int64_t g, int64_t G) {
#if defined(POCKETLLM_ANY4_DECODE_AVX512)
  (void)K;  // the groups cover the row
  const __m256i l16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut16));
  __m512 table;
  if constexpr (kind == Lut::kBf16) table = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(l16), 16));
  else table = _mm512_cvtph_ps(l16);
  float zterm = 0.0f;
  for (int64_t gi = 0; gi < G; ++gi) zterm += to_f32(zrow[gi]) * xsum[gi];
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j0 = 0, gi = 0; gi < G; j0 += g, ++gi) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t end = j0 + g;
    int64_t j = j0;
    for (; j + 64 <= end; j += 64) {
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + j / 2)));
      const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + j / 2 + 16)));
      a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, table), _mm512_loadu_ps(xp + j), a0);
      a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), _mm512_loadu_ps(xp + j + 16), a1);
      a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, table), _mm512_loadu_ps(xp + j + 32), a2);
      a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), table), _mm512_loadu_ps(xp + j + 48), a3);
    }
    if (j < end) {  // g % 64 == 32
      const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + j / 2)));
      a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, table), _mm512_loadu_ps(xp + j), a0);
      a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), table), _mm512_loadu_ps(xp + j + 16), a1);
    }
    const __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    acc = _mm512_fmadd_ps(_mm512_set1_ps(to_f32(srow[gi])), a, acc);
  }
  return _mm512_reduce_add_ps(acc) + zterm;
#elif defined(POCKETLLM_ANY4_DECODE_AVX2)
  // fp16 scales and zeros of up to 64 groups are widened once per row, eight at a time (a scalar fp16 conversion per
  // group costs as much as a quarter of the group's inner loop on Zen 3); rows with more groups widen per group.
  constexpr int64_t kMaxG = 64;
  alignas(32) float sbuf[kMaxG], zbuf[kMaxG];
  const float *sf = nullptr, *zf = nullptr;
  if constexpr (std::is_same_v<SZ, float>) {
    sf = srow, zf = zrow;
  } else if (G <= kMaxG) {
    int64_t i = 0;
    for (; i + 8 <= G; i += 8) {
      _mm256_store_ps(sbuf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + i))));
      _mm256_store_ps(zbuf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zrow + i))));
    }
    for (; i < G; ++i) sbuf[i] = to_f32(srow[i]), zbuf[i] = to_f32(zrow[i]);
    sf = sbuf, zf = zbuf;
  }
  float zterm = 0.0f;
  for (int64_t gi = 0; gi < G; ++gi) zterm += (zf ? zf[gi] : to_f32(zrow[gi])) * xsum[gi];
  // Byte planes, each duplicated into both 128-bit lanes (vpshufb looks up within a lane).
  const __m256i ctrl = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i sh = _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut16)), ctrl);
  const __m256i L0 = _mm256_permute4x64_epi64(sh, _MM_SHUFFLE(2, 0, 2, 0));  // low bytes of entries 0..15, x2
  const __m256i L1 = _mm256_permute4x64_epi64(sh, _MM_SHUFFLE(3, 1, 3, 1));  // high bytes
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  const __m256i mhi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc = _mm256_setzero_ps();
  for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t j = j0; j < j0 + g; j += 32) {
      // 16 code bytes in both lanes; low lane keeps the low nibbles, high lane the high nibbles (shift by 4 there).
      const __m256i bytes =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + j / 2)));
      const __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(bytes, _mm256_setr_epi64x(0, 0, 4, 4)), m0f);
      const __m256i b0 = _mm256_shuffle_epi8(L0, codes), b1 = _mm256_shuffle_epi8(L1, codes);
      const __m256i ha = _mm256_unpacklo_epi8(b0, b1), hb = _mm256_unpackhi_epi8(b0, b1);
      if constexpr (kind == Lut::kFp16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(ha)), _mm256_loadu_ps(xp + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(ha, 1)), _mm256_loadu_ps(xp + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(hb)), _mm256_loadu_ps(xp + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(hb, 1)), _mm256_loadu_ps(xp + j + 24), a3);
      } else {  // bf16 in the high half of a 32-bit lane is that value as fp32
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(ha, 16)), _mm256_loadu_ps(xp + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(ha, mhi)), _mm256_loadu_ps(xp + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(hb, 16)), _mm256_loadu_ps(xp + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(hb, mhi)), _mm256_loadu_ps(xp + j + 24), a3);
      }
    }
    const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(sf ? sf[gi] : to_f32(srow[gi])), a, acc);
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
  return _mm_cvtss_f32(s4) + zterm;
#elif defined(POCKETLLM_ANY4_DECODE_NEON)
  float zterm = 0.0f;
  for (int64_t gi = 0; gi < G; ++gi) zterm += to_f32(zrow[gi]) * xsum[gi];
  const uint8x16x2_t planes = vld2q_u8(reinterpret_cast<const uint8_t*>(lut16));  // [0] low bytes, [1] high bytes
  const uint8x16_t m0f = vdupq_n_u8(0x0F);
  float32x4_t acc = vdupq_n_f32(0.0f);
  for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = j0; j < j0 + g; j += 32) {
      const uint8x16_t bytes = vld1q_u8(qrow + j / 2);
      const uint8x16_t ev = vandq_u8(bytes, m0f), od = vshrq_n_u8(bytes, 4);
      const uint8x16_t e0 = vqtbl1q_u8(planes.val[0], ev), e1 = vqtbl1q_u8(planes.val[1], ev);
      const uint8x16_t o0 = vqtbl1q_u8(planes.val[0], od), o1 = vqtbl1q_u8(planes.val[1], od);
      const uint16x8_t he0 = vreinterpretq_u16_u8(vzip1q_u8(e0, e1)), he1 = vreinterpretq_u16_u8(vzip2q_u8(e0, e1));
      const uint16x8_t ho0 = vreinterpretq_u16_u8(vzip1q_u8(o0, o1)), ho1 = vreinterpretq_u16_u8(vzip2q_u8(o0, o1));
      a0 = vfmaq_f32(a0, widen_low<kind>(he0), vld1q_f32(xp + j));
      a1 = vfmaq_f32(a1, widen_high<kind>(he0), vld1q_f32(xp + j + 4));
      a2 = vfmaq_f32(a2, widen_low<kind>(he1), vld1q_f32(xp + j + 8));
      a3 = vfmaq_f32(a3, widen_high<kind>(he1), vld1q_f32(xp + j + 12));
      a0 = vfmaq_f32(a0, widen_low<kind>(ho0), vld1q_f32(xp + j + 16));
      a1 = vfmaq_f32(a1, widen_high<kind>(ho0), vld1q_f32(xp + j + 20));
      a2 = vfmaq_f32(a2, widen_low<kind>(ho1), vld1q_f32(xp + j + 24));
      a3 = vfmaq_f32(a3, widen_high<kind>(ho1), vld1q_f32(xp + j + 28));
    }
    const float32x4_t a = vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3));
    acc = vfmaq_n_f32(acc, a, to_f32(srow[gi]));
  }
  return vaddvq_f32(acc) + zterm;
#else
  float zterm = 0.0f;
  for (int64_t gi = 0; gi < G; ++gi) zterm += to_f32(zrow[gi]) * xsum[gi];
  float t[16];
  for (int c = 0; c < 16; ++c) t[c] = kind == Lut::kFp16 ? half_to_float(lut16[c]) : bf16_to_float(lut16[c]);
  float y = 0.0f;
  for (int64_t j0 = 0, gi = 0; j0 < K; j0 += g, ++gi) {
    float d = 0.0f;
    for (int64_t j = j0; j < j0 + g; j += 2) {
      const uint8_t b = qrow[j / 2];
      d += xp[j] * t[b & 15] + xp[j + 1] * t[b >> 4];
    }
    y += to_f32(srow[gi]) * d;
  }
  return y + zterm;
#endif
}

// The same, computing G = K / g here (callers that loop over rows pass G once instead: a 64-bit division per row
// is measurable next to a 1024-column row).
template <Lut kind, typename SZ>
inline float row_dot(const uint8_t* qrow, const uint16_t* lut16, const SZ* srow, const SZ* zrow, const float* xp,
                     const float* xsum, int64_t K, int64_t g) {
  return row_dot<kind>(qrow, lut16, srow, zrow, xp, xsum, K, g, K / g);
}

}  // namespace pocketllm::any4

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

