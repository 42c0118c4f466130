// pocketllm::any4_linear.out: any4 weight-only linear, CPU, fp32 activations.
//
//   decode (M == 1), g % 32 == 0, 16-bit-float LUT (every pocketllm checkpoint): any4_decode.h - byte-plane table
//                    lookups (vpshufb / tbl) on the bf16 or fp16 LUT, fp32 multiply-adds, s and z applied per group;
//   decode otherwise: per (row, group) the 16 dequantised values t[c] = lut * s + z are built once (exact, as the
//                    reference dequantises), then a table lookup + multiply-add per weight;
//   prefill (M > 1): 32 (AVX-512) or 16 rows of W at a time dequantised exactly into a k-major fp32 panel, then
//                    panel_gemm.h's register tiles with fused multiply-adds (the one-hot contract still holds:
//                    fma(1, w, 0) = w and fma(0, w', acc) = acc).
// Blocks of rows go to ExecuTorch's threadpool. Build with -ffp-contract=off so t[c] keeps its two roundings.
#include "any4_linear.h"

#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "any4_decode.h"
#include "common.h"
#include "panel_gemm.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define POCKETLLM_ANY4_AVX2 1
#endif

namespace pocketllm {

using executorch::aten::Half;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

inline void group_table(const float* lut_row, float s, float z, float* t) {
  for (int c = 0; c < 16; ++c) {
    const float w = lut_row[c] * s;
    t[c] = w + z;
  }
}

// Dequantise row i of W into w[j * stride], j < K.
void dequant_row(const uint8_t* qrow, const float* lut_row, const float* srow, const float* zrow, int64_t K,
                 int64_t g, float* w, int64_t stride) {
  float t[16];
  for (int64_t j0 = 0; j0 < K; j0 += g) {
    group_table(lut_row, srow[j0 / g], zrow[j0 / g], t);
    for (int64_t j = j0; j < j0 + g; j += 2) {
      const uint8_t b = qrow[j / 2];
      w[j * stride] = t[b & 15];
      w[(j + 1) * stride] = t[b >> 4];
    }
  }
}

#ifdef POCKETLLM_ANY4_AVX2
// sum over one group of g columns (g % 8 == 0) of x_j * t[c_j]. Eight codes = one 32-bit word (code k in bits
// 4k..4k+3): broadcast it, shift lane k right by 4k so vpermps (which reads the low 3 bits) picks t[c & 7] from both
// table halves, and shift it left by 28 - 4k so bit 3 of the code lands in the sign bit blendv selects on. Per 8
// weights: one broadcast load, two shifts, two permutes, one blend, one multiply-add (no byte unpacking).
inline __m256 group_dot_avx2(const uint8_t* q, const float* x, int64_t g, __m256 tlo, __m256 thi, __m256 acc) {
  const __m256i right = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i left = _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0);
  __m256 acc2 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= g; j += 16) {
    uint32_t w0, w1;
    std::memcpy(&w0, q + j / 2, 4);
    std::memcpy(&w1, q + j / 2 + 4, 4);
    const __m256i b0 = _mm256_set1_epi32(static_cast<int>(w0)), b1 = _mm256_set1_epi32(static_cast<int>(w1));
    const __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, _mm256_srlv_epi32(b0, right)),
                                       _mm256_permutevar8x32_ps(thi, _mm256_srlv_epi32(b0, right)),
                                       _mm256_castsi256_ps(_mm256_sllv_epi32(b0, left)));
    const __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, _mm256_srlv_epi32(b1, right)),
                                       _mm256_permutevar8x32_ps(thi, _mm256_srlv_epi32(b1, right)),
                                       _mm256_castsi256_ps(_mm256_sllv_epi32(b1, left)));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), v0, acc);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), v1, acc2);
  }
  for (; j < g; j += 8) {
    uint32_t w0;
    std::memcpy(&w0, q + j / 2, 4);
    const __m256i b0 = _mm256_set1_epi32(static_cast<int>(w0));
    const __m256i idx = _mm256_srlv_epi32(b0, right);
    const __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                                       _mm256_castsi256_ps(_mm256_sllv_epi32(b0, left)));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), v0, acc);
  }
  return _mm256_add_ps(acc, acc2);
}
#endif

// The LUT as fp16 bits when every entry is exactly an fp16 value (always, for any4 checkpoints).
bool lut_as_fp16(const float* lut, int64_t n, std::vector<uint16_t>& out) {
  out.resize(n);
  for (int64_t i = 0; i < n; ++i)
    if (!any4::float_to_half_exact(lut[i], &out[i])) return false;
  return true;
}

float row_dot(const uint8_t* qrow, const float* lut_row, const float* srow, const float* zrow, const float* x,
              int64_t K, int64_t g) {
  float t[16];
#ifdef POCKETLLM_ANY4_AVX2
  if (g % 8 == 0) {
    // The group's table t = lut * s + z, built in registers: multiply, then add (two roundings, as the reference).
    const __m256 llo = _mm256_loadu_ps(lut_row), lhi = _mm256_loadu_ps(lut_row + 8);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < K; j0 += g) {
      const __m256 sv = _mm256_set1_ps(srow[j0 / g]), zv = _mm256_set1_ps(zrow[j0 / g]);
      const __m256 tlo = _mm256_add_ps(_mm256_mul_ps(llo, sv), zv);
      const __m256 thi = _mm256_add_ps(_mm256_mul_ps(lhi, sv), zv);
      acc = group_dot_avx2(qrow + j0 / 2, x + j0, g, tlo, thi, acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
  }
#endif
  v8f acc = {0};
  float tail = 0.0f;
  for (int64_t j0 = 0; j0 < K; j0 += g) {
    group_table(lut_row, srow[j0 / g], zrow[j0 / g], t);
    int64_t j = j0;
    for (; j + 8 <= j0 + g; j += 8) {
      const uint8_t* b = qrow + j / 2;
      const v8f w = {t[b[0] & 15], t[b[0] >> 4], t[b[1] & 15], t[b[1] >> 4],
                     t[b[2] & 15], t[b[2] >> 4], t[b[3] & 15], t[b[3] >> 4]};
      acc += load8(x + j) * w;
    }
    for (; j < j0 + g; j += 2) {
      const uint8_t b = qrow[j / 2];
      tail += x[j] * t[b & 15] + x[j + 1] * t[b >> 4];
    }
  }
  return hsum8(acc) + tail;
}

// The LUT as bf16 bits when every entry is exactly a bf16 value (pocketllm quantize writes such LUTs).
bool lut_as_bf16(const float* lut, int64_t n, std::vector<uint16_t>& out) {
  out.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, lut + i, 4);
    if (bits & 0xffffu) return false;
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
  return true;
}

// M == 1: x is permuted and summed per group once, then blocks of rows go to the threadpool.
template <any4::Lut kind, typename SZ>
void any4_decode(const float* x, const uint8_t* qweight, const uint16_t* lut16, const SZ* scales, const SZ* zeros,
                 int64_t N, int64_t K, int64_t g, float* y) {
  const int64_t G = K / g;
  std::vector<float> xp(K), xsum(G, 0.0f);
  any4::permute_x(x, K, xp.data(), kind);
  for (int64_t j = 0; j < K; ++j) xsum[j / g] += x[j];
  parallel_dynamic(N, decode_rows_per_block(N), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      y[i] = any4::row_dot<kind>(qweight + i * (K / 2), lut16 + i * 16, scales + i * G, zeros + i * G, xp.data(),
                                 xsum.data(), K, g, G);
  });
}

}  // namespace

void any4_linear_f32(const float* x, const uint8_t* qweight, const float* lut, const float* scales,
                     const float* zeros, int64_t M, int64_t N, int64_t K, int64_t g, float* y) {
  const int64_t G = K / g;
  std::vector<uint16_t> lut16;
  if (M == 1 && any4::decode_supported(K, g)) {
    if (lut_as_bf16(lut, N * 16, lut16)) {
      any4_decode<any4::Lut::kBf16>(x, qweight, lut16.data(), scales, zeros, N, K, g, y);
      return;
    }
    if (lut_as_fp16(lut, N * 16, lut16)) {
      any4_decode<any4::Lut::kFp16>(x, qweight, lut16.data(), scales, zeros, N, K, g, y);
      return;
    }
  }
  if (M == 1) {
    parallel(N, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        y[i] = row_dot(qweight + i * (K / 2), lut + i * 16, scales + i * G, zeros + i * G, x, K, g);
    });
    return;
  }
  // Prefill: per panel of gemm::kPanel output rows (32 with AVX-512, else 16), dequantise W[n0:n0+kPanel, :] exactly
  // into a k-major panel P[K][kPanel], then y[m, n0:n0+kPanel] = sum_k x[m, k] * P[k, :] in register tiles
  // (panel_gemm.h: fused multiply-adds, x broadcast).
  constexpr int64_t NP = gemm::kPanel;
  parallel_dynamic((N + NP - 1) / NP, 1, [&](int64_t b, int64_t e) {
    std::vector<float> panel(K * NP);
    for (int64_t p = b; p < e; ++p) {
      const int64_t n0 = p * NP, nr = std::min(NP, N - n0);
      if (nr < NP) std::fill(panel.begin(), panel.end(), 0.0f);
      for (int64_t r = 0; r < nr; ++r)
        dequant_row(qweight + (n0 + r) * (K / 2), lut + (n0 + r) * 16, scales + (n0 + r) * G,
                    zeros + (n0 + r) * G, K, g, panel.data() + r, NP);
      gemm::panel_multiply(x, M, K, panel.data(), y + n0, N, nr);
    }
  });
}

namespace {

// fp16, bf16 or fp32 tensor -> fp32 vector (LUT, scales and zeros are small: N * (16 + 2K/g) values).
bool to_float(const Tensor& t, std::vector<float>& dst) {
  dst.resize(t.numel());
  if (t.scalar_type() == ScalarType::Float) {
    std::copy(t.const_data_ptr<float>(), t.const_data_ptr<float>() + t.numel(), dst.begin());
    return true;
  }
  if (t.scalar_type() == ScalarType::Half) {
    const Half* p = t.const_data_ptr<Half>();
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= t.numel(); i += 8)
      _mm256_storeu_ps(dst.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
    for (; i < t.numel(); ++i) dst[i] = static_cast<float>(p[i]);
    return true;
  }
  if (t.scalar_type() == ScalarType::BFloat16) {
    const auto* p = static_cast<const uint16_t*>(t.const_data_ptr());
    for (int64_t i = 0; i < t.numel(); ++i) dst[i] = any4::bf16_to_float(p[i]);
    return true;
  }
  return false;
}

}  // namespace

Tensor& any4_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& qweight, const Tensor& lut,
                        const Tensor& scales, const Tensor& zeros, int64_t group_size, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "any4_linear: x must be float32");
  ET_KERNEL_CHECK_MSG(ctx, qweight.dim() == 2 && qweight.scalar_type() == ScalarType::Byte, InvalidArgument, out,
                      "any4_linear: qweight must be uint8 [N, K/2]");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == K, InvalidArgument, out,
                      "any4_linear: x's last dimension must equal K");
  ET_KERNEL_CHECK_MSG(ctx, group_size > 0 && K % group_size == 0 && group_size % 2 == 0, InvalidArgument, out,
                      "any4_linear: group_size must be even and divide K");
  const int64_t G = K / group_size;
  ET_KERNEL_CHECK_MSG(ctx, lut.numel() == N * 16 && scales.numel() == N * G && zeros.numel() == N * G,
                      InvalidArgument, out, "any4_linear: lut [N, 16], scales and zeros [N, K/g]");
  executorch::aten::SizesType sizes[16];
  ET_KERNEL_CHECK(ctx, x.dim() <= 16, InvalidArgument, out);
  for (int64_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  ET_KERNEL_CHECK(ctx,
                  executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok,
                  InvalidArgument, out);
  const int64_t M = x.numel() / K;

  // Decode with the LUT (bf16 or fp16) and the fp16 / fp32 scales and zeros read in place (no per-call conversion).
  const ScalarType lut_t = lut.scalar_type(), sz_t = scales.scalar_type();
  if (M == 1 && any4::decode_supported(K, group_size) && (lut_t == ScalarType::BFloat16 || lut_t == ScalarType::Half) &&
      zeros.scalar_type() == sz_t && (sz_t == ScalarType::Half || sz_t == ScalarType::Float)) {
    const auto* lut16 = static_cast<const uint16_t*>(lut.const_data_ptr());
    const float* xf = x.const_data_ptr<float>();
    const uint8_t* q = qweight.const_data_ptr<uint8_t>();
    float* y = out.mutable_data_ptr<float>();
    const auto* s16 = static_cast<const uint16_t*>(scales.const_data_ptr());
    const auto* z16 = static_cast<const uint16_t*>(zeros.const_data_ptr());
    const auto* s32 = static_cast<const float*>(scales.const_data_ptr());
    const auto* z32 = static_cast<const float*>(zeros.const_data_ptr());
    constexpr auto kBf16 = any4::Lut::kBf16, kFp16 = any4::Lut::kFp16;
    if (lut_t == ScalarType::BFloat16) {
      if (sz_t == ScalarType::Half) any4_decode<kBf16>(xf, q, lut16, s16, z16, N, K, group_size, y);
      else any4_decode<kBf16>(xf, q, lut16, s32, z32, N, K, group_size, y);
    } else {
      if (sz_t == ScalarType::Half) any4_decode<kFp16>(xf, q, lut16, s16, z16, N, K, group_size, y);
      else any4_decode<kFp16>(xf, q, lut16, s32, z32, N, K, group_size, y);
    }
    return out;
  }

  const float *plut, *pscales, *pzeros;
  std::vector<float> flut, fscales, fzeros;
  if (lut.scalar_type() == ScalarType::Float && scales.scalar_type() == ScalarType::Float &&
      zeros.scalar_type() == ScalarType::Float) {
    plut = lut.const_data_ptr<float>(), pscales = scales.const_data_ptr<float>();
    pzeros = zeros.const_data_ptr<float>();
  } else {
    ET_KERNEL_CHECK_MSG(ctx, to_float(lut, flut) && to_float(scales, fscales) && to_float(zeros, fzeros),
                        InvalidArgument, out, "any4_linear: lut/scales/zeros must be float16, bfloat16 or float32");
    plut = flut.data(), pscales = fscales.data(), pzeros = fzeros.data();
  }
  any4_linear_f32(x.const_data_ptr<float>(), qweight.const_data_ptr<uint8_t>(), plut, pscales, pzeros, M, N, K,
                  group_size, out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "any4_linear.out", pocketllm::any4_linear_out);

extern "C" void pocketllm_any4_linear(const float* x, const uint8_t* qweight, const float* lut, const float* scales,
                                      const float* zeros, int64_t M, int64_t N, int64_t K, int64_t group_size,
                                      float* y) {
  pocketllm::any4_linear_f32(x, qweight, lut, scales, zeros, M, N, K, group_size, y);
}
