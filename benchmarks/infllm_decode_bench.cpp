// Decode cost of pocketllm::infllm_attention.out (one layer, one thread) at a long context, through the ExecuTorch
// kernel entry point, so the compressed-key memo works as in a .pte: one call at `context - 1` fills the memo, then
// `steps` single-token calls at context, context + 1, ... each write a new K/V row and are timed.
//
// The kernel library is dlopen'ed, so one driver times any build of it (before/after a change: run the two
// libraries alternately, one process each; two copies in one process would register the op twice).
//
// Build (from the repository root, after `make kernels`):
//   ET=.venv/lib/python3.11/site-packages/executorch
//   c++ -O2 -std=c++17 -I$ET/include -I$ET/include/executorch/runtime/core/portable_type/c10
//       -DC10_USING_CUSTOM_GENERATED_MACROS benchmarks/infllm_decode_bench.cpp -o /tmp/infllm_decode_bench
//       -L$ET/lib -lexecutorch -lexecutorch_threadpool -Wl,-rpath,$ET/lib -ldl        (one command line)
// Run: /tmp/infllm_decode_bench kernels/build/libpocketllm_kernels.so CONTEXT HQ HKV D STEPS [SCORE_RULE]
//   e.g. 16384 16 2 64 256 0 (MiniCPM4-0.5B shapes, upstream rule); prints the median microseconds per call, both
//   wall clock and this thread's CPU time (the latter is the robust one on a shared machine: it excludes time the
//   thread spent descheduled).
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::etensor::TensorImpl;

// pocketllm::infllm_attention_out with and without the score_rule argument (before issue #9 item 7).
using OpWithRule = Tensor& (*)(KernelRuntimeContext&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                               int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, Tensor&);
using OpWithoutRule = Tensor& (*)(KernelRuntimeContext&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                  int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, Tensor&);
constexpr const char* kWithRule =
    "_ZN9pocketllm20infllm_attention_outERN10executorch7runtime20KernelRuntimeContextERKNS1_7etensor6TensorES7_S7_"
    "lllllllllRS5_";
constexpr const char* kWithoutRule =
    "_ZN9pocketllm20infllm_attention_outERN10executorch7runtime20KernelRuntimeContextERKNS1_7etensor6TensorES7_S7_"
    "llllllllRS5_";

struct Tensor4 {
  TensorImpl::SizesType sizes[4];
  TensorImpl::DimOrderType dim_order[4] = {0, 1, 2, 3};
  TensorImpl::StridesType strides[4];
  TensorImpl impl;
  Tensor4(float* data, int a, int b, int c, int d)
      : sizes{a, b, c, d},
        strides{b * c * d, c * d, d, 1},
        impl(ScalarType::Float, 4, sizes, data, dim_order, strides) {}
  Tensor tensor() { return Tensor(&impl); }
};

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s LIB CONTEXT HQ HKV D STEPS [SCORE_RULE]\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    std::fprintf(stderr, "%s\n", dlerror());
    return 2;
  }
  const int context = std::atoi(argv[2]), Hq = std::atoi(argv[3]), Hkv = std::atoi(argv[4]), D = std::atoi(argv[5]);
  const int steps = std::atoi(argv[6]);
  const int64_t score_rule = argc > 7 ? std::atoi(argv[7]) : 0;
  auto with_rule = reinterpret_cast<OpWithRule>(dlsym(lib, kWithRule));
  auto without_rule = reinterpret_cast<OpWithoutRule>(dlsym(lib, kWithoutRule));
  if (!with_rule && !without_rule) {
    std::fprintf(stderr, "no pocketllm::infllm_attention_out in %s\n", argv[1]);
    return 2;
  }
  // MiniCPM4's sparse_config; dense_len 8192 < context, so every call is sparse.
  const int64_t kernel = 32, stride = 16, block = 64, init = 1, window = 2048, topk = 64, dense_len = 8192;

  const int capacity = context + steps;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> k(size_t(capacity) * Hkv * D), v(k.size()), q(size_t(Hq) * D), out(q.size());
  for (auto& x : k) x = normal(rng);
  for (auto& x : v) x = normal(rng);
  Tensor4 kt(k.data(), 1, capacity, Hkv, D), vt(v.data(), 1, capacity, Hkv, D), qt(q.data(), 1, 1, Hq, D),
      ot(out.data(), 1, 1, Hq, D);
  KernelRuntimeContext ctx;
  executorch::extension::threadpool::NoThreadPoolGuard one_thread;  // parallel_for runs inline on this thread

  Tensor qx = qt.tensor(), kx = kt.tensor(), vx = vt.tensor(), ox = ot.tensor();
  auto call = [&](int64_t pos) {
    if (with_rule) {
      with_rule(ctx, qx, kx, vx, pos, kernel, stride, block, init, window, topk, dense_len, score_rule, ox);
    } else {
      without_rule(ctx, qx, kx, vx, pos, kernel, stride, block, init, window, topk, dense_len, ox);
    }
  };
  for (auto& x : q) x = normal(rng);
  call(context - 1);  // fills the compressed-key memo for the whole context

  auto thread_cpu_us = [] {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return 1e6 * t.tv_sec + 1e-3 * t.tv_nsec;
  };
  std::vector<double> wall_us, cpu_us;
  for (int s = 0; s < steps; ++s) {
    const int pos = context + s;  // the new token's K/V row was part of the random fill; a fresh query each step
    for (auto& x : q) x = normal(rng);
    const double c0 = thread_cpu_us();
    const auto t0 = std::chrono::steady_clock::now();
    call(pos);
    wall_us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    cpu_us.push_back(thread_cpu_us() - c0);
  }
  std::sort(wall_us.begin(), wall_us.end());
  std::sort(cpu_us.begin(), cpu_us.end());
  std::printf("%s rule=%s median_cpu_us=%.1f median_wall_us=%.1f p10_cpu_us=%.1f\n", argv[1],
              with_rule ? (score_rule ? "exact" : "upstream") : "exact(before)", cpu_us[steps / 2],
              wall_us[steps / 2], cpu_us[steps / 10]);
  return 0;
}
