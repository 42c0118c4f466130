// panel_gemm.h (the prefill inner kernels of any4_linear and int8_linear) against a double-precision reference, on
// whatever ISA it is compiled for: AVX-512 or AVX2 (host), NEON (aarch64, under qemu), scalar (-mno-avx). Checks
// both layouts: panel_multiply (x rows x a k-major weight panel) and rows_multiply (weight rows x a token panel of
// x transposed by transpose_tokens), every tile height, ragged token counts, and the one-hot contract (a one-hot
// activation row returns the weight bit for bit). No ExecuTorch needed (tests/stub stands in for its header):
//   c++ -O2 -std=c++17 -march=native -ffp-contract=off -I kernels/tests/stub kernels/tests/panel_gemm_test.cpp
// tests/ops/test_int8_linear.py builds and runs it for every variant the machine can run.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../panel_gemm.h"

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

static const char* isa_name() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__FMA__)
  return "avx2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "scalar";
#endif
}

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// W [N, K] (small integers times a power of two: int8-like), x [M, K] with one-hot rows where onehot[m] >= 0.
static void check(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  std::uniform_int_distribution<int> q(-127, 127);
  std::normal_distribution<float> nd;
  std::vector<float> w(N * K), x(M * K);
  for (auto& v : w) v = static_cast<float>(q(rng)) * 0.0078125f;
  std::vector<int64_t> onehot(M, -1);
  for (int64_t m = 0; m < M; ++m) {
    if (m % 3 == 1) {
      onehot[m] = (m * 7) % K;
      for (int64_t k = 0; k < K; ++k) x[m * K + k] = k == onehot[m] ? 1.0f : 0.0f;
    } else {
      for (int64_t k = 0; k < K; ++k) x[m * K + k] = nd(rng);
    }
  }
  auto expect_near = [&](const char* what, int64_t m, int64_t n, float got) {
    double ref = 0, mag = 0;
    for (int64_t k = 0; k < K; ++k) {
      ref += static_cast<double>(x[m * K + k]) * w[n * K + k];
      mag += std::fabs(static_cast<double>(x[m * K + k]) * w[n * K + k]);
    }
    if (onehot[m] >= 0)
      EXPECT(same_bits(got, w[n * K + onehot[m]]), "%s M=%lld N=%lld K=%lld one-hot row %lld col %lld: %g vs %g",
             what, (long long)M, (long long)N, (long long)K, (long long)m, (long long)n, got, w[n * K + onehot[m]]);
    else
      EXPECT(std::fabs(got - ref) <= 1e-6 * mag + 1e-30, "%s M=%lld N=%lld K=%lld [%lld, %lld]: %.9g vs %.9g", what,
             (long long)M, (long long)N, (long long)K, (long long)m, (long long)n, got, ref);
  };

  // panel_multiply: W rows n0 .. n0+nr-1 as a k-major panel.
  {
    constexpr int64_t P = gemm::kPanel;
    std::vector<float> panel(K * P), y(M * N, NAN);
    for (int64_t n0 = 0; n0 < N; n0 += P) {
      const int64_t nr = std::min(P, N - n0);
      std::fill(panel.begin(), panel.end(), 0.0f);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t k = 0; k < K; ++k) panel[k * P + r] = w[(n0 + r) * K + k];
      gemm::panel_multiply(x.data(), M, K, panel.data(), y.data() + n0, N, nr);
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) expect_near("panel_multiply", m, n, y[m * N + n]);
  }
  // rows_multiply: blocks of kRows weight rows x token panels of x transposed.
  {
    constexpr int64_t TT = gemm::kTokens, R = gemm::kRows;
    const int64_t panels = (M + TT - 1) / TT;
    std::vector<float> xT(panels * K * TT), out(R * TT), y(M * N, NAN);
    gemm::transpose_tokens(x.data(), M, K, xT.data());
    for (int64_t n0 = 0; n0 < N; n0 += R) {
      const int64_t nr = std::min(R, N - n0);
      for (int64_t p = 0; p < panels; ++p) {
        gemm::rows_multiply(w.data() + n0 * K, nr, K, xT.data() + p * K * TT, out.data());
        for (int64_t c = 0; c < std::min(TT, M - p * TT); ++c)
          for (int64_t r = 0; r < nr; ++r) y[(p * TT + c) * N + n0 + r] = out[r * TT + c];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) expect_near("rows_multiply", m, n, y[m * N + n]);
  }
}

int main() {
  std::mt19937 rng(7);
  // Every tile height (N % kRows, M % kMR), token panels full and ragged, K odd and even.
  for (int64_t M : {2, 5, 9, 16, 33, 40})
    for (int64_t N : {1, 3, 7, 8, 13, 33})
      for (int64_t K : {1, 7, 64}) check(M, N, K, rng);
  std::printf("panel_gemm_test (%s): %d checks, %s\n", isa_name(), checks, failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
