// pocketllm side of benchmarks/vs_llamacpp.py: a bundle's model.pte run from C++ with ExecuTorch's Module (no
// Python), as an app would run it. Benchmarks only, not part of the product. Twin of
// benchmarks/llamacpp_runner.cpp: same command protocol, so the orchestrator drives both engines alike.
//
//   et_runner MODEL.pte [--load mmap|mlock|file] [--chunk C] [--threads T]
//             [--kernels LIB]... [--preload LIB]... [--builtin-update-cache]
//             [--generate N --prompt P]            one-shot: greedy generation, then exit (peak RSS runs)
//
// --kernels: shared libraries registering ExecuTorch kernels, dlopen'ed before the program loads (our
//   kernels/build/libpocketllm_kernels.so; ExecuTorch's llama::* custom-ops library shipped in the wheel,
//   extension/llm/custom_ops/libcustom_ops_aot_lib.so, which links libtorch and the Python extension _C, so it
//   needs --preload libpython3.x.so first).
// --builtin-update-cache: register llama::update_cache.out from this file instead (a plain copy of the new
//   keys/values into the cache at start_pos, what ExecuTorch's op_update_cache.cpp does for contiguous tensors).
//   An app built from ExecuTorch sources links the custom ops without torch; the wheel offers no such library,
//   so this measures the footprint an app would have without loading libtorch.
// Commands: see llamacpp_runner.cpp (reset, prefill, decode, logits, generate, rss, quit; `threads` only answers
// for the count given at start: XNNPACK keeps the pool it was initialised with). Prefill
// logits: the program decides (a pocketllm .pte returns logits for every position of the call); the answer
// reports what was asked, the orchestrator matches llama.cpp to what the bundle's manifest declares.
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/platform/runtime.h>

#include "driver_common.h"  // ExecuTorch's threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string proc_status(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind(key, 0) == 0) {
      std::istringstream s(line.substr(std::strlen(key)));
      long kb = 0;
      s >> kb;
      return std::to_string(kb / 1024.0);
    }
  return "null";
}

// llama::update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out) -> Tensor(b!)
// value [1, T, H, D] is copied into cache [1, S, H, D] at rows start_pos..start_pos+T-1; out is a dummy.
void update_cache_boxed(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  if (stack.size() < 4) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const Tensor& value = stack[0]->toTensor();
  Tensor& cache = stack[1]->toTensor();
  const int64_t start = stack[2]->toInt();
  if (value.dim() != 4 || cache.dim() != 4 || value.scalar_type() != cache.scalar_type() ||
      value.size(0) != 1 || cache.size(0) != 1 || value.size(2) != cache.size(2) ||
      value.size(3) != cache.size(3) || start < 0 || start + value.size(1) > cache.size(1)) {
    ctx.fail(Error::InvalidArgument);
    return;
  }
  const size_t row = (size_t)value.size(2) * value.size(3) * value.element_size();
  std::memcpy((char*)cache.mutable_data_ptr() + (size_t)start * row, value.const_data_ptr(),
              row * (size_t)value.size(1));
}

struct Runner {
  std::unique_ptr<Module> module;
  int vocab = 0;
  int chunk = 256;
  int threads = 1;

  // One forward call per chunk of tokens at positions pos..; returns the last call's logits pointer (or null).
  const float* run(const std::vector<int64_t>& tokens, int64_t pos, size_t* last_rows = nullptr) {
    const float* out = nullptr;
    for (size_t s = 0; s < tokens.size(); s += chunk) {
      int n = (int)std::min<size_t>(chunk, tokens.size() - s);
      std::vector<int64_t> t(tokens.begin() + s, tokens.begin() + s + n);
      int64_t p = pos + (int64_t)s;
      auto tt = executorch::extension::from_blob(t.data(), {1, n}, ScalarType::Long);
      auto pt = executorch::extension::from_blob(&p, {1}, ScalarType::Long);
      auto r = module->execute("forward", {EValue(*tt), EValue(*pt)});
      if (!r.ok()) {
        std::fprintf(stderr, "forward failed: error 0x%x\n", (int)r.error());
        return nullptr;
      }
      const Tensor& logits = r.get()[0].toTensor();
      vocab = (int)logits.size(logits.dim() - 1);
      out = logits.const_data_ptr<float>();
      if (last_rows) *last_rows = (size_t)logits.numel() / vocab;
    }
    return out;
  }

  std::vector<int64_t> random_tokens(int n, unsigned seed, int v) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> d(3, v - 1);
    std::vector<int64_t> t(n);
    for (auto& x : t) x = d(rng);
    return t;
  }

  static int argmax_row(const float* l, size_t rows, int vocab) {
    const float* last = l + (rows - 1) * (size_t)vocab;
    return (int)(std::max_element(last, last + vocab) - last);
  }

  std::string generate(int n, int prompt, unsigned seed) {
    auto toks = random_tokens(prompt, seed, vocab);
    size_t rows = 0;
    double t0 = now_s();
    const float* l = run(toks, 0, &rows);
    if (!l) return "{\"error\":\"forward failed\"}";
    double t1 = now_s();
    std::vector<int> out{argmax_row(l, rows, vocab)};
    int64_t pos = prompt;
    while ((int)out.size() < n) {
      l = run({out.back()}, pos++, &rows);
      if (!l) return "{\"error\":\"forward failed\"}";
      out.push_back(argmax_row(l, rows, vocab));
    }
    double t2 = now_s();
    std::ostringstream o;
    o << "{\"prompt\":" << prompt << ",\"generated\":" << out.size() << ",\"prefill_s\":" << (t1 - t0)
      << ",\"decode_s\":" << (t2 - t1) << ",\"tokens\":[";
    for (size_t i = 0; i < out.size(); ++i) o << (i ? "," : "") << out[i];
    o << "],\"vm_hwm_mib\":" << proc_status("VmHWM:") << "}";
    return o.str();
  }

  void set_threads(int n) {
    threads = n;
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool((uint32_t)n);
  }

  std::string command(const std::string& line) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    std::ostringstream o;
    o.precision(9);
    if (cmd == "threads") {
      // Fixed at start: XNNPACK delegates keep the pthreadpool they were initialised with, so resetting the pool
      // after load_method leaves them a freed pool (use-after-free). One process per thread count.
      int n = 1;
      in >> n;
      if (n != threads) return "{\"error\":\"et_runner: threads are fixed at start (--threads)\"}";
      o << "{\"threads\":" << threads << "}";
    } else if (cmd == "reset") {
      o << "{\"reset\":true}";  // the program overwrites positions >= start_pos; start_pos 0 restarts
    } else if (cmd == "prefill") {
      int n = 0;
      int64_t pos = 0;
      unsigned seed = 0;
      std::string which;
      in >> n >> pos >> which >> seed;
      auto toks = random_tokens(n, seed, vocab);
      double t0 = now_s();
      const float* l = run(toks, pos);
      double t1 = now_s();
      if (!l) return "{\"error\":\"forward failed\"}";
      o << "{\"n\":" << n << ",\"pos\":" << pos << ",\"logits\":\"" << which << "\",\"s\":" << (t1 - t0)
        << ",\"calls\":" << (n + chunk - 1) / chunk << "}";
    } else if (cmd == "decode") {
      int k = 0;
      int64_t pos = 0;
      unsigned seed = 0;
      in >> k >> pos >> seed;
      auto toks = random_tokens(k, seed, vocab);
      o << "{\"pos\":" << pos << ",\"ms\":[";
      for (int i = 0; i < k; ++i) {
        double t0 = now_s();
        const float* l = run({toks[i]}, pos + i);
        if (!l) return "{\"error\":\"forward failed\"}";
        volatile float sink = l[0];
        (void)sink;
        o << (i ? "," : "") << 1000 * (now_s() - t0);
      }
      o << "]}";
    } else if (cmd == "logits") {
      std::string path;
      int64_t pos = 0, t = 0;
      in >> path >> pos;
      std::vector<int64_t> toks;
      while (in >> t) toks.push_back(t);
      std::ofstream f(path, std::ios::binary);
      // One call per token-chunk; every row of every call is written.
      for (size_t s = 0; s < toks.size(); s += chunk) {
        std::vector<int64_t> part(toks.begin() + s, toks.begin() + std::min(toks.size(), s + chunk));
        size_t rows = 0;
        const float* l = run(part, pos + (int64_t)s, &rows);
        if (!l) return "{\"error\":\"forward failed\"}";
        f.write((const char*)l, sizeof(float) * rows * vocab);
      }
      o << "{\"logits\":\"" << path << "\",\"tokens\":" << toks.size() << ",\"vocab\":" << vocab << "}";
    } else if (cmd == "generate") {
      int n = 0, prompt = 0;
      unsigned seed = 0;
      in >> n >> prompt >> seed;
      return generate(n, prompt, seed);
    } else if (cmd == "rss") {
      o << "{\"vm_rss_mib\":" << proc_status("VmRSS:") << ",\"vm_hwm_mib\":" << proc_status("VmHWM:") << "}";
    } else {
      o << "{\"error\":\"unknown command " << cmd << "\"}";
    }
    return o.str();
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: et_runner MODEL.pte [--load mmap|mlock|file] [--kernels LIB]... [...]\n");
    return 2;
  }
  executorch::runtime::runtime_init();
  Runner r;
  std::string load = "mmap";
  int threads = 1, generate = 0, prompt = 16;
  bool builtin_update_cache = false;
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto str = [&]() { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--load") load = str();
    else if (a == "--chunk") r.chunk = std::atoi(str().c_str());
    else if (a == "--threads") threads = std::atoi(str().c_str());
    else if (a == "--generate") generate = std::atoi(str().c_str());
    else if (a == "--prompt") prompt = std::atoi(str().c_str());
    else if (a == "--builtin-update-cache") builtin_update_cache = true;
    else if (a == "--kernels" || a == "--preload") {
      std::string lib = str();
      if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
        std::fprintf(stderr, "dlopen %s: %s\n", lib.c_str(), dlerror());
        return 1;
      }
    } else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (builtin_update_cache) {
    auto e = executorch::runtime::register_kernel(
        executorch::runtime::Kernel("llama::update_cache.out", update_cache_boxed));
    if (e != Error::Ok) {
      std::fprintf(stderr, "llama::update_cache.out is registered already (drop --builtin-update-cache)\n");
      return 1;
    }
  }
  Module::LoadMode mode = load == "file" ? Module::LoadMode::File
                        : load == "mlock" ? Module::LoadMode::MmapUseMlock
                                          : Module::LoadMode::Mmap;
  r.set_threads(threads);  // before load_method: XNNPACK takes the pool at init
  double t0 = now_s();
  r.module = std::make_unique<Module>(argv[1], mode);
  if (r.module->load_method("forward") != Error::Ok) {
    std::fprintf(stderr, "could not load forward from %s (load mode %s)\n", argv[1], load.c_str());
    return 1;
  }
  auto meta = r.module->method_meta("forward");
  if (meta.ok()) {
    auto out = meta->output_tensor_meta(0);
    if (out.ok()) r.vocab = (int)out->sizes()[out->sizes().size() - 1];
  }
  double load_s = now_s() - t0;
  if (generate) {
    std::cout << r.generate(generate, prompt, 0) << std::endl;
    return 0;
  }
  std::cout << "{\"ready\":true,\"engine\":\"executorch\",\"load\":\"" << load << "\",\"vocab\":" << r.vocab
            << ",\"chunk\":" << r.chunk << ",\"load_s\":" << load_s << ",\"vm_rss_mib\":" << proc_status("VmRSS:")
            << "}" << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line == "quit") break;
    if (line.empty()) continue;
    std::cout << r.command(line) << std::endl;
  }
  return 0;
}
