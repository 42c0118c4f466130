// Shared helpers for pocketllm's ExecuTorch kernels: SIMD-friendly fp32 loops (GCC/Clang generic vectors, which
// lower to AVX2 on x86-64 and to NEON on arm64), and the ExecuTorch threadpool.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <executorch/runtime/kernel/thread_parallel_interface.h>

#if defined(__FMA__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace pocketllm {

typedef float v8f __attribute__((vector_size(32)));

inline float kNegInfHelper() { return -std::numeric_limits<float>::infinity(); }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

// a * b + c with one rounding where the ISA has it. Explicit, so it holds in files built with -ffp-contract=off
// (any4_linear.cpp, where dequantised values must keep two roundings but the dot products may fuse).
inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__aarch64__)
  float32x4_t a2[2], b2[2], c2[2];
  std::memcpy(a2, &a, sizeof(a));
  std::memcpy(b2, &b, sizeof(b));
  std::memcpy(c2, &c, sizeof(c));
  c2[0] = vfmaq_f32(c2[0], a2[0], b2[0]);
  c2[1] = vfmaq_f32(c2[1], a2[1], b2[1]);
  std::memcpy(&c, c2, sizeof(c));
  return c;
#else
  return a * b + c;
#endif
}

inline float hsum8(v8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// sum_i a[i] * b[i], eight independent lanes (vectorises without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  v8f acc0 = {0}, acc1 = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 += load8(a + i) * load8(b + i);
    acc1 += load8(a + i + 8) * load8(b + i + 8);
  }
  for (; i + 8 <= n; i += 8) acc0 += load8(a + i) * load8(b + i);
  float s = hsum8(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += a * x[i]
inline void axpy(float* y, float a, const float* x, int64_t n) {
  int64_t i = 0;
  const v8f av = {a, a, a, a, a, a, a, a};
  for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + av * load8(x + i));
  for (; i < n; ++i) y[i] += a * x[i];
}

typedef int32_t v8i __attribute__((vector_size(32)));

// exp of eight lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial with fused multiply-adds; relative
// error ~1e-7 over the inputs softmax feeds it, x <= 0). Inputs below -87.3 give ~1e-38 instead of 0.
inline v8f exp8(v8f x) {
  const v8f lo = {-87.33654f, -87.33654f, -87.33654f, -87.33654f, -87.33654f, -87.33654f, -87.33654f, -87.33654f};
  const v8f hi = {88.37626f, 88.37626f, 88.37626f, 88.37626f, 88.37626f, 88.37626f, 88.37626f, 88.37626f};
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const auto c = [](float v) { return v8f{v, v, v, v, v, v, v, v}; };
  v8f fx = fma8(x, c(1.44269504088896341f), c(0.5f));
  v8f t = __builtin_convertvector(__builtin_convertvector(fx, v8i), v8f);  // truncation toward zero
  fx = t > fx ? t - 1.0f : t;                                               // floor
  x = fma8(fx, c(-0.693359375f), x);
  x = fma8(fx, c(2.12194440e-4f), x);
  v8f y = fma8(c(1.9875691500e-4f), x, c(1.3981999507e-3f));
  y = fma8(y, x, c(8.3334519073e-3f));
  y = fma8(y, x, c(4.1665795894e-2f));
  y = fma8(y, x, c(1.6666665459e-1f));
  y = fma8(y, x, c(5.0000001201e-1f));
  y = fma8(y, x * x, x) + 1.0f;
  const v8i e = (__builtin_convertvector(fx, v8i) + 127) << 23;
  v8f scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return y * scale;
}

// x[i] = exp(x[i] - max(x)) in place; returns the sum. n >= 1.
inline float softmax_numerator(float* x, int64_t n) {
  float mx = kNegInfHelper();
  for (int64_t i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  const v8f m = {mx, mx, mx, mx, mx, mx, mx, mx};
  v8f acc = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f e = exp8(load8(x + i) - m);
    store8(x + i, e);
    acc += e;
  }
  float sum = hsum8(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    sum += x[i];
  }
  return sum;
}

// Run f(begin, end) over [0, n) on ExecuTorch's threadpool (the one XNNPACK uses), in chunks of `grain`.
template <typename F>
inline void parallel(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  ::executorch::extension::parallel_for(0, n, grain < 1 ? 1 : grain, f);
}

// parallel() splits [0, n) into one static chunk per thread, so the call lasts as long as its slowest thread.
// parallel_dynamic() hands out blocks of rows from a shared counter instead: a thread on a faster core (big.LITTLE
// phones) or on an idle core (a shared machine) simply takes more blocks.
template <typename F>
inline void parallel_dynamic(int64_t n, int64_t block, const F& f) {
  if (n <= 0) return;
  block = block < 1 ? 1 : block;
  const int64_t blocks = (n + block - 1) / block;
  const int64_t threads = ::executorch::extension::get_thread_count();
  const int64_t workers = threads < blocks ? threads : blocks;
  if (workers <= 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  ::executorch::extension::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < blocks;)
      f(b * block, (b + 1) * block < n ? (b + 1) * block : n);
  });
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace pocketllm
