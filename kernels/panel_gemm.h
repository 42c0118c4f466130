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

// ---------------------------------------------------------------- weight rows x token panel (the other way round)
// For weights that must be widened first (int8, any4): widen kRows rows of W row-major into w[r * K + k] (contiguous,
// vectorisable, each weight once per call), and multiply them by x transposed in panels of kTokens tokens,
// xT[(p * K + k) * kTokens + c] = x[(p * kTokens + c) * K + k] (built once per call, shared by every row block):
//
//   out[r * kTokens + c] = sum_k w[r * K + k] * xT[(p * K + k) * kTokens + c]
//
// with the same register tiles as above (rows broadcast, tokens in lanes, fused multiply-adds in k order: the
// one-hot contract holds). The caller scatters out[] into y[token, row] (kRows x kTokens values per K x kRows x
// kTokens multiply-adds). This replaces a k-major panel of W, whose strided fill cost as much as the multiply.
constexpr int64_t kTokens = kPanel;
constexpr int kRows = kMR;

// xT for tokens [0, M): ceil(M / kTokens) panels, zero-padded.
inline void transpose_tokens(const float* x, int64_t M, int64_t K, float* xT) {
  const int64_t panels = (M + kTokens - 1) / kTokens;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = xT + p * K * kTokens;
    const int64_t c_end = std::min(kTokens, M - p * kTokens);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < kTokens; ++c) dst[k * kTokens + c] = c < c_end ? x[(p * kTokens + c) * K + k] : 0.0f;
  }
}

template <int R>
inline void rows_tile(const float* w, int64_t K, const float* xT, float* out) {
#if defined(__AVX512F__)
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 p0 = _mm512_loadu_ps(xT + k * 32), p1 = _mm512_loadu_ps(xT + k * 32 + 16);
    for (int i = 0; i < R; ++i) {
      const __m512 bw = _mm512_set1_ps(w[i * K + k]);
      acc[i][0] = _mm512_fmadd_ps(bw, p0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(bw, p1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    _mm512_storeu_ps(out + i * 32, acc[i][0]);
    _mm512_storeu_ps(out + i * 32 + 16, acc[i][1]);
  }
#else
  v8f acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < K; ++k) {
    const v8f p0 = load8(xT + k * 16), p1 = load8(xT + k * 16 + 8);
    for (int i = 0; i < R; ++i) {
      const float wv = w[i * K + k];
      const v8f bw = {wv, wv, wv, wv, wv, wv, wv, wv};
      acc[i][0] = fma8(bw, p0, acc[i][0]);
      acc[i][1] = fma8(bw, p1, acc[i][1]);
    }
  }
  for (int i = 0; i < R; ++i) {
    store8(out + i * 16, acc[i][0]);
    store8(out + i * 16 + 8, acc[i][1]);
  }
#endif
}

// out[r * kTokens + c] for r < nr (<= kRows) rows of w against one token panel xT.
inline void rows_multiply(const float* w, int64_t nr, int64_t K, const float* xT, float* out) {
  switch (nr) {
    case kRows: rows_tile<kRows>(w, K, xT, out); break;
#if defined(__AVX512F__)
    case 7: rows_tile<7>(w, K, xT, out); break;
    case 6: rows_tile<6>(w, K, xT, out); break;
#endif
    case 5: rows_tile<5>(w, K, xT, out); break;
    case 4: rows_tile<4>(w, K, xT, out); break;
    case 3: rows_tile<3>(w, K, xT, out); break;
    case 2: rows_tile<2>(w, K, xT, out); break;
    case 1: rows_tile<1>(w, K, xT, out); break;
    default: break;
  }
}

}  // namespace pocketllm::gemm

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

