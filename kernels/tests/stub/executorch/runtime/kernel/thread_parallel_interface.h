// Stand-in for ExecuTorch's header, so that kernels/tests/*.cpp can include common.h (and panel_gemm.h) without an
// ExecuTorch build: one thread. Only the standalone tests use it (-I kernels/tests/stub).
#pragma once
#include <cstdint>

namespace executorch::extension {
inline int64_t get_thread_count() { return 1; }
}  // namespace executorch::extension
