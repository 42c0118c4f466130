// any4 decode hot loop (kernels/any4_decode.h) against a plain dequantise-then-dot in double precision, on whatever
// ISA it is compiled for: AVX-512 or AVX2 (host; -mno-avx512f for AVX2), NEON (aarch64, run under qemu), scalar (-mno-avx). No ExecuTorch needed:
//   c++ -O2 -std=c++17 -march=native -ffp-contract=off kernels/tests/any4_decode_test.cpp -o /tmp/t && /tmp/t
//   aarch64-linux-gnu-g++ -O2 -std=c++17 -ffp-contract=off -static ... && qemu-aarch64 /tmp/t
// tests/test_executorch_kernels.py builds and runs it for every variant the machine can run.
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "../any4_decode.h"

using namespace pocketllm::any4;

static int failures = 0;
#define EXPECT(cond, ...)                               \
  do {                                                  \
    if (!(cond)) {                                      \
      std::printf("%s:%d: ", __FILE__, __LINE__);       \
      std::printf(__VA_ARGS__);                         \
      std::printf("\n");                                \
      ++failures;                                       \
    }                                                   \
  } while (0)

// Every binary16 value survives half -> float -> half, and the float is the IEEE value.
static void test_half_conversions() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t exp = (h >> 10) & 0x1f;
    if (exp == 31) continue;  // inf / nan: never in a LUT
    const float f = half_to_float(static_cast<uint16_t>(h));
    const double want = (h & 0x8000 ? -1.0 : 1.0) *
                        (exp == 0 ? std::ldexp(double(h & 0x3ff), -24) : std::ldexp(1024.0 + (h & 0x3ff), int(exp) - 25));
    EXPECT(double(f) == want, "half_to_float(0x%04x) = %g, expected %g", h, double(f), want);
    uint16_t back = 0;
    EXPECT(float_to_half_exact(f, &back) && (back == h || (f == 0.0f && (back & 0x7fff) == 0)),
           "float_to_half_exact(%g) = 0x%04x, expected 0x%04x", double(f), back, h);
    EXPECT(to_f32(static_cast<uint16_t>(h)) == f, "to_f32(0x%04x)", h);
  }
  uint16_t h;
  EXPECT(!float_to_half_exact(0.1f, &h), "0.1f is not an fp16 value");
  EXPECT(!float_to_half_exact(65536.0f, &h), "65536 overflows fp16");
  EXPECT(!float_to_half_exact(std::ldexp(1.0f, -25), &h), "2^-25 underflows fp16");
}

// Nearest fp16 value of a normal-range v, as bits.
static uint16_t round_to_half(float v) {
  if (v == 0.0f) return 0;
  const int e = std::max(std::ilogb(v), -14);
  uint16_t h = 0;
  EXPECT(float_to_half_exact(std::ldexp(std::nearbyint(std::ldexp(v, 10 - e)), e - 10), &h), "round_to_half(%g)",
         double(v));
  return h;
}

template <typename SZ>
static SZ make_sz(float v);
template <>
float make_sz<float>(float v) { return v; }
template <>
uint16_t make_sz<uint16_t>(float v) { return round_to_half(v); }

static const char* kind_name(Lut kind) { return kind == Lut::kFp16 ? "fp16" : "bf16"; }

template <Lut kind, typename SZ>
static void test_row_dot(int64_t K, int64_t g, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t N = 5, G = K / g;
  std::vector<uint8_t> q(N * K / 2);
  for (auto& b : q) b = static_cast<uint8_t>(rng() & 0xff);
  std::vector<uint16_t> lut(N * 16);
  std::vector<float> lutf(N * 16);
  for (int64_t i = 0; i < N * 16; ++i) {
    const float v = 8.0f * u(rng);
    if (kind == Lut::kFp16) {
      lut[i] = round_to_half(v);
      lutf[i] = half_to_float(lut[i]);
    } else {
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      lut[i] = static_cast<uint16_t>(bits >> 16);  // truncated to bf16
      lutf[i] = bf16_to_float(lut[i]);
    }
  }
  std::vector<SZ> s(N * G), z(N * G);
  for (int64_t i = 0; i < N * G; ++i) {
    s[i] = make_sz<SZ>(0.01f + 0.02f * std::fabs(u(rng)));
    z[i] = make_sz<SZ>(0.3f * u(rng));
  }
  std::vector<float> x(K), xp(K), xsum(G, 0.0f);
  for (auto& v : x) v = u(rng);
  permute_x(x.data(), K, xp.data(), kind);
  for (int64_t j = 0; j < K; ++j) xsum[j / g] += x[j];
  for (int64_t i = 0; i < N; ++i) {
    double want = 0.0, mag = 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const int c = (q[i * K / 2 + j / 2] >> (4 * (j & 1))) & 15;
      const double w = double(lutf[i * 16 + c]) * to_f32(s[i * G + j / g]) + to_f32(z[i * G + j / g]);
      want += w * x[j];
      mag += std::fabs(w * x[j]);
    }
    const float got = row_dot<kind>(q.data() + i * K / 2, lut.data() + i * 16, s.data() + i * G, z.data() + i * G,
                              xp.data(), xsum.data(), K, g);
    EXPECT(std::fabs(got - want) <= 1e-6 * mag + 1e-7, "%s K=%lld g=%lld row %lld: %.9g vs %.9g", kind_name(kind), (long long)K,
           (long long)g, (long long)i, double(got), want);
  }
  // One-hot x reproduces the dequantised weight with the reference's two roundings: lut * s, then + z.
  for (int64_t j : {int64_t(0), int64_t(1), K / 2 + 3, K - 1}) {
    std::vector<float> e(K, 0.0f), ep(K), esum(G, 0.0f);
    e[j] = 1.0f;
    esum[j / g] = 1.0f;
    permute_x(e.data(), K, ep.data(), kind);
    const int c = (q[j / 2] >> (4 * (j & 1))) & 15;
    const float w = lutf[c] * to_f32(s[j / g]);
    const float want = w + to_f32(z[j / g]);
    const float got = row_dot<kind>(q.data(), lut.data(), s.data(), z.data(), ep.data(), esum.data(), K, g);
    EXPECT(got == want, "%s one-hot K=%lld g=%lld column %lld: %.9g vs %.9g", kind_name(kind), (long long)K, (long long)g,
           (long long)j, double(got), double(want));
  }
}

int main() {
  test_half_conversions();
  for (int64_t g : {32, 64, 128, 256})
    for (int64_t K : {g, 4 * g, 1024 + (1024 % g ? g - 1024 % g : 0)}) {
      if (!decode_supported(K, g)) continue;
      test_row_dot<Lut::kFp16, float>(K, g, static_cast<uint32_t>(K * 7 + g));
      test_row_dot<Lut::kFp16, uint16_t>(K, g, static_cast<uint32_t>(K * 11 + g));
      test_row_dot<Lut::kBf16, float>(K, g, static_cast<uint32_t>(K * 13 + g));
      test_row_dot<Lut::kBf16, uint16_t>(K, g, static_cast<uint32_t>(K * 17 + g));
    }
  // More than 64 groups per row (K / g = 128): the fp16-scale path widens them on the heap.
  test_row_dot<Lut::kBf16, uint16_t>(4096, 32, 99);
  test_row_dot<Lut::kFp16, uint16_t>(4096, 32, 101);
#if defined(POCKETLLM_ANY4_DECODE_AVX512)
  const char* isa = "avx512";
#elif defined(POCKETLLM_ANY4_DECODE_AVX2)
  const char* isa = "avx2";
#elif defined(POCKETLLM_ANY4_DECODE_NEON)
  const char* isa = "neon";
#else
  const char* isa = "scalar";
#endif
  std::printf("any4_decode_test (%s): %s\n", isa, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
