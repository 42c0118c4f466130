// The routed experts of one SmallThinker 4b-a0.6b decode step through pocketllm_moe_ffn_any4 (the kernel library's
// C entry, ExecuTorch's threadpool): 32 layers, each its own stack of 32 any4 experts (H 1536, F 768, g128, bf16
// LUTs, fp16 scales and zeros; 2 GB in all, so the routed experts come from memory as in a model), 4 experts a token
// chosen at random per layer and step, ReGLU, the `.out` kernels' neuron-sparsity mode (or the one given; with
// POSITIVE%, gate LUTs drawn positive that often, which sets the share of active neurons: 50 -> ~50 %, 45 -> ~36 %,
// 40 -> ~22 %, 35 -> ~13 %, reported). Prints the median and best microseconds per step over 100 steps and the routed
// bytes per microsecond. The library is dlopen'ed, so one driver times any build of it (before/after a change: run
// the two alternately, one process each).
//
// Build (from the repository root, after `make kernels`):
//   ET=.venv/lib/python3.11/site-packages/executorch
//   c++ -O2 -std=c++17 benchmarks/moe_ffn_decode_step.cpp -o /tmp/moe_ffn_decode_step
//       -L$ET/lib -lexecutorch_threadpool -Wl,-rpath,$PWD/$ET/lib -ldl        (one command line)
// Run: /tmp/moe_ffn_decode_step kernels/build/libpocketllm_kernels.so [THREADS [LAYERS [off|auto|always [POSITIVE%]]]]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "driver_common.h"


// kernels/moe_ffn.cpp: pocketllm_moe_ffn_any4
using MoeAny4 = int (*)(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                        const uint8_t* gate_q, const uint16_t* gate_lut, const void* gate_scales,
                        const void* gate_zeros, int64_t gate_groups, const uint8_t* up_q, const uint16_t* up_lut,
                        const void* up_scales, const void* up_zeros, int64_t up_groups, const uint8_t* down_q,
                        const uint16_t* down_lut, const void* down_scales, const void* down_zeros, int64_t down_groups,
                        int64_t lut_bf16, int64_t scales_fp16, int64_t E, int64_t F, int64_t activation,
                        int64_t sparsity, float* out);
constexpr int64_t kGroup = 128;

struct Stack {  // one projection of all experts of a layer: [E, N, K/2] codes, [E, N, 16] LUT, [E, N, K/g] s, z
  std::vector<uint8_t> codes;
  std::vector<uint16_t> lut, scales, zeros;
  int64_t groups;
};

// positive: the share of LUT entries drawn positive (gate stacks; 0.5 elsewhere).
Stack random_stack(int64_t E, int64_t N, int64_t K, std::mt19937_64& rng, double positive = 0.5) {
  Stack p{{}, {}, {}, {}, K / kGroup};
  p.codes.resize(E * N * K / 2);
  for (size_t i = 0; i + 8 <= p.codes.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(p.codes.data() + i, &v, 8);
  }
  p.lut.resize(E * N * 16);
  // bf16 values of either sign near 2^-7: with positive = 0.5 about half of a token's gates come out positive, as
  // with random weights; fewer positive entries, fewer active neurons (main() reports the share)
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (auto& v : p.lut) {
    const uint64_t r = rng();
    const uint16_t sign = unit(rng) < positive ? 0 : 0x8000;
    v = static_cast<uint16_t>(sign | (0x3c00 + (r & 0xff) - 0x80));
  }
  p.scales.assign(E * N * p.groups, 0x3c00);                                           // fp16 1.0
  p.zeros.assign(E * N * p.groups, 0x0000);
  return p;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: moe_ffn_decode_step LIBRARY [THREADS [LAYERS [off|auto|always [POSITIVE%%]]]]\n");
    return 2;
  }
  const int threads = count_arg(argc, argv, 2, 2, "THREADS");
  const int layers = count_arg(argc, argv, 3, 32, "LAYERS");
  // NeuronSparsity (kernels/moe_ffn.h): off, auto (the `.out` kernels' mode), always
  const std::string mode = argc > 4 ? argv[4] : "auto";
  const int sparsity = mode == "off" ? 0 : mode == "auto" ? 1 : mode == "always" ? 2 : -1;
  if (sparsity < 0) {
    std::fprintf(stderr, "SPARSITY: expected off, auto or always, got '%s'\n", mode.c_str());
    return 2;
  }
  // POSITIVE%: the share of gate LUT entries drawn positive, with x >= 0, which sets how many neurons are active
  // (given: x in [0, 1); default: 50 with x in [-1, 1))
  const bool biased = argc > 5;
  const int percent = biased ? count_arg(argc, argv, 5, 50, "POSITIVE%") : 50;
  if (percent > 99) {
    std::fprintf(stderr, "POSITIVE%%: expected a share from 1 to 99, got %d\n", percent);
    return 2;
  }
  const double positive = percent / 100.0;
  const auto moe = kernel_entry<MoeAny4>(argv[1], "pocketllm_moe_ffn_any4", threads);

  const int64_t E = 32, H = 1536, F = 768, k = 4;
  std::mt19937_64 rng(0);
  std::vector<Stack> gate, up, down;
  for (int l = 0; l < layers; ++l) {
    gate.push_back(random_stack(E, F, H, rng, positive));
    up.push_back(random_stack(E, F, H, rng));
    down.push_back(random_stack(E, H, F, rng));
  }
  std::vector<float> x(H), out(H), weights(k, 1.0f / k);
  for (auto& v : x) v = static_cast<float>(rng() % 1000) / 500.0f - (biased ? 0.0f : 1.0f);
  if (biased)
    for (auto& v : x) v *= 0.5f;
  // the share of active neurons (positive gates: lut * 1 + 0 per code) over layer 0's experts
  int64_t active = 0;
  for (int64_t r = 0; r < E * F; ++r) {
    float g = 0.0f;
    for (int64_t j = 0; j < H; ++j) {
      const uint8_t b = gate[0].codes[r * H / 2 + j / 2];
      const uint32_t bits = static_cast<uint32_t>(gate[0].lut[r * 16 + (j % 2 ? b >> 4 : b & 15)]) << 16;
      float w;
      std::memcpy(&w, &bits, 4);
      g += x[j] * w;
    }
    active += g > 0.0f;
  }
  std::vector<int64_t> experts(E), ids(layers * k);
  std::iota(experts.begin(), experts.end(), 0);
  std::vector<double> us;
  for (int step = 0; step < 100; ++step) {
    for (int l = 0; l < layers; ++l) {
      std::shuffle(experts.begin(), experts.end(), rng);
      std::copy(experts.begin(), experts.begin() + k, ids.begin() + l * k);
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int l = 0; l < layers; ++l) {
      const Stack &g = gate[l], &u = up[l], &d = down[l];
      moe(x.data(), ids.data() + l * k, weights.data(), 1, k, H, g.codes.data(), g.lut.data(), g.scales.data(),
          g.zeros.data(), g.groups, u.codes.data(), u.lut.data(), u.scales.data(), u.zeros.data(), u.groups,
          d.codes.data(), d.lut.data(), d.scales.data(), d.zeros.data(), d.groups, /*lut_bf16=*/1,
          /*scales_fp16=*/1, E, F, /*reglu=*/0, sparsity, out.data());
    }
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(us.begin(), us.end());
  // bytes of one routed expert: gate and up [F, H], down [H, F]: codes, bf16 LUT, fp16 scales and zeros
  auto projection = [](int64_t N, int64_t K) { return N * K / 2 + N * 16 * 2 + N * (K / kGroup) * 4.0; };
  const double expert = 2 * projection(F, H) + projection(H, F);
  const double bytes = expert * k * layers;
  std::printf("threads %d, %d layers, %.1f MB routed, %.0f%% of neurons active: median %.0f us per step (%.1f GB/s), "
              "best %.0f\n", threads, layers, bytes / 1e6, 100.0 * active / (E * F), us[us.size() / 2],
              bytes / us[us.size() / 2] / 1e3, us[0]);
}
