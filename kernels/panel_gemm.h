// fp32 multiply of a few activation rows by a k-major weight panel: the prefill (M > 1) inner kernel of
// pocketllm::any4_linear and pocketllm::int8_linear. A caller dequantizes kPanel consecutive output rows of W,
// exactly, into panel[k * kPanel + c] (c < kPanel), then
//
//   y[m * ldy + c] = sum_k x[m * K + k] * panel[k * kPanel + c]        m < M, c < nr (<= kPanel)
//
// in register tiles of up to kMR activation rows x kPanel outputs, with fused multiply-adds in k order (the one-hot
// contract holds: fma(1, w, 0) = w and fma(0, w', acc) = acc, so a one-hot x row returns a panel value unchanged).
// AVX-512: kPanel = 32 (two zmm per row, 8 rows: 16 accumulators); otherwise kPanel = 16 (two 8-lane vectors per
// row, 6 rows). No ExecuTorch dependency.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

// GCC 12 warns about its own AVX-512 intrinsics (_mm512_undefined_*) once they are inlined here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace pocketllm::gemm {

#if defined(__AVX512F__)
constexpr int64_t kPanel = 32;
constexpr int kMR = 8;

template <int MR>
inline void tile(const float* x, int64_t K, const float* panel, float* y, int64_t ldy, int64_t nr) {
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 p0 = _mm512_loadu_ps(panel + k * 32), p1 = _mm512_loadu_ps(panel + k * 32 + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 bx = _mm512_set1_ps(x[i * K + k]);
      acc[i][0] = _mm512_fmadd_ps(bx, p0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(bx, p1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    if (nr == 32) {
      _mm512_storeu_ps(y + i * ldy, acc[i][0]);
      _mm512_storeu_ps(y + i * ldy + 16, acc[i][1]);
    } else {
      alignas(64) float out[32];
      _mm512_store_ps(out, acc[i][0]);
      _mm512_store_ps(out + 16, acc[i][1]);
      std::copy(out, out + nr, y + i * ldy);
    }
  }
}
#else
constexpr int64_t kPanel = 16;
constexpr int kMR = 6;

template <int MR>
inline void tile(const float* x, int64_t K, const float* panel, float* y, int64_t ldy, int64_t nr) {
  v8f acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < K; ++k) {
    const v8f p0 = load8(panel + k * 16), p1 = load8(panel + k * 16 + 8);
    for (int i = 0; i < MR; ++i) {
      const float xv = x[i * K + k];
      const v8f bx = {xv, xv, xv, xv, xv, xv, xv, xv};
      acc[i][0] = fma8(bx, p0, acc[i][0]);
      acc[i][1] = fma8(bx, p1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float out[16];
    store8(out, acc[i][0]);
    store8(out + 8, acc[i][1]);
    std::copy(out, out + nr, y + i * ldy);
  }
}
#endif

// Every row of x (M rows of K) against one panel: y rows m * ldy, columns [0, nr).
inline void panel_multiply(const float* x, int64_t M, int64_t K, const float* panel, float* y, int64_t ldy,
                           int64_t nr) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) tile<kMR>(x + m * K, K, panel, y + m * ldy, ldy, nr);
  const float* xr = x + m * K;
  float* yr = y + m * ldy;
  switch (M - m) {
#if defined(__AVX512F__)
    case 7: tile<7>(xr, K, panel, yr, ldy, nr); break;
    case 6: tile<6>(xr, K, panel, yr, ldy, nr); break;
#endif
    case 5: tile<5>(xr, K, panel, yr, ldy, nr); break;
    case 4: tile<4>(xr, K, panel, yr, ldy, nr); break;
    case 3: tile<3>(xr, K, panel, yr, ldy, nr); break;
    case 2: tile<2>(xr, K, panel, yr, ldy, nr); break;
    case 1: tile<1>(xr, K, panel, yr, ldy, nr); break;
    default: break;
  }
}

}  // namespace pocketllm::gemm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

