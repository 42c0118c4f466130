// What the C++ benchmark drivers share: ExecuTorch's threadpool and opening a kernel library.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

// The wheel ships libexecutorch_threadpool.so but not extension/threadpool/threadpool.h; these members are all the
// drivers need (non-virtual, called through the pointer the library hands out).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

// `symbol` from the kernel library at `path` (dlopen'ed with local symbols, so a process times one build of it), with
// ExecuTorch's threadpool set to `threads`; exits (2) with a message when either is missing.
template <typename Fn>
Fn kernel_entry(const char* path, const char* symbol, int threads) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  void* fn = lib ? dlsym(lib, symbol) : nullptr;
  if (!fn) {
    std::fprintf(stderr, "%s: %s\n", path, dlerror());
    std::exit(2);
  }
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  return reinterpret_cast<Fn>(fn);
}

// argv[i] as a count >= 1, or `fallback` when absent; exits (2) with a message naming `what` otherwise.
inline int count_arg(int argc, char** argv, int i, int fallback, const char* what) {
  if (i >= argc) return fallback;
  char* end = nullptr;
  const long v = std::strtol(argv[i], &end, 10);
  if (end == argv[i] || *end != '\0' || v < 1 || v > 4096) {
    std::fprintf(stderr, "%s: expected a whole number from 1 to 4096, got '%s'\n", what, argv[i]);
    std::exit(2);
  }
  return static_cast<int>(v);
}
