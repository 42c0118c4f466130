// pocketllm::rms_norm.out: RMSNorm over the last dimension in fp32, as export/nn/norm.py computes it:
//   r = 1 / sqrt(sum(x^2) / H + eps);  y = (x * r) * weight     (two roundings per element, no fused multiply-add)
// The sum of squares runs in 16 fp32 lanes (torch sums in its own order: parity, not bit equality). A decode call
// (one row) runs on the calling thread: waking a helper costs more than the ~1K multiply-adds of a row.
#include "rms_norm.h"

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

void norm_row(const float* x, const float* w, int64_t H, float eps, float* y) {
  v8f a0 = {0}, a1 = {0};
  int64_t j = 0;
  for (; j + 16 <= H; j += 16) {
    const v8f u = load8(x + j), v = load8(x + j + 8);
    a0 += u * u;
    a1 += v * v;
  }
  float ss = hsum8(a0 + a1);
  for (; j < H; ++j) ss += x[j] * x[j];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
  const v8f rv = {r, r, r, r, r, r, r, r};
  j = 0;
  for (; j + 8 <= H; j += 8) store8(y + j, (load8(x + j) * rv) * load8(w + j));
  for (; j < H; ++j) y[j] = (x[j] * r) * w[j];
}

}  // namespace

void rms_norm_f32(const float* x, const float* weight, int64_t rows, int64_t H, float eps, float* y) {
  const int64_t block = std::max<int64_t>(1, kElementwiseTask / std::max<int64_t>(1, H));
  parallel_dynamic(rows, block, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) norm_row(x + t * H, weight, H, eps, y + t * H);
  });
}

Tensor& rms_norm_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() >= 1, InvalidArgument, out,
                      "rms_norm: x must be float32 [..., H]");
  const int64_t H = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, weight.scalar_type() == ScalarType::Float && weight.numel() == H, InvalidArgument, out,
                      "rms_norm: weight must be float32 [H]");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out);
  rms_norm_f32(x.const_data_ptr<float>(), weight.const_data_ptr<float>(), H ? x.numel() / H : 0, H,
               static_cast<float>(eps), out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "rms_norm.out", pocketllm::rms_norm_out);

extern "C" void pocketllm_rms_norm(const float* x, const float* weight, int64_t rows, int64_t H, float eps,
                                   float* y) {
  pocketllm::rms_norm_f32(x, weight, rows, H, eps, y);
}
