// IEEE binary16 <-> binary32 in plain C++ (no ExecuTorch, no intrinsics): the scalar fallback of the SIMD widening
// paths (any4's fp16 LUTs, the fp16 KV cache of infllm_attention).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace pocketllm {

// Exact IEEE binary16 -> binary32.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    return sign ? -f : f;
  }
  bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112u) << 23) | (man << 13));
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace pocketllm
