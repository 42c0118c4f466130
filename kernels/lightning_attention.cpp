// pocketllm::lightning_attention.out: lightning attention (MiniMax linear-attention layers), CPU, fp32.
//
// Per (batch, head), in blocks of n <= block_size tokens starting from state S:
//   o_i = sum_{j <= i} (q_i . k_j) lambda^(i-j) v_j + (q_i lambda^(i+1)) S
//   S   = lambda^n S + sum_j (k_j lambda^(n-1-j))^T v_j,       lambda^a = exp(-s * a)
// exactly the reference's block form (export/ops/lightning_attention.py). (batch, head) pairs run in parallel on
// ExecuTorch's threadpool. Two outputs (out, new_state): registered as a boxed kernel, since the unboxed wrapper
// takes a single out tensor.
#include "lightning_attention.h"

#include <cmath>
#include <vector>

#include <executorch/runtime/kernel/operator_registry.h>

#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

void lightning_attention_f32(const float* q, const float* k, const float* v, const float* state, const float* decay,
                             int64_t B, int64_t T, int64_t H, int64_t D, int64_t block_size, float* out,
                             float* new_state) {
  const int64_t tok = H * D;  // stride between tokens in q/k/v/out
  parallel(B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(D * D), att(block_size), qd(D), kd(D), qdec(block_size), kdec(block_size), inter(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const float s = decay[h];
      const float* S0 = state + (b * H + h) * D * D;
      std::copy(S0, S0 + D * D, S.begin());
      for (int64_t start = 0; start < T; start += block_size) {
        const int64_t n = std::min(block_size, T - start);
        for (int64_t i = 0; i < n; ++i) {
          qdec[i] = std::exp(-s * static_cast<float>(i + 1));
          kdec[i] = std::exp(-s * static_cast<float>(n - 1 - i));
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t ti = (b * T + start + i) * tok + h * D;
          const float* qi = q + ti;
          float* oi = out + ti;
          // intra-block: a_ij = (q_i . k_j) * lambda^(i-j), then sum_j a_ij v_j
          for (int64_t j = 0; j <= i; ++j) {
            const float* kj = k + (b * T + start + j) * tok + h * D;
            att[j] = dot(qi, kj, D) * std::exp(-s * static_cast<float>(i - j));
          }
          std::fill(oi, oi + D, 0.0f);
          for (int64_t j = 0; j <= i; ++j) axpy(oi, att[j], v + (b * T + start + j) * tok + h * D, D);
          // inter-block: (q_i * lambda^(i+1)) S
          for (int64_t c = 0; c < D; ++c) qd[c] = qi[c] * qdec[i];
          std::fill(inter.begin(), inter.end(), 0.0f);
          for (int64_t r = 0; r < D; ++r) axpy(inter.data(), qd[r], S.data() + r * D, D);
          for (int64_t c = 0; c < D; ++c) oi[c] += inter[c];
        }
        // S = lambda^n S + sum_j (k_j lambda^(n-1-j))^T v_j
        const float total = std::exp(-s * static_cast<float>(n));
        for (int64_t e = 0; e < D * D; ++e) S[e] *= total;
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = k + (b * T + start + j) * tok + h * D;
          const float* vj = v + (b * T + start + j) * tok + h * D;
          for (int64_t c = 0; c < D; ++c) kd[c] = kj[c] * kdec[j];
          for (int64_t r = 0; r < D; ++r) axpy(S.data() + r * D, kd[r], vj, D);
        }
      }
      std::copy(S.begin(), S.end(), new_state + (b * H + h) * D * D);
    }
  });
}

namespace {

// Boxed: stack = q, k, v, state, decay, block_size, out, new_state (+ the returned values, aliases of the outs).
void lightning_attention_out_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() < 8) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const Tensor& state = stack[3]->toTensor();
  const Tensor& decay = stack[4]->toTensor();
  const int64_t block_size = stack[5]->toInt();
  Tensor& out = stack[6]->toTensor();
  Tensor& new_state = stack[7]->toTensor();
  const bool ok = q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes() && state.dim() == 4 &&
                  state.size(0) == q.size(0) && state.size(1) == q.size(2) && state.size(2) == q.size(3) &&
                  state.size(3) == q.size(3) && decay.dim() == 1 && decay.size(0) == q.size(2) && block_size > 0 &&
                  q.scalar_type() == ScalarType::Float && k.scalar_type() == ScalarType::Float &&
                  v.scalar_type() == ScalarType::Float && state.scalar_type() == ScalarType::Float &&
                  decay.scalar_type() == ScalarType::Float;
  if (!ok) {
    ET_LOG(Error, "lightning_attention: expected fp32 q, k, v [B, T, H, D], state [B, H, D, D], decay [H]");
    ctx.fail(Error::InvalidArgument);
    return;
  }
  if (executorch::runtime::resize_tensor(out, q.sizes()) != Error::Ok ||
      executorch::runtime::resize_tensor(new_state, state.sizes()) != Error::Ok) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  // new_state may alias state (in-place update): run on a copy of the incoming state.
  std::vector<float> s0(state.const_data_ptr<float>(), state.const_data_ptr<float>() + state.numel());
  lightning_attention_f32(q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(),
                          s0.data(), decay.const_data_ptr<float>(), q.size(0), q.size(1), q.size(2), q.size(3),
                          block_size, out.mutable_data_ptr<float>(), new_state.mutable_data_ptr<float>());
}

const auto registered = executorch::runtime::register_kernel(
    executorch::runtime::Kernel("pocketllm::lightning_attention.out", lightning_attention_out_boxed));

}  // namespace
}  // namespace pocketllm

extern "C" void pocketllm_lightning_attention(const float* q, const float* k, const float* v, const float* state,
                                              const float* decay, int64_t B, int64_t T, int64_t H, int64_t D,
                                              int64_t block_size, float* out, float* new_state) {
  pocketllm::lightning_attention_f32(q, k, v, state, decay, B, T, H, D, block_size, out, new_state);
}
