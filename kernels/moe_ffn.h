// pocketllm::moe_ffn.out and pocketllm::moe_ffn_any4.out: the routed experts of a mixture-of-experts layer
// (schemas and math in export/ops/moe_ffn.py).
//
//   out[t] = sum_j w[t, j] * down_e(act(gate_e x[t]) * up_e x[t]),  e = ids[t, j],  act = relu | silu
//
// Only the routed experts' weights are read. Per call: the (token, slot) pairs are grouped by expert, each routed
// expert runs once over all its tokens (its weights stream from memory once), and each token's expert outputs are
// summed in fp32 in ascending expert order (the reference's order).
#pragma once

#include <cstdint>

namespace pocketllm {

enum class MoeActivation : int64_t { kReglu = 0, kSwiglu = 1 };

// Where each expert's weights are, and which experts a call runs (both structs below end with these fields).
//   expert_stride 0, slot nullptr: stacked tensors, expert e's block of each tensor at e x its size (the op's case).
//   expert_stride > 0: expert e's block of every tensor at byte offset block(e) x expert_stride from the tensor's
//     pointer: the tensors of one expert are interleaved in blocks of that stride (an expert store's file or slots,
//     kernels/expert_store.h), block(e) = slot ? slot[e] : e.
//   slot[e] < 0: expert e is left out of this call (its (token, slot) pairs are skipped);
//   accumulate: out is added to rather than overwritten. Together they split a call into batches of experts in
//     ascending id order with the same result bit for bit (each token's sum continues in the same order).

// Float experts: gate, up and down_t, each [E, F, H] (down_t[e] = down[e]^T, so a neuron's down weights are one
// contiguous row), all fp32 or all bf16 (bf16: uint16_t bit patterns).
struct MoeFloatExperts {
  const void* gate;
  const void* up;
  const void* down_t;
  bool bf16;
  int64_t num_experts, ffn;  // E, F
  int64_t expert_stride = 0;
  const int64_t* slot = nullptr;
  bool accumulate = false;
};

// One any4 projection stacked over the experts, checkpoint orientation [E, N out, K in]: codes [E, N, K/2] (low
// nibble = even column), LUT [E, N, 16] (bf16 or fp16 bit patterns), scales and zeros [E, N, G] (fp16 bit patterns
// or fp32, as MoeAny4Experts says); group size K / G.
struct Any4Stack {
  const uint8_t* qweight;
  const uint16_t* lut;
  const void* scales;
  const void* zeros;
  int64_t groups;  // G
};

// gate, up: N = F, K = H; down: N = H, K = F.
struct MoeAny4Experts {
  Any4Stack gate, up, down;
  bool lut_bf16;     // all three LUTs: true = bf16 bits, false = fp16 bits
  bool scales_fp16;  // all scales and zeros: true = fp16 bits, false = fp32
  int64_t num_experts, ffn;
  int64_t expert_stride = 0;
  const int64_t* slot = nullptr;
  bool accumulate = false;
};

// ReGLU neuron sparsity: a token's up row f (and, for float experts, its down row f) is not read when
// relu(gate_f . x) = 0. Exact: the result is the same bit for bit (skipped terms are exact zeros). Applies to experts
// with fewer than kPanelTokens tokens in the call (all of them in decode); the others run register-tiled panels.
//   kOff:    read every row.
//   kAuto:   skip when at most this share of a token's neurons is active (the `.out` kernels' mode): fp32 4/8, bf16
//            4/8, any4 6/8, measured on x86 only (phones: not yet). any4 (2026-12-02,
//            benchmarks/moe_ffn_decode_step.cpp, 4b-a0.6b's routed experts, off vs always, two rounds): 13 %
//            active 10.4 -> 8.7 ms (2 threads), 15.4 -> 11.9 (one); 50 % 10.0 -> 9.6, 14.5 -> 13.7; 72 % and 87 %
//            equal within noise. Only up rows are skipped for any4 (its down rows
//            cannot be, see moe_ffn.cpp). fp32 / bf16 (benchmarks/moe_ffn_speed.py, one layer, 2 threads, weights
//            from DRAM): at 48 % active, skipping bf16 0.90 vs 0.95 ms (0.44 vs 0.69 cache-warm), fp32 equal; higher
//            shares are not measured for them since kernels/prefetch.h, so they stay at half.
//   kAlways: skip whenever a gate is not positive.
enum class NeuronSparsity : int64_t { kOff = 0, kAuto = 1, kAlways = 2 };
constexpr int64_t kAutoSkipEighthsFp32 = 4, kAutoSkipEighthsBf16 = 4, kAutoSkipEighthsAny4 = 6;

// x [T, H] fp32, ids [T, k] (each in [0, E)), weights [T, k] fp32, out [T, H] fp32 (may not alias x).
// Both return false, writing nothing, when an expert id is out of range.
bool moe_ffn_float(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                   const MoeFloatExperts& experts, MoeActivation act, NeuronSparsity sparsity, float* out);
bool moe_ffn_any4(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                  const MoeAny4Experts& experts, MoeActivation act, NeuronSparsity sparsity, float* out);

// An expert with at least this many tokens in one call runs as panel x tile matrix products.
constexpr int64_t kPanelTokens = 4;

}  // namespace pocketllm
