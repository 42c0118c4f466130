// pocketllm::int8_linear.out: int8-per-channel weights x fp32 activations (exact; the LM head's kernel).
//
//   decode (M == 1): a row at a time, int8 -> int32 -> fp32 widening (exact) and fp32 multiply-adds into four
//                    accumulators (AVX-512: 16 weights per vpmovsxbd + vcvtdq2ps + vfmadd; AVX2: 8; NEON: 4 per
//                    sxtl/scvtf/fmla); the row sum is multiplied by the row's scale at the end. Memory-bound on the
//                    LM head (one byte per weight): ~27 GB/s on one Zen 5 core, the speed of reading the bytes.
//   prefill (M > 1): blocks of W rows widened to fp32 (exact, contiguous) times x transposed into token panels
//                    (panel_gemm.h rows_multiply: register tiles of fused multiply-adds), then the scale.
// Blocks of rows go to ExecuTorch's threadpool, handed out dynamically.
#include "int8_linear.h"

#include <vector>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "any4_decode.h"
#include "common.h"
#include "panel_gemm.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// GCC 12 warns about its own AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

// sum_j x[j] * q[j] for one row, fp32 accumulation, four accumulators. One row at a time streams each row once at
// full speed (27 GB/s on one Zen 5 core, as fast as reading the bytes); interleaving 4 rows 16 bytes apiece ran at
// a fifth of that.
inline float dot_row(const float* x, const int8_t* q, int64_t K) {
  int64_t j = 0;
  float out = 0.0f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 64 <= K; j += 64) {
    const auto w = [&](int64_t o) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j + o))));
    };
    a0 = _mm512_fmadd_ps(w(0), _mm512_loadu_ps(x + j), a0);
    a1 = _mm512_fmadd_ps(w(16), _mm512_loadu_ps(x + j + 16), a1);
    a2 = _mm512_fmadd_ps(w(32), _mm512_loadu_ps(x + j + 32), a2);
    a3 = _mm512_fmadd_ps(w(48), _mm512_loadu_ps(x + j + 48), a3);
  }
  for (; j + 16 <= K; j += 16)
    a0 = _mm512_fmadd_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)))),
        _mm512_loadu_ps(x + j), a0);
  out = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 32 <= K; j += 32) {
    const auto w = [&](int64_t o) {
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j + o))));
    };
    a0 = _mm256_fmadd_ps(w(0), _mm256_loadu_ps(x + j), a0);
    a1 = _mm256_fmadd_ps(w(8), _mm256_loadu_ps(x + j + 8), a1);
    a2 = _mm256_fmadd_ps(w(16), _mm256_loadu_ps(x + j + 16), a2);
    a3 = _mm256_fmadd_ps(w(24), _mm256_loadu_ps(x + j + 24), a3);
  }
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  out = _mm_cvtss_f32(s);
#elif defined(__aarch64__) && defined(__ARM_NEON)
  float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
  for (; j + 16 <= K; j += 16) {
    const int8x16_t b = vld1q_s8(q + j);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_high_s8(b);
    a0 = vfmaq_f32(a0, vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vld1q_f32(x + j));
    a1 = vfmaq_f32(a1, vcvtq_f32_s32(vmovl_high_s16(lo)), vld1q_f32(x + j + 4));
    a2 = vfmaq_f32(a2, vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vld1q_f32(x + j + 8));
    a3 = vfmaq_f32(a3, vcvtq_f32_s32(vmovl_high_s16(hi)), vld1q_f32(x + j + 12));
  }
  out = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
#endif
  for (; j < K; ++j) out += x[j] * static_cast<float>(q[j]);
  return out;
}

// int8 row -> fp32 (exact).
inline void widen_row(const int8_t* q, int64_t K, float* w) {
  int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; j + 16 <= K; j += 16)
    _mm512_storeu_ps(w + j, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)))));
#endif
  for (; j < K; ++j) w[j] = static_cast<float>(q[j]);
}

void decode_rows(const float* x, const int8_t* qweight, const float* scales, int64_t b, int64_t e, int64_t K,
                 float* y) {
  for (int64_t i = b; i < e; ++i) y[i] = dot_row(x, qweight + i * K, K) * scales[i];
}

}  // namespace

void int8_linear_f32(const float* x, const int8_t* qweight, const float* scales, int64_t M, int64_t N, int64_t K,
                     float* y) {
  if (M == 1) {
    parallel_dynamic(N, 64, [&](int64_t b, int64_t e) { decode_rows(x, qweight, scales, b, e, K, y); });
    return;
  }
  // Prefill: x transposed into token panels once; per block of gemm::kRows weight rows, the rows widened to fp32
  // (exact, contiguous), multiplied by every token panel, scaled and scattered into y.
  constexpr int64_t TT = gemm::kTokens, R = gemm::kRows;
  const int64_t panels = (M + TT - 1) / TT;
  std::vector<float> xT(panels * K * TT);
  gemm::transpose_tokens(x, M, K, xT.data());
  parallel_dynamic((N + R - 1) / R, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<float> wf, out;
    wf.resize(R * K);
    out.resize(R * TT);
    for (int64_t blk = b; blk < e; ++blk) {
      const int64_t n0 = blk * R, nr = std::min(R, N - n0);
      for (int64_t r = 0; r < nr; ++r) widen_row(qweight + (n0 + r) * K, K, wf.data() + r * K);
      for (int64_t p = 0; p < panels; ++p) {
        gemm::rows_multiply(wf.data(), nr, K, xT.data() + p * K * TT, out.data());
        const int64_t c_end = std::min(TT, M - p * TT);
        for (int64_t c = 0; c < c_end; ++c)
          for (int64_t r = 0; r < nr; ++r) y[(p * TT + c) * N + n0 + r] = out[r * TT + c] * scales[n0 + r];
      }
    }
  });
}

Tensor& int8_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& qweight, const Tensor& scales,
                        Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "int8_linear: x must be float32");
  ET_KERNEL_CHECK_MSG(ctx, qweight.dim() == 2 && qweight.scalar_type() == ScalarType::Char, InvalidArgument, out,
                      "int8_linear: qweight must be int8 [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == K, InvalidArgument, out,
                      "int8_linear: x's last dimension must equal K");
  ET_KERNEL_CHECK_MSG(ctx, scales.numel() == N, InvalidArgument, out, "int8_linear: scales must be [N, 1]");
  executorch::aten::SizesType sizes[16];
  ET_KERNEL_CHECK(ctx, x.dim() <= 16, InvalidArgument, out);
  for (int64_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  ET_KERNEL_CHECK(ctx,
                  executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok,
                  InvalidArgument, out);
  // The scales widened to fp32 once per call (N values; the calling thread's buffer is reused across calls).
  thread_local std::vector<float> s32;
  s32.resize(N);
  if (scales.scalar_type() == ScalarType::Half) {
    const auto* h = static_cast<const uint16_t*>(scales.const_data_ptr());
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= N; i += 8)
      _mm256_storeu_ps(s32.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
    for (; i < N; ++i) s32[i] = any4::half_to_float(h[i]);
  } else if (scales.scalar_type() == ScalarType::Float) {
    std::copy(scales.const_data_ptr<float>(), scales.const_data_ptr<float>() + N, s32.begin());
  } else if (scales.scalar_type() == ScalarType::BFloat16) {
    const auto* h = static_cast<const uint16_t*>(scales.const_data_ptr());
    for (int64_t i = 0; i < N; ++i) s32[i] = any4::bf16_to_float(h[i]);
  } else {
    ET_KERNEL_CHECK_MSG(ctx, false, InvalidArgument, out, "int8_linear: scales must be float16, bfloat16 or float32");
  }
  int8_linear_f32(x.const_data_ptr<float>(), qweight.const_data_ptr<int8_t>(), s32.data(), x.numel() / K, N, K,
                  out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif


EXECUTORCH_LIBRARY(pocketllm, "int8_linear.out", pocketllm::int8_linear_out);

extern "C" void pocketllm_int8_linear(const float* x, const int8_t* qweight, const float* scales, int64_t M,
                                      int64_t N, int64_t K, float* y) {
  pocketllm::int8_linear_f32(x, qweight, scales, M, N, K, y);
}
