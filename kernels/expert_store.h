// The expert store: a bundle's `experts.bin` (MoE expert weights kept out of the .pte), read by the kernel library
// itself so that it, not the app's program loader, decides which experts are resident. Format: runtime_py/ops/
// expert_store.py (the numpy twin parses it the same way, with the same one-line errors).
//
// Two modes, chosen when the store is opened:
//   budget 0 (unbounded): the file is memory-mapped read-only; an expert's pages become resident when first used
//     (checked against its checksum then) and stay: the routed experts only, never the whole file.
//   budget B bytes: an LRU of expert slots, floor(B / slot size) of them, in one anonymous mapping whose pages are
//     committed as slots fill (resident expert memory <= B); a miss reads the expert's block with pread into the
//     least recently used unpinned slot. The file itself is never mapped.
// Prefetch (both modes): expert_store_prefetch, placed right after SmallThinker's pre-attention router, hands the
// layer's routed experts to a helper thread, which reads them into slots (budget) or faults their pages in
// (unbounded) while attention runs; expert_store_moe_ffn then finds them resident, or waits for a load in flight, or
// reads a miss itself. A newer prefetch supersedes older ones that have not started.
//
// Stores are registered by id (the 16-byte id in the header, as 32 hex digits, which the exported graph names);
// pocketllm_expert_store_open registers one (the Python runner does; apps call it once after loading the kernel
// library), and an op that finds its id unregistered opens $POCKETLLM_EXPERT_STORE (a path to experts.bin) with
// $POCKETLLM_EXPERT_CACHE_MB as its budget, so ExecuTorch's stock LLM runner works too.
#pragma once

#include <cstdint>
#include <condition_variable>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace pocketllm {

constexpr uint32_t kExpertStoreVersion = 1;
constexpr int64_t kExpertHeaderBytes = 128;

// One layer's entry of the file's layer table (64 bytes on disk, little-endian).
struct ExpertLayer {
  uint32_t layer, format, experts, ffn, hidden, gate_groups, up_groups, down_groups, lut_dtype, scales_dtype;
  uint64_t block_bytes, block_stride, first_offset;
};
static_assert(sizeof(ExpertLayer) == 64, "layer entry is 64 bytes");
enum ExpertFormat : uint32_t { kExpertFp32 = 0, kExpertBf16 = 1, kExpertAny4 = 2 };

// Byte offsets of an expert's tensors inside its block (float: gate, up, down_t; any4: q, lut, scales, zeros of
// gate, up, down), as the format fixes them.
struct ExpertBlockLayout {
  int64_t offset[12];
  int64_t block_bytes;
};
ExpertBlockLayout expert_block_layout(const ExpertLayer& L);

struct ExpertStoreStats {
  int64_t hits;             // expert_store_moe_ffn found the expert resident
  int64_t prefetch_hits;    // ... and it had been brought in by a prefetch, not used since
  int64_t waits;            // ... found it being loaded by the helper, and waited
  int64_t misses;           // ... had to read it itself
  int64_t prefetch_loads;   // experts the helper read (budget) or faulted in (unbounded)
  int64_t evictions;        // slots reused for another expert
  int64_t bytes_read;       // by pread (budget) or faulted in (unbounded)
  int64_t resident_bytes;   // expert bytes held now
  int64_t peak_resident_bytes;
  int64_t slots;            // slot count (budget), 0 (unbounded)
  int64_t load_ns;          // time spent reading / faulting experts in, all threads
};
constexpr int kExpertStatsFields = 11;

class ExpertStore {
 public:
  // Opens and checks the file (header, size, tables); nullptr and a one-line *error otherwise.
  static std::shared_ptr<ExpertStore> open(const std::string& path, int64_t budget_bytes, bool prefetch,
                                           std::string* error);
  ~ExpertStore();
  ExpertStore(const ExpertStore&) = delete;
  ExpertStore& operator=(const ExpertStore&) = delete;

  const std::string& id() const { return id_; }
  const std::string& name() const { return name_; }  // file name, for messages
  const ExpertLayer* layer(int64_t model_layer) const;
  int64_t index_of(const ExpertLayer* L) const { return L - layers_.data(); }
  // Experts one batch may hold: the slot count (budget), or every expert (unbounded).
  int64_t capacity() const { return budget_ ? static_cast<int64_t>(slots_.size()) : INT64_MAX; }

  // Where a batch's experts are: expert e at base + block[e] * stride (block[e] < 0: not in the batch).
  struct Batch {
    const uint8_t* base = nullptr;
    int64_t stride = 0;
    std::vector<int64_t> block;
  };
  // Makes experts[0..n) (distinct, n <= capacity()) of layer L resident and pins them until release(); false with a
  // one-line *error when a read fails or a block fails its checksum.
  bool acquire(const ExpertLayer* L, const int64_t* experts, int64_t n, Batch* batch, std::string* error);
  void release(const ExpertLayer* L, const int64_t* experts, int64_t n);
  // Starts bringing experts of L in on the helper thread (no-op without prefetch).
  void prefetch(const ExpertLayer* L, std::vector<int64_t> experts);
  // Waits until the helper is idle (tests, benchmarks).
  void drain();
  ExpertStoreStats stats() const;

 private:
  ExpertStore() = default;
  bool load_into(const ExpertLayer* L, int64_t e, uint8_t* dst, std::string* error);  // pread + checksum
  bool touch_mapped(const ExpertLayer* L, int64_t e, std::string* error);              // fault in + checksum
  int64_t pick_victim();  // LRU unpinned ready or empty slot, -1 if none (lock held)
  void worker();
  uint64_t key(const ExpertLayer* L, int64_t e) const { return (static_cast<uint64_t>(index_of(L)) << 32) | e; }
  bool verify(const ExpertLayer* L, int64_t e, const uint8_t* block, std::string* error) const;

  std::string path_, name_, id_;
  int fd_ = -1;
  int64_t file_size_ = 0, budget_ = 0;
  std::vector<ExpertLayer> layers_;
  std::vector<std::vector<uint64_t>> sums_;  // per layer: sum1, sum2 per expert
  std::vector<int64_t> first_expert_;        // per layer: index of its expert 0 in flat per-expert arrays
  std::vector<uint8_t> verified_;            // per (layer, expert), flat

  // unbounded: the whole file mapped
  const uint8_t* map_ = nullptr;

  // budget: slots
  enum class SlotState : uint8_t { kEmpty, kLoading, kReady, kFailed };
  struct Slot {
    uint64_t key = 0;
    SlotState state = SlotState::kEmpty;
    int32_t pins = 0;
    bool prefetched = false;
    std::list<int64_t>::iterator lru;
  };
  Slot& claim(int64_t v, uint64_t k, bool prefetched);  // evict slot v's expert, make it k's (loading; lock held)
  uint8_t* arena_ = nullptr;
  int64_t slot_stride_ = 0, arena_bytes_ = 0;
  std::vector<Slot> slots_;
  std::list<int64_t> lru_;  // slot indices, least recently used first
  std::unordered_map<uint64_t, int64_t> where_;
  std::string failure_;  // the error of the last failed load (kFailed slots / unbounded)

  // helper thread
  bool prefetch_ = false, stop_ = false;
  struct Request {
    const ExpertLayer* layer;
    std::vector<int64_t> experts;
  };
  std::deque<Request> queue_;
  bool busy_ = false;
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;  // slot state changes, queue changes
  ExpertStoreStats stats_{};
};

// The registry. open_expert_store replaces a store registered under the same id (its users keep their reference).
std::shared_ptr<ExpertStore> open_expert_store(const std::string& path, int64_t budget_bytes, bool prefetch,
                                               std::string* error);
// The registered store `id`, or one opened from $POCKETLLM_EXPERT_STORE when that file has this id; nullptr + error.
std::shared_ptr<ExpertStore> find_expert_store(std::string_view id, std::string* error);
bool close_expert_store(std::string_view id);

// Sum1, sum2 of n little-endian u64 words (the format's checksum).
void expert_checksum(const uint8_t* data, int64_t bytes, uint64_t* sum1, uint64_t* sum2);

}  // namespace pocketllm
