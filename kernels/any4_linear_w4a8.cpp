// pocketllm::any4_linear_w4a8.out: any4 weights x dynamic int8 activations, CPU. The math (activation
// quantization, integer dot products per ISA, the float part in a fixed order) is kernels/any4_linear_w4a8_core.h;
// this file checks arguments, quantizes the tokens once per call and hands blocks of rows to ExecuTorch's
// threadpool. Build with -ffp-contract=off (CMakeLists.txt does).
#include "any4_linear_w4a8.h"

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>

#include "any4_linear_w4a8_core.h"
#include "common.h"

namespace pocketllm {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kMaxGroup = 65536;  // keeps every int32 partial sum (at most 255 * 127 * g) in range

void any4_linear_w4a8_f32(const float* x, const uint8_t* qweight, const int8_t* lut_i8, const float* lut_scale,
                          const uint16_t* scales, const uint16_t* zeros, int64_t M, int64_t N, int64_t K,
                          int64_t group_size, float* y) {
  // The calling thread's buffers, reused from call to call (a decode step calls every linear once). The lambdas
  // below must see this thread's object: they capture the reference `act` (a thread_local named inside a lambda
  // would be the worker thread's own).
  thread_local w4a8::Activations caller_act;
  w4a8::Activations& act = caller_act;
  act.resize(M, K, group_size);
  // Tokens are quantized once (in parallel when there are many), then every row reads them.
  thread_local std::vector<int8_t> scratch;
  scratch.resize(K);
  if (M == 1) {
    act.quantize(x, 0, 1, scratch.data());
  } else {
    parallel(M, std::max<int64_t>(1, 16384 / K), [&](int64_t b, int64_t e) {
      std::vector<int8_t> local(K);
      act.quantize(x, b, e, local.data());
    });
  }
  const w4a8::Weights w{qweight, lut_i8, lut_scale, scales, zeros, N, K, group_size};
  // Blocks of 16 rows or more (a multiple of the 8-row scale blocks): common.h's decode_rows_per_block for one
  // token (long contiguous runs per thread), 16 for prefill (2 or 4 tiles).
  parallel_dynamic(N, M == 1 ? decode_rows_per_block(N) : 16, [&](int64_t b, int64_t e) {
    thread_local w4a8::Scratch scratch;
    w4a8::linear_rows(w, act, b, e, y, scratch);
  });
}

Tensor& any4_linear_w4a8_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& qweight, const Tensor& lut_i8,
                             const Tensor& lut_scale, const Tensor& scales, const Tensor& zeros, int64_t group_size,
                             Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "any4_linear_w4a8: x must be float32");
  ET_KERNEL_CHECK_MSG(ctx, qweight.dim() == 2 && qweight.scalar_type() == ScalarType::Byte, InvalidArgument, out,
                      "any4_linear_w4a8: qweight must be uint8 [N, K/2]");
  const int64_t N = qweight.size(0), K = 2 * qweight.size(1);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() >= 1 && x.size(x.dim() - 1) == K, InvalidArgument, out,
                      "any4_linear_w4a8: x's last dimension must equal K");
  ET_KERNEL_CHECK_MSG(ctx, group_size > 0 && group_size <= kMaxGroup && K % group_size == 0, InvalidArgument, out,
                      "any4_linear_w4a8: group_size must divide K and be at most 65536");
  const int64_t G = K / group_size;
  ET_KERNEL_CHECK_MSG(ctx, lut_i8.scalar_type() == ScalarType::Char && lut_i8.numel() == N * 16, InvalidArgument,
                      out, "any4_linear_w4a8: lut_i8 must be int8 [N, 16]");
  ET_KERNEL_CHECK_MSG(ctx, lut_scale.scalar_type() == ScalarType::Float && lut_scale.numel() == N, InvalidArgument,
                      out, "any4_linear_w4a8: lut_scale must be float32 [N]");
  const int64_t blocked = (N + w4a8::kRowBlock - 1) / w4a8::kRowBlock * w4a8::kRowBlock * G;
  ET_KERNEL_CHECK_MSG(ctx,
                      scales.scalar_type() == ScalarType::Half && zeros.scalar_type() == ScalarType::Half &&
                          scales.numel() == blocked && zeros.numel() == blocked,
                      InvalidArgument, out, "any4_linear_w4a8: scales and zeros must be float16 [ceil(N/8), K/g, 8]");
  executorch::aten::SizesType sizes[16];
  ET_KERNEL_CHECK(ctx, x.dim() <= 16, InvalidArgument, out);
  for (int64_t d = 0; d + 1 < x.dim(); ++d) sizes[d] = x.size(d);
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(N);
  ET_KERNEL_CHECK(ctx,
                  executorch::runtime::resize_tensor(out, {sizes, static_cast<size_t>(x.dim())}) == Error::Ok,
                  InvalidArgument, out);
  any4_linear_w4a8_f32(x.const_data_ptr<float>(), qweight.const_data_ptr<uint8_t>(), lut_i8.const_data_ptr<int8_t>(),
                       lut_scale.const_data_ptr<float>(), static_cast<const uint16_t*>(scales.const_data_ptr()),
                       static_cast<const uint16_t*>(zeros.const_data_ptr()), x.numel() / K, N, K, group_size,
                       out.mutable_data_ptr<float>());
  return out;
}

}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "any4_linear_w4a8.out", pocketllm::any4_linear_w4a8_out);

// C entry points for tests (ctypes).
extern "C" void pocketllm_any4_linear_w4a8(const float* x, const uint8_t* qweight, const int8_t* lut_i8,
                                           const float* lut_scale, const uint16_t* scales, const uint16_t* zeros,
                                           int64_t M, int64_t N, int64_t K, int64_t group_size, float* y) {
  pocketllm::any4_linear_w4a8_f32(x, qweight, lut_i8, lut_scale, scales, zeros, M, N, K, group_size, y);
}

// The integer side of the activations: xq [M, K] in natural column order, B [M, K/g], sx [M], finite [M].
extern "C" void pocketllm_any4_linear_w4a8_quantize(const float* x, int64_t M, int64_t K, int64_t group_size,
                                                    int8_t* xq, int32_t* bsum, float* sx, uint8_t* finite) {
  pocketllm::w4a8::Activations act;
  act.resize(M, K, group_size);
  std::vector<int8_t> scratch(K);
  act.quantize(x, 0, M, scratch.data());
  const int64_t block = pocketllm::w4a8::block_cols(group_size);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t j = 0; j < K; ++j) xq[t * K + j] = act.xq[t * K + pocketllm::w4a8::block_position(j, block)];
  std::copy(act.bsum.begin(), act.bsum.end(), bsum);
  std::copy(act.sx.begin(), act.sx.end(), sx);
  std::copy(act.finite.begin(), act.finite.end(), finite);
}

extern "C" const char* pocketllm_any4_linear_w4a8_isa() { return pocketllm::w4a8::isa_name(); }
