// Software prefetch the compiler cannot drop. GCC 12 (-O3, x86-64) emitted none of moe_ffn's any4 row prefetches
// (__builtin_prefetch, inlined through a lambda and a row struct): the binary held not one prefetch instruction there,
// and ReGLU's skip path, which reads scattered rows, ran latency-bound (19.2 vs 14.4 ms for the routed experts of a
// 4b-a0.6b decode step at ~50 % active neurons, one thread; benchmarks/moe_ffn_decode_step.cpp). An asm statement is
// kept, and tests/test_kernel_library.py checks the built library for the instructions.
#pragma once

#include <cstdint>

namespace pocketllm {

// Bring the 64-byte line holding p towards the core (L1; a hint: no fault, no effect on results).
// x86 (SSE: the instruction's ISA; AT&T or Intel syntax), arm64 (64-bit register operand, also for ILP32 arm64_32),
// 32-bit ARM (pld); elsewhere the builtin, which a compiler may drop.
inline void prefetch_line(const void* p) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE__)
  asm volatile("{prefetcht0 (%0)|prefetcht0 [%0]}" ::"r"(p));
#elif defined(__aarch64__)
  asm volatile("prfm pldl1keep, [%x0]" ::"r"(reinterpret_cast<uintptr_t>(p)));
#elif defined(__arm__)
  asm volatile("pld [%0]" ::"r"(p));
#else
  __builtin_prefetch(p);
#endif
}

// Every line of [p, p + bytes).
inline void prefetch_range(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) prefetch_line(static_cast<const char*>(p) + off);
}

}  // namespace pocketllm
