// pocketllm::any4_linear_w4a8 math (kernels/any4_linear_w4a8_core.h) against a plain scalar reference written here
// from the definition (export/ops/any4_linear_w4a8.py), bit for bit, on whatever ISA it is compiled for:
//   c++ -O2 -std=c++17 -march=native -ffp-contract=off kernels/tests/any4_w4a8_test.cpp -o /tmp/t && /tmp/t
//   (-mavx2 -mfma -mf16c: the AVX2 path without VNNI; -mno-avx: portable)
//   aarch64-linux-gnu-g++ -O2 -std=c++17 -ffp-contract=off -static [-march=armv8.2-a+dotprod] ... && qemu-aarch64 /tmp/t
// tests/ops/test_any4_linear_w4a8.py builds and runs it for every variant the machine can run.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../any4_linear_w4a8_core.h"

using namespace pocketllm;

static int failures = 0, checks = 0;
#define EXPECT(cond, ...)                         \
  do {                                            \
    ++checks;                                     \
    if (!(cond)) {                                \
      std::printf("%s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                   \
      std::printf("\n");                          \
      ++failures;                                 \
    }                                             \
  } while (0)

// fp16 bits of v rounded to nearest (|v| < 2^15; subnormals too).
static uint16_t to_half(float v) {
  if (v == 0.0f) return 0;
  const int e = std::max(std::ilogb(v), -14);
  const float r = std::ldexp(std::nearbyint(std::ldexp(v, 10 - e)), e - 10);
  uint16_t h = 0;
  EXPECT(any4::float_to_half_exact(r, &h), "to_half(%g)", double(v));
  return h;
}

struct Problem {
  int64_t M, N, K, g;
  std::vector<float> x;         // [M][K]
  std::vector<uint8_t> q;       // [N][K/2]
  std::vector<int8_t> lut;      // [N][16]
  std::vector<float> ls;        // [N]
  std::vector<uint16_t> s, z;   // [N][G] fp16 bits
};

// The definition, scalar, natural column order.
static void reference(const Problem& p, std::vector<float>& y, std::vector<int8_t>& xq, std::vector<int32_t>& B,
                      std::vector<float>& sx) {
  const int64_t M = p.M, N = p.N, K = p.K, g = p.g, G = K / g;
  y.assign(M * N, 0.0f), xq.assign(M * K, 0), B.assign(M * G, 0), sx.assign(M, 0.0f);
  for (int64_t t = 0; t < M; ++t) {
    const float* x = &p.x[t * K];
    float amax = 0.0f;
    bool finite = true;
    for (int64_t j = 0; j < K; ++j) {
      finite = finite && std::isfinite(x[j]);
      amax = std::max(amax, std::fabs(x[j]));
    }
    sx[t] = finite ? amax / 127.0f : 0.0f;
    for (int64_t j = 0; sx[t] != 0.0f && j < K; ++j) {
      const float r = std::nearbyint(x[j] / sx[t]);
      xq[t * K + j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
    }
    for (int64_t j = 0; j < K; ++j) B[t * G + j / g] += xq[t * K + j];
    for (int64_t i = 0; i < N; ++i) {
      float acc = 0.0f;
      for (int64_t gi = 0; gi < G; ++gi) {
        int32_t A = 0;
        for (int64_t j = gi * g; j < (gi + 1) * g; ++j) {
          const int code = (p.q[i * K / 2 + j / 2] >> (4 * (j % 2))) & 15;
          A += int32_t(xq[t * K + j]) * p.lut[i * 16 + code];
        }
        const float d = p.ls[i] * any4::half_to_float(p.s[i * G + gi]);
        const float pa = float(A) * d;
        const float pb = float(B[t * G + gi]) * any4::half_to_float(p.z[i * G + gi]);
        acc = acc + (pa + pb);
      }
      y[t * N + i] = finite ? acc * sx[t] : NAN;
    }
  }
}

enum class Fill { kRandom, kExtreme };

static Problem make(int64_t M, int64_t N, int64_t K, int64_t g, uint32_t seed, Fill fill = Fill::kRandom) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  Problem p{M, N, K, g, {}, {}, {}, {}, {}, {}};
  const int64_t G = K / g;
  p.x.resize(M * K), p.q.resize(N * K / 2), p.lut.resize(N * 16), p.ls.resize(N), p.s.resize(N * G), p.z.resize(N * G);
  for (auto& b : p.q) b = static_cast<uint8_t>(rng() & 0xff);
  for (int64_t i = 0; i < N; ++i) {
    for (int c = 0; c < 16; ++c)
      p.lut[i * 16 + c] = fill == Fill::kExtreme ? (rng() & 1 ? 127 : -127)
                                                 : static_cast<int8_t>(int(rng() % 255) - 127);
    p.ls[i] = 0.05f + 0.02f * u(rng);
  }
  for (int64_t i = 0; i < N * G; ++i) {
    p.s[i] = to_half(0.005f + 0.02f * u(rng));
    p.z[i] = to_half(0.1f * normal(rng));
  }
  for (int64_t t = 0; t < M; ++t)
    for (int64_t j = 0; j < K; ++j)
      p.x[t * K + j] = fill == Fill::kExtreme ? (rng() & 1 ? 3.0f : -3.0f) : normal(rng);
  if (fill == Fill::kRandom && M > 1) {
    std::fill(p.x.begin() + K, p.x.begin() + 2 * K, 0.0f);  // token 1: all zeros
    p.x[(M - 1) * K + K / 3] = 60.0f;                       // last token: one outlier
  }
  return p;
}

static bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

static void check(const Problem& p, const char* what) {
  std::vector<float> want, sx;
  std::vector<int8_t> xq;
  std::vector<int32_t> B;
  reference(p, want, xq, B, sx);
  const int64_t G = p.K / p.g;
  w4a8::Activations a;
  a.resize(p.M, p.K, p.g);
  std::vector<int8_t> scratch(p.K);
  a.quantize(p.x.data(), 0, p.M, scratch.data());
  const int64_t block = w4a8::block_cols(p.g);
  for (int64_t t = 0; t < p.M; ++t) {
    EXPECT(a.sx[t] == sx[t], "%s: token %lld sx %.9g vs %.9g", what, (long long)t, double(a.sx[t]), double(sx[t]));
    for (int64_t j = 0; j < p.K; ++j) {
      const int8_t got = a.xq[t * p.K + w4a8::block_position(j, block)];
      if (got != xq[t * p.K + j]) {
        EXPECT(false, "%s: token %lld xq[%lld] = %d vs %d", what, (long long)t, (long long)j, got, xq[t * p.K + j]);
        break;
      }
    }
    for (int64_t gi = 0; gi < G; ++gi)
      EXPECT(a.bsum[t * G + gi] == B[t * G + gi], "%s: token %lld B[%lld]", what, (long long)t, (long long)gi);
  }
  // scales and zeros in blocks of 8 rows, [ceil(N / 8)][G][8], padded with zeros
  const int64_t blocks = (p.N + 7) / 8;
  std::vector<uint16_t> sb(blocks * G * 8, 0), zb(blocks * G * 8, 0);
  for (int64_t i = 0; i < p.N; ++i)
    for (int64_t gi = 0; gi < G; ++gi) {
      sb[((i / 8) * G + gi) * 8 + i % 8] = p.s[i * G + gi];
      zb[((i / 8) * G + gi) * 8 + i % 8] = p.z[i * G + gi];
    }
  w4a8::Weights w{p.q.data(), p.lut.data(), p.ls.data(), sb.data(), zb.data(), p.N, p.K, p.g};
  std::vector<float> y(p.M * p.N, -1.0f);
  w4a8::Scratch s;
  // two row ranges, as threads split the rows (at a multiple of 8)
  const int64_t split = std::min<int64_t>(p.N, 8);
  w4a8::linear_rows(w, a, 0, split, y.data(), s);
  w4a8::linear_rows(w, a, split, p.N, y.data(), s);
  int bad = 0;
  for (int64_t k = 0; k < p.M * p.N; ++k)
    if (!same(y[k], want[k]) && bad++ < 3)
      EXPECT(false, "%s M=%lld N=%lld K=%lld g=%lld: y[%lld][%lld] = %.9g, expected %.9g", what, (long long)p.M,
             (long long)p.N, (long long)p.K, (long long)p.g, (long long)(k / p.N), (long long)(k % p.N),
             double(y[k]), double(want[k]));
  ++checks;
}

int main() {
  // group sizes 32..256 and one group per row; K a multiple of the group size but not of 64; rows not a multiple
  // of 4; one token (decode) and several (prefill: pairs plus an odd one)
  const int64_t shapes[][3] = {{128, 32, 0}, {96, 32, 0}, {224, 32, 0}, {256, 64, 0}, {192, 64, 0}, {384, 128, 0},
                               {1024, 128, 0}, {256, 256, 0}, {160, 160, 0}, {512, 512, 0}, {48, 16, 0},
                               {20, 2, 0},   {2048, 2048, 0}};
  for (const auto& sh : shapes)
    for (int64_t M : {1, 2, 5, 11})
      for (int64_t N : {4, 7, 13, 24}) {
        char what[64];
        std::snprintf(what, sizeof what, "random");
        check(make(M, N, sh[0], sh[1], static_cast<uint32_t>(M * 1000 + N * 10 + sh[0])), what);
      }
  // |xq| = 127 and |lut_i8| = 127 everywhere: the largest int16 pairs (vpmaddubsw) and int32 sums
  for (int64_t g : {32, 64, 128, 4096})
    for (int64_t M : {1, 3}) check(make(M, 6, 4096, g, 7 + g, Fill::kExtreme), "extreme");
  // NaN and inf tokens give NaN rows; an all-zero LUT row (ls = 0) leaves only the zero term
  {
    Problem p = make(4, 9, 256, 64, 99);
    p.x[1 * 256 + 17] = NAN;
    p.x[2 * 256 + 3] = INFINITY;
    std::fill(p.lut.begin() + 16, p.lut.begin() + 32, 0);
    p.ls[1] = 0.0f;
    check(p, "nonfinite");
    Problem d = p;
    d.M = 1, d.x.assign(p.x.begin() + 256, p.x.begin() + 512);  // the NaN token alone
    check(d, "nonfinite decode");
  }
  std::printf("any4_w4a8_test (%s): %d checks, %s\n", w4a8::isa_name(), checks, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
