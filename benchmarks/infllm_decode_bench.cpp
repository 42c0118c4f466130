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
// Run: /tmp/infllm_decode_bench kernels/build/libpocketllm_kernels.so CONTEXT HQ HKV D STEPS [SCORE_RULE [KV [LAYERS]]]
//   e.g. 16384 16 2 64 256 0 f16 24 (MiniCPM4-0.5B shapes, upstream rule, fp16 cache, 24 layers); prints the median
//   microseconds per call, both wall clock and this thread's CPU time (the latter is the robust one on a shared
//   machine: it excludes time the thread spent descheduled). KV: f32 (default) or f16, the cache's dtype. LAYERS
//   (default 1): that many caches, called in turn as a decode step calls its layers, so the caches come from memory
//   as in a model (one layer's cache at 16K fits in the last-level cache).
#include <dlfcn.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <random>
#include <vector>

#include <executorch/extension/threadpool/threadpool_guard.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>

#include "../kernels/half.h"

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
  Tensor4(void* data, int a, int b, int c, int d, ScalarType dtype = ScalarType::Float)
      : sizes{a, b, c, d},
        strides{b * c * d, c * d, d, 1},
        impl(dtype, 4, sizes, data, dim_order, strides) {}
  Tensor tensor() { return Tensor(&impl); }
};

// fp32 -> fp16 bits, round to nearest even (normal range; the random cache here stays well inside it).
uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int32_t exp = int32_t((x >> 23) & 0xff) - 127 + 15;
  uint32_t man = x & 0x7fffffu;
  if (exp <= 0) return uint16_t(sign);
  uint32_t h = (uint32_t(exp) << 10) | (man >> 13);
  const uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

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
  const bool f16 = argc > 8 && std::string(argv[8]) == "f16";
  const int layers = argc > 9 ? std::atoi(argv[9]) : 1;
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
  const size_t n = size_t(capacity) * Hkv * D;
  std::vector<float> q(size_t(Hq) * D), out(q.size());
  std::vector<std::vector<float>> k32(layers), v32(layers);
  std::vector<std::vector<uint16_t>> k16(layers), v16(layers);
  std::vector<std::unique_ptr<Tensor4>> kt, vt;
  for (int l = 0; l < layers; ++l) {
    for (auto* c : {&k32[l], &v32[l]}) {
      c->resize(n);
      for (auto& x : *c) x = normal(rng);
    }
    if (f16) {
      for (auto [src, dst] : {std::pair{&k32[l], &k16[l]}, std::pair{&v32[l], &v16[l]}}) {
        dst->resize(n);
        for (size_t i = 0; i < n; ++i) (*dst)[i] = float_to_half((*src)[i]);
        std::vector<float>().swap(*src);
      }
      kt.emplace_back(new Tensor4(k16[l].data(), 1, capacity, Hkv, D, ScalarType::Half));
      vt.emplace_back(new Tensor4(v16[l].data(), 1, capacity, Hkv, D, ScalarType::Half));
    } else {
      kt.emplace_back(new Tensor4(k32[l].data(), 1, capacity, Hkv, D));
      vt.emplace_back(new Tensor4(v32[l].data(), 1, capacity, Hkv, D));
    }
  }
  Tensor4 qt(q.data(), 1, 1, Hq, D), ot(out.data(), 1, 1, Hq, D);
  KernelRuntimeContext ctx;
  executorch::extension::threadpool::NoThreadPoolGuard one_thread;  // parallel_for runs inline on this thread

  Tensor qx = qt.tensor(), ox = ot.tensor();
  auto call = [&](int64_t pos) {
    for (int l = 0; l < layers; ++l) {
      Tensor kx = kt[l]->tensor(), vx = vt[l]->tensor();
      if (with_rule) {
        with_rule(ctx, qx, kx, vx, pos, kernel, stride, block, init, window, topk, dense_len, score_rule, ox);
      } else {
        without_rule(ctx, qx, kx, vx, pos, kernel, stride, block, init, window, topk, dense_len, ox);
      }
    }
  };
  for (auto& x : q) x = normal(rng);
  call(context - 1);  // fills the compressed-key memos for the whole context
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
    wall_us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
                      layers);
    cpu_us.push_back((thread_cpu_us() - c0) / layers);
  }
  std::sort(wall_us.begin(), wall_us.end());
  std::sort(cpu_us.begin(), cpu_us.end());
  std::printf("%s rule=%s kv=%s layers=%d median_cpu_us=%.1f median_wall_us=%.1f p10_cpu_us=%.1f\n", argv[1],
              with_rule ? (score_rule ? "exact" : "upstream") : "exact(before)", f16 ? "f16" : "f32", layers,
              cpu_us[steps / 2], wall_us[steps / 2], cpu_us[steps / 10]);
  return 0;
}
