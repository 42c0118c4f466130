// A minimal LLM decode driver for benchmarks/moe_speed.py: loads a bundle's .pte with ExecuTorch's Module (C++, no
// Python and no torch in the process, as in an app), optionally opens the bundle's expert store with a budget,
// prefills a prompt of random token ids, then decodes greedily, and prints one JSON line: prefill and decode tok/s,
// resident memory at each stage (VmRSS) and the peak of the decode phase (VmHWM, reset after loading by writing 5 to
// /proc/self/clear_refs), and the expert store's statistics.
//
// llama::update_cache / llama::custom_sdpa come from the wheel's libcustom_ops_aot_lib.so, which links libtorch; its
// load adds ~110 MiB of libtorch's static data to the process that an app (built with the llama ops, no libtorch) does
// not carry. The driver reports that cost (rss_after_libraries_mib) so that it can be told apart.
//
// Build (benchmarks/moe_speed.py does it):
//   ET=.venv/lib/python3.11/site-packages/executorch
//   c++ -O2 -std=c++17 -I$ET/include -I$ET/include/executorch/runtime/core/portable_type/c10
//       -DC10_USING_CUSTOM_GENERATED_MACROS benchmarks/moe_decode.cpp -o out/moe_decode -L$ET/lib -lexecutorch
//       -lexecutorch_threadpool -lexecutorch_backend_xnnpack -lexecutorch_kernels_optimized -Wl,-rpath,$ET/lib -ldl
//       -Wl,--no-as-needed                                                                       (one command line)
// Run: out/moe_decode PTE KERNELS_SO CUSTOM_OPS_SO THREADS PROMPT DECODE [--chunk N] [--store EXPERTS_BIN MIB PREFETCH]
//      [--load mmap|mlock|file] [--preload LIBPYTHON]
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/exec_aten/exec_aten.h>

#include "driver_common.h"  // ExecuTorch's threadpool

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::etensor::TensorImpl;

namespace {

double status_mib(const char* key) {  // VmRSS / VmHWM of this process, MiB
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) return std::atof(line.c_str() + std::strlen(key)) / 1024.0;
  return -1;
}

bool reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
  return static_cast<bool>(f);
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Int64Tensor {
  TensorImpl::SizesType sizes[2];
  TensorImpl::DimOrderType dim_order[2] = {0, 1};
  TensorImpl::StridesType strides[2];
  TensorImpl impl;
  Int64Tensor(int64_t* data, int dim, int a, int b)
      : sizes{a, b}, strides{b, 1}, impl(ScalarType::Long, dim, sizes, data, dim_order, strides + (dim == 1)) {}
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s PTE KERNELS_SO CUSTOM_OPS_SO THREADS PROMPT DECODE [--chunk N] "
                         "[--store EXPERTS_BIN MIB PREFETCH] [--load mmap|mlock|file]\n", argv[0]);
    return 2;
  }
  const std::string pte = argv[1];
  const int threads = std::atoi(argv[4]), prompt = std::atoi(argv[5]), decode = std::atoi(argv[6]);
  int chunk = prompt;
  std::string store_path, load = "mmap";
  double budget_mib = 0;
  int prefetch = 1;
  for (int i = 7; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--chunk" && i + 1 < argc) chunk = std::atoi(argv[++i]);
    else if (a == "--load" && i + 1 < argc) load = argv[++i];
    else if (a == "--preload" && i + 1 < argc) ++i;
    else if (a == "--store" && i + 3 < argc) {
      store_path = argv[++i];
      budget_mib = std::atof(argv[++i]);
      prefetch = std::atoi(argv[++i]);
    }
  }
  const double rss_start = status_mib("VmRSS:");
  for (int i = 7; i + 1 < argc; ++i)  // --preload LIB: libpython for the custom ops library's torch_python dependency
    if (std::string(argv[i]) == "--preload" && !dlopen(argv[i + 1], RTLD_NOW | RTLD_GLOBAL)) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 2;
    }
  for (const char* lib : {argv[3], argv[2]}) {  // llama::update_cache / custom_sdpa, then pocketllm's kernels
    if (!dlopen(lib, RTLD_NOW | RTLD_GLOBAL)) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 2;
    }
  }
  void* kernels = dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL);
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  const double rss_libraries = status_mib("VmRSS:");

  using Open = int (*)(const char*, int64_t, int64_t, char*, char*, int64_t);
  using Stats = int (*)(const char*, int64_t*);
  char id[33] = {0}, err[512] = {0};
  if (!store_path.empty()) {
    auto open = reinterpret_cast<Open>(dlsym(kernels, "pocketllm_expert_store_open"));
    if (!open(store_path.c_str(), static_cast<int64_t>(budget_mib * 1048576.0), prefetch, id, err, sizeof(err))) {
      std::fprintf(stderr, "%s\n", err);
      return 2;
    }
  }
  const double t_load = now_s();
  const Module::LoadMode mode = load == "file" ? Module::LoadMode::File
                                : load == "mlock" ? Module::LoadMode::MmapUseMlockIgnoreErrors
                                                  : Module::LoadMode::Mmap;
  Module module(pte, mode);
  if (module.load_method("forward") != executorch::runtime::Error::Ok) {
    std::fprintf(stderr, "could not load forward from %s\n", pte.c_str());
    return 2;
  }
  const double load_s = now_s() - t_load;
  const double rss_loaded = status_mib("VmRSS:"), peak_load = status_mib("VmHWM:");
  const bool peak_reset = reset_peak();

  int64_t vocab = 0;
  if (auto v = module.execute("get_vocab_size"); v.ok()) vocab = v.get()[0].toInt();
  std::mt19937 rng(0);
  std::vector<int64_t> ids(prompt + decode);
  for (auto& t : ids) t = static_cast<int64_t>(rng() % std::max<int64_t>(vocab, 1));
  auto forward = [&](int64_t start, int n) -> int64_t {  // tokens ids[start, start + n) -> argmax of the last row
    Int64Tensor tok(ids.data() + start, 2, 1, n);
    int64_t pos_value = start;
    Int64Tensor pos(&pos_value, 1, 1, 1);
    auto out = module.execute("forward", {EValue(Tensor(&tok.impl)), EValue(Tensor(&pos.impl))});
    if (!out.ok()) {
      std::fprintf(stderr, "forward failed at %lld (0x%x)\n", static_cast<long long>(start),
                   static_cast<unsigned>(out.error()));
      std::exit(3);
    }
    const Tensor logits = out.get()[0].toTensor();
    vocab = logits.size(2);
    const float* row = logits.const_data_ptr<float>() + static_cast<int64_t>(n - 1) * vocab;
    return std::max_element(row, row + vocab) - row;
  };
  const double t_prefill = now_s();
  int64_t next = 0;
  for (int s = 0; s < prompt; s += chunk) next = forward(s, std::min(chunk, prompt - s));
  const double prefill_s = now_s() - t_prefill;
  std::vector<double> step_s;
  for (int i = 0; i < decode; ++i) {
    ids[prompt + i] = next;
    const double t0 = now_s();
    next = forward(prompt + i, 1);
    step_s.push_back(now_s() - t0);
  }
  double decode_s = 0;
  for (double s : step_s) decode_s += s;
  std::vector<double> sorted = step_s;
  std::sort(sorted.begin(), sorted.end());

  std::printf("{\"pte\": \"%s\", \"load\": \"%s\", \"threads\": %d, \"prompt\": %d, \"chunk\": %d, \"decode\": %d, "
              "\"load_s\": %.3f, \"prefill_s\": %.4f, \"prefill_tok_s\": %.3f, \"decode_s\": %.4f, "
              "\"decode_tok_s\": %.3f, \"decode_median_ms\": %.3f, \"rss_start_mib\": %.1f, "
              "\"rss_after_libraries_mib\": %.1f, \"rss_loaded_mib\": %.1f, \"peak_load_mib\": %.1f, "
              "\"rss_end_mib\": %.1f, \"peak_decode_mib\": %.1f, \"peak_reset\": %s, \"vocab\": %lld",
              pte.c_str(), load.c_str(), threads, prompt, chunk, decode, load_s, prefill_s, prompt / prefill_s,
              decode_s, decode / decode_s, 1e3 * sorted[sorted.size() / 2], rss_start, rss_libraries, rss_loaded,
              peak_load, status_mib("VmRSS:"), status_mib("VmHWM:"), peak_reset ? "true" : "false",
              static_cast<long long>(vocab));
  if (!store_path.empty()) {
    int64_t s[11];
    reinterpret_cast<Stats>(dlsym(kernels, "pocketllm_expert_store_stats"))(id, s);
    const char* names[11] = {"hits", "prefetch_hits", "waits", "misses", "prefetch_loads", "evictions", "bytes_read",
                             "resident_bytes", "peak_resident_bytes", "slots", "load_ns"};
    std::printf(", \"expert_budget_mib\": %.3f, \"prefetch\": %d, \"store\": {", budget_mib, prefetch);
    for (int i = 0; i < 11; ++i) std::printf("%s\"%s\": %lld", i ? ", " : "", names[i], static_cast<long long>(s[i]));
    std::printf("}");
  }
  std::printf("}\n");
  return 0;
}
