// Shared helpers for pocketllm's ExecuTorch kernels: SIMD-friendly fp32 loops (GCC/Clang generic vectors, which
// lower to AVX2 on x86-64 and to NEON on arm64), and the ExecuTorch threadpool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <cstdint>
#include <cstring>
#include <limits>

#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "half.h"

#if defined(__FMA__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
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

// Eight fp16 values (bits) widened to fp32, exactly: vcvtph2ps (F16C), fcvtl (arm64), else one at a time.
inline v8f load8(const uint16_t* p) {
#if defined(__F16C__)
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
  const uint16x8_t h = vld1q_u16(p);
  const float32x4_t lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h)));
  const float32x4_t hi = vcvt_high_f32_f16(vreinterpretq_f16_u16(h));
  v8f out;
  std::memcpy(&out, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
  return out;
#else
  v8f out;
  for (int i = 0; i < 8; ++i) out[i] = half_to_float(p[i]);
  return out;
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t h) { return half_to_float(h); }

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

// x[i] = exp(x[i] - m) in place (m >= every x[i], so each term is at most 1); returns the sum.
inline float exp_shifted_sum(float* x, int64_t n, float m) {
  const v8f mv = {m, m, m, m, m, m, m, m};
  v8f acc = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f e = exp8(load8(x + i) - mv);
    store8(x + i, e);
    acc += e;
  }
  float sum = hsum8(acc);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

template <typename F>
inline void parallel_dynamic(int64_t n, int64_t block, const F& f);

// Run f(begin, end) over [0, n) in one chunk per thread (at least `grain` items each), ExecuTorch's thread count:
// the work share of parallel_dynamic (below) with chunks of ceil(n / threads), so a late helper never stalls it.
template <typename F>
inline void parallel(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  const int64_t threads = ::executorch::extension::get_thread_count();
  const int64_t chunk = std::max<int64_t>(grain < 1 ? 1 : grain, (n + threads - 1) / std::max<int64_t>(threads, 1));
  parallel_dynamic(n, chunk, f);
}

// parallel() splits [0, n) into one static chunk per thread, so the call lasts as long as its slowest thread.
// parallel_dynamic() hands out blocks of rows from a shared counter instead, and the calling thread never waits for
// a helper that has not started: a thread on a faster core (big.LITTLE phones) or on an idle core simply takes more
// blocks, and a helper that is asleep or preempted (a shared machine, a phone's background load) costs nothing - the
// caller does its blocks. ExecuTorch's threadpool (pthreadpool) cannot do that: its parallelize() returns only once
// every worker has checked in, so one descheduled worker stalls the whole call (measured: 40 us per any4 call for
// 64 KB of weights at 2 threads vs 9 us at 1, and 2 ms for the first call of a decode step, on a loaded 2-core VM).
// The helpers are our own threads, get_thread_count() - 1 of them: they spin briefly after each job (decode steps
// call linear layers back to back), then sleep on a condition variable.
class WorkShare {
 public:
  static WorkShare& get() {
    static WorkShare* ws = new WorkShare();  // never destroyed: helpers may be asleep at exit
    return *ws;
  }

  // f(begin, end) over [0, n) in blocks of `block`, by the caller and up to `threads - 1` helpers.
  template <typename F>
  void run(int64_t n, int64_t block, int64_t threads, const F& f) {
    const int64_t blocks = (n + block - 1) / block;
    // One job at a time: a call from inside a job (or from a second thread running another program) runs inline.
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) {
      f(0, n);
      return;
    }
    ensure_helpers(threads - 1);
    fn_ = [](const void* ctx, int64_t b) { (*static_cast<const Job<F>*>(ctx))(b); };
    const Job<F> job{&f, block, n};
    ctx_ = &job;
    active_.store(threads - 1, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t epoch = ((ticket_.load(std::memory_order_relaxed) >> 48) + 1) & 0xffff;
    ticket_.store(epoch << 48 | static_cast<uint64_t>(blocks) << 24, std::memory_order_release);
    if (sleepers_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
    work(epoch, static_cast<uint64_t>(-1));
    while (done_.load(std::memory_order_acquire) < blocks) pause();
  }

 private:
  template <typename F>
  struct Job {
    const F* f;
    int64_t block, n;
    void operator()(int64_t b) const { (*f)(b * block, std::min(n, (b + 1) * block)); }
  };

  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  // Claim blocks of the job of `epoch` until none is left (ticket: epoch 16 bits | blocks 24 | next 24). A claim is
  // a compare-and-swap on the whole ticket, so it succeeds only while that job is the current one; the job's function
  // is read after the claim, when its caller is still waiting for this block.
  void work(uint64_t epoch, uint64_t helper) {
    (void)helper;
    uint64_t s = ticket_.load(std::memory_order_acquire);
    while ((s >> 48) == epoch) {
      const uint64_t next = s & 0xffffff, blocks = (s >> 24) & 0xffffff;
      if (next >= blocks) return;
      if (ticket_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        fn_(ctx_, static_cast<int64_t>(next));
        done_.fetch_add(1, std::memory_order_release);
        s = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void helper_loop(int64_t index) {
    uint64_t seen = ticket_.load(std::memory_order_acquire) >> 48;
    for (;;) {
      uint64_t epoch = ticket_.load(std::memory_order_acquire) >> 48;
      for (int spin = 0; epoch == seen && spin < kSpin; ++spin) {
        pause();
        epoch = ticket_.load(std::memory_order_acquire) >> 48;
      }
      if (epoch == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleepers_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return (ticket_.load(std::memory_order_acquire) >> 48) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_acq_rel);
        epoch = ticket_.load(std::memory_order_acquire) >> 48;
      }
      seen = epoch;
      if (index < active_.load(std::memory_order_relaxed)) work(epoch, static_cast<uint64_t>(index));
    }
  }

  void ensure_helpers(int64_t count) {
    std::lock_guard<std::mutex> lock(start_mu_);
    while (static_cast<int64_t>(helpers_) < count) {
      const int64_t index = static_cast<int64_t>(helpers_++);
      std::thread([this, index] { helper_loop(index); }).detach();
    }
  }

  static constexpr int kSpin = 20000;  // ~50-100 us of pause instructions before sleeping
  std::atomic<uint64_t> ticket_{0};
  std::atomic<int64_t> done_{0}, active_{0};
  std::atomic<int> sleepers_{0};
  void (*fn_)(const void*, int64_t) = nullptr;
  const void* ctx_ = nullptr;
  std::mutex mu_, start_mu_, busy_;
  std::condition_variable cv_;
  size_t helpers_ = 0;
};

// Rows per block for a decode (one token) pass over n weight rows: at least 4 blocks per thread so a late helper
// costs little, at most 128 rows so each thread streams long contiguous runs of the weight (blocks of 16 rows
// alternating between threads read 8 KB pieces and write the outputs of neighbouring blocks into shared cache
// lines: W4A8 decode ran slower on 2 threads than on 1), a multiple of 16 (the kernels' row tiles).
inline int64_t decode_rows_per_block(int64_t n) {
  const int64_t threads = std::max<int64_t>(1, ::executorch::extension::get_thread_count());
  const int64_t b = (n / (threads * 4) + 15) / 16 * 16;
  return std::min<int64_t>(128, std::max<int64_t>(16, b));
}

// Blocks of `block` rows over [0, n): see WorkShare. Threads: ExecuTorch's thread count (what the app or
// _unsafe_reset_threadpool set), so one setting sizes XNNPACK and our kernels alike.
template <typename F>
inline void parallel_dynamic(int64_t n, int64_t block, const F& f) {
  if (n <= 0) return;
  block = block < 1 ? 1 : block;
  const int64_t blocks = (n + block - 1) / block;
  const int64_t threads = ::executorch::extension::get_thread_count();
  const int64_t workers = threads < blocks ? threads : blocks;
  if (workers <= 1 || blocks >= (int64_t{1} << 24)) {
    f(0, n);
    return;
  }
  WorkShare::get().run(n, block, workers, f);
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Elementwise kernels (rms_norm, rope, silu_mul): at least this many elements per threadpool task, so a decode call
// (one token: 1-4K elements) runs on the calling thread and only prefill wakes a helper.
constexpr int64_t kElementwiseTask = 16384;

}  // namespace pocketllm
