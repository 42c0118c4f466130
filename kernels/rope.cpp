// pocketllm::rope.out: RoPE with the cos/sin rows of the tokens' positions, rotate-half layout (Llama / MiniCPM /
// Qwen): the two products and the sum are rounded one by one, as torch computes x * cos + rotate_half(x) * sin, so
// the result is the torch op's bit for bit. A decode call (one token, every head) runs on the calling thread.
#include "rope.h"

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

namespace {

void rope_row(const float* x, const float* c, const float* s, int64_t D, int64_t d, float* y) {
  const int64_t half = d / 2;
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const v8f lo = load8(x + j), hi = load8(x + half + j);
    store8(y + j, lo * load8(c + j) + (-hi) * load8(s + j));
    store8(y + half + j, hi * load8(c + half + j) + lo * load8(s + half + j));
  }
  for (; j < half; ++j) {
    const float lo = x[j], hi = x[half + j];
    y[j] = lo * c[j] + (-hi) * s[j];
    y[half + j] = hi * c[half + j] + lo * s[half + j];
  }
  for (j = d; j < D; ++j) y[j] = x[j];
}

}  // namespace

void rope_f32(const float* x, const float* cos, const float* sin, int64_t T, int64_t heads, int64_t D, int64_t d,
              float* y) {
  const int64_t block = std::max<int64_t>(1, kElementwiseTask / std::max<int64_t>(1, heads * D));
  parallel_dynamic(T, block, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t o = (t * heads + h) * D;
        rope_row(x + o, cos + t * d, sin + t * d, D, d, y + o);
      }
  });
}

Tensor& rope_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && x.dim() == 4 && x.size(0) == 1, InvalidArgument,
                      out, "rope: x must be float32 [1, T, heads, D]");
  const int64_t T = x.size(1), heads = x.size(2), D = x.size(3);
  ET_KERNEL_CHECK_MSG(ctx, cos.scalar_type() == ScalarType::Float && sin.scalar_type() == ScalarType::Float &&
                               cos.dim() >= 1 && cos.numel() == sin.numel(), InvalidArgument, out,
                      "rope: cos and sin must be float32 of one shape");
  const int64_t d = cos.size(cos.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, d % 2 == 0 && d <= D && cos.numel() == T * d, InvalidArgument, out,
                      "rope: cos and sin must be [1, T, 1, d] with d even and d <= D");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out);
  rope_f32(x.const_data_ptr<float>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), T, heads, D, d,
           out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "rope.out", pocketllm::rope_out);

extern "C" void pocketllm_rope(const float* x, const float* cos, const float* sin, int64_t T, int64_t heads,
                               int64_t D, int64_t d, float* y) {
  pocketllm::rope_f32(x, cos, sin, T, heads, D, d, y);
}
