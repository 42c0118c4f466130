// pocketllm::silu_mul.out: y = g / (1 + exp(-g)) * u in fp32, eight lanes at a time with common.h's exp8 (Cephes'
// polynomial, relative error ~1e-7; torch's exp differs in the last bits: parity, not bit equality). Where exp(-g)
// would overflow (g < -88.4) exp8 saturates at ~2.4e38 and y is a denormal-sized number instead of torch's -0.
#include "silu_mul.h"

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

void silu_mul_span(const float* g, const float* u, int64_t b, int64_t e, float* y) {
  const v8f one = {1, 1, 1, 1, 1, 1, 1, 1};
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const v8f gv = load8(g + i);
    store8(y + i, gv / (one + exp8(-gv)) * load8(u + i));
  }
  for (; i < e; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

void silu_mul_f32(const float* gate, const float* up, int64_t n, float* y) {
  parallel_dynamic(n, kElementwiseTask, [&](int64_t b, int64_t e) { silu_mul_span(gate, up, b, e, y); });
}

Tensor& silu_mul_out(KernelRuntimeContext& ctx, const Tensor& gate, const Tensor& up, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, gate.scalar_type() == ScalarType::Float && up.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "silu_mul: gate and up must be float32");
  ET_KERNEL_CHECK_MSG(ctx, gate.sizes() == up.sizes(), InvalidArgument, out,
                      "silu_mul: gate and up must have one shape");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, gate.sizes()) == Error::Ok, InvalidArgument, out);
  silu_mul_f32(gate.const_data_ptr<float>(), up.const_data_ptr<float>(), gate.numel(),
               out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "silu_mul.out", pocketllm::silu_mul_out);

extern "C" void pocketllm_silu_mul(const float* gate, const float* up, int64_t n, float* y) {
  pocketllm::silu_mul_f32(gate, up, n, y);
}
