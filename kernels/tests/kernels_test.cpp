// Hand-checkable cases for the raw kernels (no ExecuTorch runtime needed beyond the threadpool): each expected
// value below is derived in the comment next to it. Run: cmake -DPOCKETLLM_BUILD_TESTS=ON ... && ctest.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../any4_linear.h"
#include "../infllm_attention.h"
#include "../lightning_attention.h"

static int failures = 0;
#define CHECK_NEAR(a, b, tol)                                                                       \
  do {                                                                                              \
    if (std::fabs((a) - (b)) > (tol)) {                                                             \
      std::printf("%s:%d: %s = %.8g, expected %.8g\n", __FILE__, __LINE__, #a, (double)(a), (double)(b)); \
      ++failures;                                                                                   \
    }                                                                                               \
  } while (0)

// any4: one row, K = 4, one group: lut = [0, 1, ..., 15] - 8, s = 0.5, z = 1 -> W[c] = (c - 8) * 0.5 + 1.
// codes [3, 12, 8, 0] -> W = [-1.5, 3, 1, -3]; x = [1, 2, 3, 4] -> y = -1.5 + 6 + 3 - 12 = -4.5.
static void test_any4() {
  float lut[16];
  for (int c = 0; c < 16; ++c) lut[c] = c - 8.0f;
  const uint8_t q[2] = {3 | (12 << 4), 8 | (0 << 4)};
  const float s = 0.5f, z = 1.0f, x[4] = {1, 2, 3, 4};
  float y = 0;
  pocketllm::any4_linear_f32(x, q, lut, &s, &z, 1, 1, 4, 4, &y);
  CHECK_NEAR(y, -4.5f, 0.0f);
  float y2[2];
  const float x2[8] = {1, 2, 3, 4, 0, 0, 0, 1};  // second row of x picks W[3] = -3
  pocketllm::any4_linear_f32(x2, q, lut, &s, &z, 2, 1, 4, 4, y2);
  CHECK_NEAR(y2[0], -4.5f, 0.0f);
  CHECK_NEAR(y2[1], -3.0f, 0.0f);
}

// lightning: one head, D = 1, decay s = ln 2 (lambda = 1/2), state 4, q = k = v = 1 for T = 2 tokens:
// o_0 = q (lambda S0 + k v) = 2 + 1 = 3; S_1 = 3; o_1 = lambda S_1 + 1 = 2.5 = S_2.
static void test_lightning() {
  const float q[2] = {1, 1}, k[2] = {1, 1}, v[2] = {1, 1}, state = 4, decay = std::log(2.0f);
  for (int64_t block : {1, 256}) {
    float out[2], ns = 0;
    pocketllm::lightning_attention_f32(q, k, v, &state, &decay, 1, 2, 1, 1, block, out, &ns);
    CHECK_NEAR(out[0], 3.0f, 1e-6f);
    CHECK_NEAR(out[1], 2.5f, 1e-6f);
    CHECK_NEAR(ns, 2.5f, 1e-6f);
  }
}

// InfLLM v2: all keys equal, so every candidate block ties (under both score rules); 512 keys in 8 blocks of 64,
// kernel 32 / stride 16, init 1, window 64 (1 local block), topk 4 -> budget 5: forced {0, 6, 7}, then ties to the
// lower index {1, 2}.
static void test_infllm_ties() {
  const int64_t L = 512, D = 8;
  std::vector<float> q(2 * D, 1.0f), k(L * D, 1.0f);
  for (int64_t rule : {pocketllm::kInfllmScoresUpstream, pocketllm::kInfllmScoresExact}) {
    const pocketllm::InfllmParams p{32, 16, 64, 1, 64, 4, -1, rule};
    const int64_t n1 = pocketllm::infllm_num_kernels(L, 32, 16), n2 = pocketllm::infllm_num_kernels(L, 128, 64);
    std::vector<float> fine(pocketllm::infllm_kc_floats(n1, 1, D)), coarse(pocketllm::infllm_kc_floats(n2, 1, D));
    pocketllm::infllm_compress_keys(k.data(), 1, D, 32, 16, n1, 0, n1, fine.data());
    pocketllm::infllm_compress_keys(k.data(), 1, D, 128, 64, n2, 0, n2, coarse.data());
    const pocketllm::InfllmKeys keys{fine.data(), n1, n1, coarse.data(), n2, n2};
    std::vector<uint8_t> mask(8);
    pocketllm::infllm_select_blocks(q.data(), keys, 1, 2, 1, D, L - 1, p, mask.data());
    const uint8_t expected[8] = {1, 1, 1, 0, 0, 0, 1, 1};
    for (int b = 0; b < 8; ++b) CHECK_NEAR(mask[b], expected[b], 0);
    // attention over equal keys = mean of the values of the selected tokens: v = token index, 5 blocks selected,
    // tokens 0..191 and 384..511: mean = (sum 0..191 + sum 384..511) / 320 = (18336 + 57280) / 320 = 236.3.
    std::vector<float> v(L * D);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t d = 0; d < D; ++d) v[t * D + d] = static_cast<float>(t);
    std::vector<float> out(2 * D);
    pocketllm::infllm_attention_f32(q.data(), k.data(), v.data(), 1, 2, 1, D, L - 1, p, out.data());
    CHECK_NEAR(out[0], 236.3f, 1e-3f);
    CHECK_NEAR(out[2 * D - 1], 236.3f, 1e-3f);
  }
}

int main() {
  test_any4();
  test_lightning();
  test_infllm_ties();
  std::printf(failures ? "FAILED (%d)\n" : "all kernel tests passed\n", failures);
  return failures ? 1 : 0;
}
