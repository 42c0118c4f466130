// The W4A8 linears of one MiniCPM4-0.5B decode step (24 layers x q, k, v, o, gate, up, down; random any4 codes,
// every layer's weights distinct so they come from memory as in a model), called through the kernel library's C
// entry on ExecuTorch's threadpool; a second pass with q/k/v and gate/up concatenated (4 calls a layer) shows what
// the per-call cost is. Prints median and best microseconds per step over 200 alternating rounds and the bytes
// read per microsecond. The library is dlopen'ed, so one driver times any build of it (before/after a change: run
// the two alternately, one process each).
//
// Build (from the repository root, after `make kernels`):
//   ET=.venv/lib/python3.11/site-packages/executorch
//   c++ -O2 -std=c++17 -I$ET/include benchmarks/w4a8_decode_step.cpp -o /tmp/w4a8_decode_step
//       -L$ET/lib -lexecutorch_threadpool -Wl,-rpath,$PWD/$ET/lib -ldl        (one command line)
// Run: /tmp/w4a8_decode_step kernels/build/libpocketllm_kernels.so [THREADS [LAYERS]]
//   LAYERS 1: one layer's weights called over and over (cache-resident: the kernel's compute rate).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "driver_common.h"


using LinearW4A8 = void (*)(const float* x, const uint8_t* qweight, const int8_t* lut_i8, const float* lut_scale,
                            const uint16_t* scales, const uint16_t* zeros, int64_t M, int64_t N, int64_t K,
                            int64_t group_size, float* y);
constexpr int64_t kGroup = 128;

struct Weights {
  int64_t N, K;
  std::vector<uint8_t> codes;
  std::vector<int8_t> lut;
  std::vector<float> lut_scale;
  std::vector<uint16_t> scales, zeros;  // fp16 bits, [ceil(N/8)][K/g][8]
  double bytes() const {
    return codes.size() + lut.size() + 4.0 * lut_scale.size() + 2.0 * (scales.size() + zeros.size());
  }
};

Weights random_weights(int64_t N, int64_t K, std::mt19937& rng) {
  Weights w{N, K};
  w.codes.resize(N * K / 2);
  for (auto& b : w.codes) b = static_cast<uint8_t>(rng());
  w.lut.resize(N * 16);
  for (auto& b : w.lut) b = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
  w.lut_scale.assign(N, 0.01f);
  const int64_t blocked = (N + 7) / 8 * 8 * (K / kGroup);
  w.scales.assign(blocked, 0x2000);  // 2^-7
  w.zeros.assign(blocked, 0x1000);
  return w;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: w4a8_decode_step LIBRARY [THREADS [LAYERS]]\n");
    return 2;
  }
  const int threads = count_arg(argc, argv, 2, 2, "THREADS");
  const int layers = count_arg(argc, argv, 3, 24, "LAYERS");
  const auto linear = kernel_entry<LinearW4A8>(argv[1], "pocketllm_any4_linear_w4a8", threads);

  const int64_t H = 1024, KV = 128, F = 4096;  // hidden, 2 KV heads x 64, intermediate
  std::mt19937 rng(0);
  std::vector<std::vector<Weights>> separate(layers), fused(layers);
  for (int l = 0; l < layers; ++l) {
    for (auto [n, k] : {std::pair{H, H}, {KV, H}, {KV, H}, {H, H}, {F, H}, {F, H}, {H, F}})
      separate[l].push_back(random_weights(n, k, rng));
    for (auto [n, k] : {std::pair{H + 2 * KV, H}, {H, H}, {2 * F, H}, {H, F}})
      fused[l].push_back(random_weights(n, k, rng));
  }
  std::vector<float> x(F), y(2 * F);
  for (auto& v : x) v = static_cast<float>(rng() % 1000) / 500.0f - 1.0f;
  auto step_us = [&](std::vector<std::vector<Weights>>& model) {
    const auto t0 = std::chrono::steady_clock::now();
    for (auto& layer : model)
      for (auto& w : layer)
        linear(x.data(), w.codes.data(), w.lut.data(), w.lut_scale.data(), w.scales.data(), w.zeros.data(), 1, w.N,
               w.K, kGroup, y.data());
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  std::vector<double> a, b;
  for (int r = 0; r < 200; ++r) {
    a.push_back(step_us(separate));
    b.push_back(step_us(fused));
  }
  std::sort(a.begin(), a.end());
  std::sort(b.begin(), b.end());
  double bytes = 0;
  for (auto& w : separate[0]) bytes += w.bytes();
  bytes *= layers;
  std::printf("threads %d, %.1f MB: 7 calls a layer median %.0f us (%.1f GB/s), best %.0f; "
              "4 calls a layer median %.0f us (%.1f GB/s), best %.0f\n",
              threads, bytes / 1e6, a[a.size() / 2], bytes / a[a.size() / 2] / 1e3, a[0], b[b.size() / 2],
              bytes / b[b.size() / 2] / 1e3, b[0]);
}
