// How fast this machine reads what InfLLM v2 decode reads at 16K: per layer and KV head, 96 blocks of 64 positions
// chosen at random, 128 bytes (fp16, head_dim 64) of each 256-byte position row (two KV heads interleaved, ExecuTorch's
// [1, S, H, D] cache), keys and values, over 24 layers of 16640 positions (200 MB: nothing stays cached). No
// arithmetic beyond widening the halves, so the time is the memory system's floor for pocketllm::infllm_attention.
//
//   c++ -O2 -march=native -pthread benchmarks/kv_block_read.cpp -o /tmp/kv_block_read
//   /tmp/kv_block_read THREADS PREFETCH     THREADS 1 (both heads in turn) or 2 (one head each); PREFETCH 1 issues
//                                           software prefetches for the whole next block first
// Measured 2026-12-02 on the 2-core Zen 5 VM (5 repetitions each, last two shown alike): 1 thread 9.5 GB/s (333 us
// per layer), with block prefetch 7.3; 2 threads 15.0 GB/s (210 us per layer), with block prefetch 12.5.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s THREADS(1|2) PREFETCH(0|1)\n", argv[0]);
    return 2;
  }
  const int threads = std::atoi(argv[1]), prefetch = std::atoi(argv[2]);
  constexpr size_t kPositions = 16640, kRow = 256, kHeadBytes = 128, kLayer = kPositions * kRow * 2;  // K and V
  constexpr int kLayers = 24, kBlocks = 96, kBlockRows = 64;
  std::vector<char> mem(kLayer * kLayers);
  for (size_t i = 0; i < mem.size(); i += 64) mem[i] = static_cast<char>(i);  // touch every line
  std::mt19937 rng(1);
  std::vector<int> blocks(kBlocks * kLayers * 2);
  for (auto& b : blocks) b = static_cast<int>(rng() % (kPositions / kBlockRows));
  auto read_head = [&](int head, float* sink) {
    __m256 acc = _mm256_setzero_ps();
    for (int l = 0; l < kLayers; ++l) {
      const char* K = mem.data() + l * kLayer;
      const char* V = K + kPositions * kRow;
      const int* chosen = blocks.data() + (l * 2 + head) * kBlocks;
      for (int b = 0; b < kBlocks; ++b) {
        if (prefetch && b + 1 < kBlocks)
          for (int r = 0; r < kBlockRows; ++r) {
            const size_t o = (size_t(chosen[b + 1]) * kBlockRows + r) * kRow + head * kHeadBytes;
            for (size_t c = 0; c < kHeadBytes; c += 64) {
              _mm_prefetch(K + o + c, _MM_HINT_T0);
              _mm_prefetch(V + o + c, _MM_HINT_T0);
            }
          }
        for (int r = 0; r < kBlockRows; ++r) {
          const size_t o = (size_t(chosen[b]) * kBlockRows + r) * kRow + head * kHeadBytes;
          for (size_t c = 0; c < kHeadBytes; c += 16) {
            acc = _mm256_add_ps(acc, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(K + o + c))));
            acc = _mm256_add_ps(acc, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(V + o + c))));
          }
        }
      }
    }
    float f[8];
    _mm256_storeu_ps(f, acc);
    *sink = f[0];
  };
  float sink[2];
  const double bytes = 2.0 * kLayers * kBlocks * kBlockRows * kHeadBytes * 2;  // heads x ... x (K, V)
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    if (threads == 1) {
      read_head(0, sink);
      read_head(1, sink + 1);
    } else {
      std::thread a(read_head, 0, sink), b(read_head, 1, sink + 1);
      a.join();
      b.join();
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    std::printf("threads %d prefetch %d: %.1f us per layer, %.1f GB/s\n", threads, prefetch, us / kLayers,
                bytes / us / 1e3);
  }
  return 0;
}
