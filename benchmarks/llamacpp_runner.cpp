// llama.cpp side of benchmarks/vs_llamacpp.py: one GGUF model, driven through llama.cpp's C API (llama.h).
// Built by vs_llamacpp.py against the llama.cpp it builds from the llama-cpp-python sdist (outside this repo);
// benchmarks only, not part of the product. Twin of benchmarks/et_runner.cpp: same command line and commands.
//
//   llamacpp_runner MODEL.gguf --ctx N [--kv f16|f32] [--batch B] [--ubatch U] [--threads T] [--load auto|mmap|none|...]
//                   [--fa auto|on|off]
//                   [--generate N --prompt P]       one-shot: greedy generation, then exit (peak RSS runs)
//
// Commands on stdin, one per line; each answers one JSON line on stdout:
//   threads N                       llama_set_n_threads(N, N)
//   reset                           forget the cache (llama_memory_clear)
//   prefill N POS all|last SEED     N random tokens at positions POS.., one llama_decode per n_batch tokens;
//                                   logits computed for every position ("all") or only the last ("last")
//   decode K POS SEED               K single-token llama_decode calls at positions POS..POS+K-1 (logits each)
//   logits OUT POS TOK...           tokens at POS.., logits of every position written to OUT (float32 [T, vocab])
//   generate N PROMPT SEED          greedy: PROMPT random tokens, then N-1 argmax steps
//   rss                             VmRSS / VmHWM of this process
//   quit
// Positions are explicit: a prefill or decode at POS leaves the cache holding positions < POS untouched
// (the caller keeps both engines at the same positions; nothing is removed from the cache in between).
#include <llama.h>

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

namespace {

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

void silent_log(ggml_log_level, const char*, void*) {}

struct Runner {
  llama_model* model = nullptr;
  llama_context* ctx = nullptr;
  int vocab = 0;
  int n_batch = 512;
  int threads = 1;

  // Run tokens at positions pos.., logits for all positions or only the last. Returns false on failure.
  bool run(const std::vector<llama_token>& tokens, int pos, bool all_logits) {
    llama_batch batch = llama_batch_init(n_batch, 0, 1);
    bool ok = true;
    for (size_t s = 0; s < tokens.size() && ok; s += n_batch) {
      size_t n = std::min<size_t>(n_batch, tokens.size() - s);
      batch.n_tokens = (int)n;
      for (size_t i = 0; i < n; ++i) {
        batch.token[i] = tokens[s + i];
        batch.pos[i] = pos + (int)(s + i);
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = all_logits || (s + i + 1 == tokens.size());
      }
      ok = llama_decode(ctx, batch) == 0;
    }
    llama_batch_free(batch);
    return ok;
  }

  std::vector<llama_token> random_tokens(int n, unsigned seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> d(3, vocab - 1);
    std::vector<llama_token> t(n);
    for (auto& x : t) x = d(rng);
    return t;
  }

  int argmax_last() {
    const float* l = llama_get_logits_ith(ctx, -1);
    return (int)(std::max_element(l, l + vocab) - l);
  }

  std::string generate(int n, int prompt, unsigned seed) {
    auto toks = random_tokens(prompt, seed);
    double t0 = now_s();
    if (!run(toks, 0, false)) return "{\"error\":\"decode failed\"}";
    double t1 = now_s();
    std::vector<int> out{argmax_last()};
    int pos = prompt;
    while ((int)out.size() < n) {
      if (!run({out.back()}, pos++, true)) return "{\"error\":\"decode failed\"}";
      out.push_back(argmax_last());
    }
    double t2 = now_s();
    std::ostringstream o;
    o << "{\"prompt\":" << prompt << ",\"generated\":" << out.size() << ",\"prefill_s\":" << (t1 - t0)
      << ",\"decode_s\":" << (t2 - t1) << ",\"tokens\":[";
    for (size_t i = 0; i < out.size(); ++i) o << (i ? "," : "") << out[i];
    o << "],\"vm_hwm_mib\":" << proc_status("VmHWM:") << "}";
    return o.str();
  }

  std::string command(const std::string& line) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    std::ostringstream o;
    o.precision(9);
    if (cmd == "threads") {
      in >> threads;
      llama_set_n_threads(ctx, threads, threads);
      o << "{\"threads\":" << threads << "}";
    } else if (cmd == "reset") {
      llama_memory_clear(llama_get_memory(ctx), false);
      o << "{\"reset\":true}";
    } else if (cmd == "prefill") {
      int n = 0, pos = 0;
      unsigned seed = 0;
      std::string which;
      in >> n >> pos >> which >> seed;
      auto toks = random_tokens(n, seed);
      double t0 = now_s();
      bool ok = run(toks, pos, which == "all");
      double t1 = now_s();
      if (!ok) return "{\"error\":\"decode failed\"}";
      o << "{\"n\":" << n << ",\"pos\":" << pos << ",\"logits\":\"" << which << "\",\"s\":" << (t1 - t0)
        << ",\"calls\":" << (n + n_batch - 1) / n_batch << "}";
    } else if (cmd == "decode") {
      int k = 0, pos = 0;
      unsigned seed = 0;
      in >> k >> pos >> seed;
      auto toks = random_tokens(k, seed);
      o << "{\"pos\":" << pos << ",\"ms\":[";
      for (int i = 0; i < k; ++i) {
        double t0 = now_s();
        if (!run({toks[i]}, pos + i, true)) return "{\"error\":\"decode failed\"}";
        volatile float sink = llama_get_logits_ith(ctx, -1)[0];
        (void)sink;
        o << (i ? "," : "") << 1000 * (now_s() - t0);
      }
      o << "]}";
    } else if (cmd == "logits") {
      std::string path;
      int pos = 0, t = 0;
      in >> path >> pos;
      std::vector<llama_token> toks;
      while (in >> t) toks.push_back(t);
      if (!run(toks, pos, true)) return "{\"error\":\"decode failed\"}";
      std::ofstream f(path, std::ios::binary);
      for (int i = 0; i < (int)toks.size(); ++i)
        f.write((const char*)llama_get_logits_ith(ctx, i), sizeof(float) * vocab);
      o << "{\"logits\":\"" << path << "\",\"tokens\":" << toks.size() << ",\"vocab\":" << vocab << "}";
    } else if (cmd == "generate") {
      int n = 0, prompt = 0;
      unsigned seed = 0;
      in >> n >> prompt >> seed;
      llama_memory_clear(llama_get_memory(ctx), false);
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
    std::fprintf(stderr, "usage: llamacpp_runner MODEL.gguf --ctx N [...]\n");
    return 2;
  }
  llama_backend_init();
  int n_ctx = 4096, threads = 1, generate = 0, prompt = 16, ubatch = 512;
  Runner r;
  bool f32_kv = false, verbose = false;
  std::string load = "auto", fa = "auto";
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() { return i + 1 < argc ? std::atoi(argv[++i]) : 0; };
    if (a == "--ctx") n_ctx = next();
    else if (a == "--batch") r.n_batch = next();
    else if (a == "--ubatch") ubatch = next();
    else if (a == "--threads") threads = next();
    else if (a == "--generate") generate = next();
    else if (a == "--prompt") prompt = next();
    else if (a == "--kv") f32_kv = std::string(argv[++i]) == "f32";
    else if (a == "--load") load = argv[++i];
    else if (a == "--fa") fa = argv[++i];
    else if (a == "--verbose") verbose = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (!verbose) llama_log_set(silent_log, nullptr);
  llama_model_params mp = llama_model_default_params();
  mp.load_mode = llama_load_mode_from_str(load.c_str());  // default auto: llama.cpp's own choice (mmap here)
  double t0 = now_s();
  r.model = llama_model_load_from_file(argv[1], mp);
  if (!r.model) {
    std::fprintf(stderr, "could not load %s\n", argv[1]);
    return 1;
  }
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = n_ctx;
  cp.n_batch = r.n_batch;
  cp.n_ubatch = std::min(ubatch, r.n_batch);
  cp.n_threads = cp.n_threads_batch = threads;
  cp.no_perf = true;
  if (f32_kv) cp.type_k = cp.type_v = GGML_TYPE_F32;
  cp.flash_attn_type = fa == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                     : fa == "off" ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
  r.ctx = llama_init_from_model(r.model, cp);
  if (!r.ctx) {
    std::fprintf(stderr, "could not create a context\n");
    return 1;
  }
  r.threads = threads;
  r.vocab = llama_vocab_n_tokens(llama_model_get_vocab(r.model));
  char desc[256];
  llama_model_desc(r.model, desc, sizeof desc);
  double load_s = now_s() - t0;
  if (generate) {
    std::cout << r.generate(generate, prompt, 0) << std::endl;
    return 0;
  }
  std::cout << "{\"ready\":true,\"engine\":\"llama.cpp\",\"model\":\"" << desc << "\",\"vocab\":" << r.vocab
            << ",\"n_ctx\":" << llama_n_ctx(r.ctx) << ",\"n_batch\":" << r.n_batch << ",\"n_ubatch\":" << cp.n_ubatch
            << ",\"load_mode\":\"" << llama_load_mode_name(mp.load_mode) << "\",\"kv\":\"" << (f32_kv ? "f32" : "f16") << "\",\"flash_attn_type\":" << (int)cp.flash_attn_type
            << ",\"model_bytes\":" << llama_model_size(r.model) << ",\"load_s\":" << load_s
            << ",\"system_info\":\"" << llama_print_system_info() << "\"}" << std::endl;
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line == "quit") break;
    if (line.empty()) continue;
    std::cout << r.command(line) << std::endl;
  }
  llama_free(r.ctx);
  llama_model_free(r.model);
  llama_backend_free();
  return 0;
}
