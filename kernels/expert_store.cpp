// The expert store (expert_store.h) and the kernels of pocketllm::expert_store_prefetch.out and
// pocketllm::expert_store_moe_ffn.out (schemas in export/ops/expert_store.py). expert_store_moe_ffn runs moe_ffn.cpp's
// kernels on the experts where the store holds them: in the file's mapping (unbounded) or in slots (budget), one
// batch of at most capacity() experts at a time, batches in ascending expert order, so the result is the stacked
// op's bit for bit.
#include "expert_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#include "moe_ffn.h"

namespace pocketllm {
namespace {

constexpr char kMagic[8] = {'P', 'L', 'M', 'E', 'X', 'P', 'R', 'T'};
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr int64_t kTensorAlign = 64;
constexpr int64_t kSlotAlign = 4096;

int64_t align_up(int64_t n, int64_t a) { return (n + a - 1) / a * a; }

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(v));  // the format is little-endian, as are x86-64 and arm64
  return v;
}

std::string hex(const uint8_t* p, int n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s += digits[p[i] >> 4], s += digits[p[i] & 15];
  return s;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string base_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool read_all(int fd, uint8_t* dst, int64_t bytes, int64_t offset, std::string* why) {
  while (bytes > 0) {
    const ssize_t r = ::pread(fd, dst, static_cast<size_t>(bytes), static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      *why = std::strerror(errno);
      return false;
    }
    if (r == 0) {
      *why = "unexpected end of file (truncated)";
      return false;
    }
    dst += r, bytes -= r, offset += r;
  }
  return true;
}

}  // namespace

void expert_checksum(const uint8_t* data, int64_t bytes, uint64_t* sum1, uint64_t* sum2) {
  const uint64_t n = static_cast<uint64_t>(bytes / 8);
  uint64_t a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
  uint64_t i = 0;
  for (; i + 4 <= n; i += 4)
    for (int j = 0; j < 4; ++j) {
      const uint64_t w = read_le<uint64_t>(data + 8 * (i + j));
      a[j] += w;
      b[j] += (n - (i + j)) * w;
    }
  for (; i < n; ++i) {
    const uint64_t w = read_le<uint64_t>(data + 8 * i);
    a[0] += w;
    b[0] += (n - i) * w;
  }
  *sum1 = (a[0] + a[1]) + (a[2] + a[3]);
  *sum2 = (b[0] + b[1]) + (b[2] + b[3]);
}

ExpertBlockLayout expert_block_layout(const ExpertLayer& L) {
  ExpertBlockLayout out{};
  int64_t at = 0;
  int i = 0;
  auto put = [&](int64_t bytes) {
    at = align_up(at, kTensorAlign);
    out.offset[i++] = at;
    at += bytes;
  };
  const int64_t F = L.ffn, H = L.hidden;
  if (L.format != kExpertAny4) {
    const int64_t es = L.format == kExpertFp32 ? 4 : 2;
    for (int p = 0; p < 3; ++p) put(F * H * es);
  } else {
    const int64_t sz = L.scales_dtype == 0 ? 2 : 4;
    const int64_t proj[3][3] = {{F, H, L.gate_groups}, {F, H, L.up_groups}, {H, F, L.down_groups}};
    for (const auto& p : proj) {
      put(p[0] * (p[1] / 2));
      put(p[0] * 16 * 2);
      put(p[0] * p[2] * sz);
      put(p[0] * p[2] * sz);
    }
  }
  out.block_bytes = align_up(at, kTensorAlign);
  return out;
}

// ------------------------------------------------------------------------------------------ open
std::shared_ptr<ExpertStore> ExpertStore::open(const std::string& path, int64_t budget_bytes, bool prefetch,
                                               std::string* error) {
  std::shared_ptr<ExpertStore> s(new ExpertStore());
  s->path_ = path;
  s->name_ = base_name(path);
  const std::string& name = s->name_;
  auto fail = [&](const std::string& message) {
    *error = message;
    return nullptr;
  };
  s->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (s->fd_ < 0) return fail(path + ": cannot open expert store (" + std::strerror(errno) + ")");
  struct stat st;
  if (::fstat(s->fd_, &st) != 0) return fail(path + ": cannot stat expert store (" + std::strerror(errno) + ")");
  const int64_t size = st.st_size;
  s->file_size_ = size;
  if (size < kExpertHeaderBytes)
    return fail(name + ": truncated expert store (" + std::to_string(size) + " bytes; the header alone is " +
                std::to_string(kExpertHeaderBytes) + "); re-export the bundle");
  uint8_t head[kExpertHeaderBytes];
  std::string why;
  if (!read_all(s->fd_, head, kExpertHeaderBytes, 0, &why)) return fail(name + ": cannot read header (" + why + ")");
  if (std::memcmp(head, kMagic, 8) != 0) return fail(name + ": not a pocketllm expert store (bad magic)");
  const uint32_t version = read_le<uint32_t>(head + 8);
  if (version != kExpertStoreVersion)
    return fail(name + ": expert store version " + std::to_string(version) + "; this kernel library reads " +
                std::to_string(kExpertStoreVersion) + " (re-export the bundle)");
  uint64_t h1, h2;
  expert_checksum(head, 120, &h1, &h2);
  if ((h1 ^ (h2 * kGolden)) != read_le<uint64_t>(head + 120))
    return fail(name + ": corrupt expert store header (checksum mismatch); re-export the bundle");
  const int64_t n_layers = read_le<uint32_t>(head + 12);
  const int64_t data_offset = read_le<uint64_t>(head + 24);
  const int64_t file_size = read_le<uint64_t>(head + 32);
  if (size != file_size)
    return fail(name + ": " + (size < file_size ? "truncated" : "oversized") + " expert store (" +
                std::to_string(size) + " bytes; its header says " + std::to_string(file_size) +
                "); re-export the bundle");
  s->id_ = hex(head + 40, 16);
  const int64_t t_bytes = read_le<uint64_t>(head + 72);
  const auto corrupt_tables = [&] {
    return fail(name + ": corrupt expert store tables (checksum mismatch); re-export the bundle");
  };
  if (t_bytes % 8 || t_bytes < n_layers * 64 || kExpertHeaderBytes + t_bytes > size) return corrupt_tables();
  std::vector<uint8_t> tables(t_bytes);
  if (!read_all(s->fd_, tables.data(), t_bytes, kExpertHeaderBytes, &why))
    return fail(name + ": cannot read tables (" + why + ")");
  uint64_t t1, t2;
  expert_checksum(tables.data(), t_bytes, &t1, &t2);
  if (t1 != read_le<uint64_t>(head + 56) || t2 != read_le<uint64_t>(head + 64)) return corrupt_tables();

  int64_t at = n_layers * 64, flat = 0, max_block = 0;
  for (int64_t i = 0; i < n_layers; ++i) {
    ExpertLayer L;
    std::memcpy(&L, tables.data() + i * 64, sizeof(L));
    const bool known = L.format <= kExpertAny4 && L.lut_dtype <= 1 && L.scales_dtype <= 1;
    bool ok = known && L.experts >= 1 && L.ffn >= 1 && L.hidden >= 1 &&
              static_cast<int64_t>(L.first_offset) >= data_offset && L.block_stride >= L.block_bytes &&
              at + static_cast<int64_t>(L.experts) * 16 <= t_bytes &&
              L.first_offset + static_cast<uint64_t>(L.experts) * L.block_stride <= static_cast<uint64_t>(size);
    if (ok && L.format == kExpertAny4) {
      const int64_t proj[3][3] = {{L.ffn, L.hidden, L.gate_groups}, {L.ffn, L.hidden, L.up_groups},
                                  {L.hidden, L.ffn, L.down_groups}};
      for (const auto& p : proj) ok = ok && p[1] % 2 == 0 && p[2] >= 1 && p[1] % p[2] == 0 && (p[1] / p[2]) % 2 == 0;
    }
    ok = ok && static_cast<int64_t>(L.block_bytes) == expert_block_layout(L).block_bytes;
    if (!ok)
      return fail(name + ": corrupt expert store: layer " + std::to_string(L.layer) +
                  "'s entry does not fit the file; re-export the bundle");
    std::vector<uint64_t> sums(2 * L.experts);
    std::memcpy(sums.data(), tables.data() + at, 16 * L.experts);
    at += 16 * L.experts;
    s->layers_.push_back(L);
    s->sums_.push_back(std::move(sums));
    s->first_expert_.push_back(flat);
    flat += L.experts;
    max_block = std::max<int64_t>(max_block, L.block_bytes);
  }
  s->verified_.assign(flat, 0);
  s->budget_ = budget_bytes > 0 ? budget_bytes : 0;
  if (s->budget_) {
    s->slot_stride_ = align_up(max_block, kSlotAlign);
    const int64_t n = s->budget_ / s->slot_stride_;
    if (n < 1)
      return fail(name + ": an expert cache of " + std::to_string(s->budget_ >> 20) +
                  " MiB holds no expert (one expert takes " + std::to_string((s->slot_stride_ + (1 << 20) - 1) >> 20) +
                  " MiB)");
    s->arena_bytes_ = n * s->slot_stride_;
    void* p = ::mmap(nullptr, s->arena_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return fail(name + ": cannot reserve the expert cache (" + std::strerror(errno) + ")");
    s->arena_ = static_cast<uint8_t*>(p);
    s->slots_.resize(n);
    for (int64_t i = 0; i < n; ++i) s->slots_[i].lru = s->lru_.insert(s->lru_.end(), i);
    s->stats_.slots = n;
  } else {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, s->fd_, 0);
    if (p == MAP_FAILED) return fail(name + ": cannot map the expert store (" + std::strerror(errno) + ")");
    s->map_ = static_cast<const uint8_t*>(p);
  }
  s->prefetch_ = prefetch;
  if (prefetch) s->thread_ = std::thread([raw = s.get()] { raw->worker(); });
  return s;
}

ExpertStore::~ExpertStore() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (arena_) ::munmap(arena_, arena_bytes_);
  if (map_) ::munmap(const_cast<uint8_t*>(map_), file_size_);
  if (fd_ >= 0) ::close(fd_);
}

const ExpertLayer* ExpertStore::layer(int64_t model_layer) const {
  for (const auto& L : layers_)
    if (L.layer == model_layer) return &L;
  return nullptr;
}

// ------------------------------------------------------------------------------------------ reading experts
bool ExpertStore::verify(const ExpertLayer* L, int64_t e, const uint8_t* block, std::string* error) const {
  uint64_t s1, s2;
  expert_checksum(block, L->block_bytes, &s1, &s2);
  const auto& sums = sums_[index_of(L)];
  if (s1 == sums[2 * e] && s2 == sums[2 * e + 1]) return true;
  *error = name_ + ": layer " + std::to_string(L->layer) + " expert " + std::to_string(e) +
           " fails its checksum (the file is corrupt); re-export the bundle";
  return false;
}

bool ExpertStore::load_into(const ExpertLayer* L, int64_t e, uint8_t* dst, std::string* error) {
  const int64_t t0 = now_ns();
  std::string why;
  if (!read_all(fd_, dst, L->block_bytes, L->first_offset + e * L->block_stride, &why)) {
    *error = name_ + ": reading layer " + std::to_string(L->layer) + " expert " + std::to_string(e) + " failed (" +
             why + ")";
    return false;
  }
  const int64_t flat = first_expert_[index_of(L)] + e;
  bool first;
  {
    std::lock_guard<std::mutex> lk(mu_);
    first = !verified_[flat];
  }
  if (first) {  // each block is checked the first time it is read
    if (!verify(L, e, dst, error)) return false;
    std::lock_guard<std::mutex> lk(mu_);
    verified_[flat] = 1;
  }
  std::lock_guard<std::mutex> lk(mu_);
  stats_.bytes_read += L->block_bytes;
  stats_.load_ns += now_ns() - t0;
  return true;
}

bool ExpertStore::touch_mapped(const ExpertLayer* L, int64_t e, std::string* error) {
  const int64_t t0 = now_ns();
  const uint8_t* block = map_ + L->first_offset + e * L->block_stride;
  const uintptr_t page = 4096, start = reinterpret_cast<uintptr_t>(block) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(start), reinterpret_cast<uintptr_t>(block) + L->block_bytes - start,
            MADV_WILLNEED);
  if (!verify(L, e, block, error)) return false;  // reads every page: they are resident afterwards
  std::lock_guard<std::mutex> lk(mu_);
  const int64_t flat = first_expert_[index_of(L)] + e;
  if (!verified_[flat]) {
    verified_[flat] = 1;
    stats_.bytes_read += L->block_bytes;
    stats_.resident_bytes += L->block_bytes;
    stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);
  }
  stats_.load_ns += now_ns() - t0;
  return true;
}

int64_t ExpertStore::pick_victim() {
  for (const int64_t i : lru_) {
    const Slot& s = slots_[i];
    if (s.pins == 0 && (s.state == SlotState::kEmpty || s.state == SlotState::kReady)) return i;
  }
  return -1;
}

ExpertStore::Slot& ExpertStore::claim(int64_t v, uint64_t k, bool prefetched) {
  Slot& s = slots_[v];
  if (s.state == SlotState::kReady) {
    where_.erase(s.key);
    ++stats_.evictions;
    stats_.resident_bytes -= layers_[s.key >> 32].block_bytes;
  }
  s.key = k, s.state = SlotState::kLoading, s.prefetched = prefetched;
  where_[k] = v;
  return s;
}

// ------------------------------------------------------------------------------------------ acquire / release
bool ExpertStore::acquire(const ExpertLayer* L, const int64_t* experts, int64_t n, Batch* batch,
                          std::string* error) {
  batch->block.assign(L->experts, -1);
  if (!budget_) {
    batch->base = map_ + L->first_offset;
    batch->stride = L->block_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = experts[i], flat = first_expert_[index_of(L)] + e;
      bool ready;
      {
        std::lock_guard<std::mutex> lk(mu_);
        ready = verified_[flat];
        if (ready) ++stats_.hits;
      }
      if (!ready) {
        if (!touch_mapped(L, e, error)) return false;
        std::lock_guard<std::mutex> lk(mu_);
        ++stats_.misses;
      }
      batch->block[e] = e;
    }
    return true;
  }
  batch->base = arena_;
  batch->stride = slot_stride_;
  std::unique_lock<std::mutex> lk(mu_);
  auto unpin_all = [&] {
    for (int64_t i = 0; i < n; ++i)
      if (batch->block[experts[i]] >= 0) --slots_[batch->block[experts[i]]].pins;
  };
  auto use = [&](int64_t slot) {
    Slot& s = slots_[slot];
    ++s.pins;
    lru_.splice(lru_.end(), lru_, s.lru);
  };
  // pass 1: pin what is resident, so that reading the others cannot evict it
  for (int64_t i = 0; i < n; ++i) {
    const auto it = where_.find(key(L, experts[i]));
    if (it != where_.end() && slots_[it->second].state == SlotState::kReady) {
      Slot& s = slots_[it->second];
      ++stats_.hits;
      if (s.prefetched) ++stats_.prefetch_hits, s.prefetched = false;
      use(it->second);
      batch->block[experts[i]] = it->second;
    }
  }
  // pass 2: wait for loads in flight, read the rest
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = experts[i];
    if (batch->block[e] >= 0) continue;
    const uint64_t k = key(L, e);
    bool waited = false;
    for (;;) {
      const auto it = where_.find(k);
      if (it != where_.end()) {
        Slot& s = slots_[it->second];
        if (s.state == SlotState::kLoading) {
          if (!waited) ++stats_.waits, waited = true;
          cv_.wait(lk);
          continue;
        }
        if (s.state == SlotState::kFailed) {
          *error = failure_;
          s.state = SlotState::kEmpty;
          where_.erase(it);
          unpin_all();
          return false;
        }
        ++stats_.hits;  // kReady (loaded by the helper while we waited)
        if (s.prefetched) ++stats_.prefetch_hits, s.prefetched = false;
        use(it->second);
        batch->block[e] = it->second;
        break;
      }
      const int64_t v = pick_victim();
      if (v < 0) {  // every slot pinned by this batch or loading for the helper
        cv_.wait(lk);
        continue;
      }
      Slot& s = claim(v, k, false);
      use(v);
      lk.unlock();
      const bool ok = load_into(L, e, arena_ + v * slot_stride_, error);
      lk.lock();
      if (!ok) {
        s.state = SlotState::kEmpty;
        where_.erase(k);
        --s.pins;
        unpin_all();
        cv_.notify_all();
        return false;
      }
      s.state = SlotState::kReady;
      ++stats_.misses;
      stats_.resident_bytes += L->block_bytes;
      stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);
      cv_.notify_all();
      batch->block[e] = v;
      break;
    }
  }
  return true;
}

void ExpertStore::release(const ExpertLayer* L, const int64_t* experts, int64_t n) {
  if (!budget_) return;
  std::lock_guard<std::mutex> lk(mu_);
  for (int64_t i = 0; i < n; ++i) {
    const auto it = where_.find(key(L, experts[i]));
    if (it != where_.end() && slots_[it->second].pins > 0) --slots_[it->second].pins;
  }
  cv_.notify_all();
}

// ------------------------------------------------------------------------------------------ prefetch
void ExpertStore::prefetch(const ExpertLayer* L, std::vector<int64_t> experts) {
  if (!prefetch_ || experts.empty()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    queue_.push_back(Request{L, std::move(experts)});
  }
  cv_.notify_all();
}

void ExpertStore::drain() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return queue_.empty() && !busy_; });
}

void ExpertStore::worker() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    Request r = std::move(queue_.back());  // older requests are for layers already past
    queue_.clear();
    busy_ = true;
    for (const int64_t e : r.experts) {
      if (stop_ || !queue_.empty()) break;  // superseded by a newer layer's request
      const ExpertLayer* L = r.layer;
      std::string error;
      if (!budget_) {
        if (verified_[first_expert_[index_of(L)] + e]) continue;
        lk.unlock();
        const bool ok = touch_mapped(L, e, &error);
        lk.lock();
        if (ok) ++stats_.prefetch_loads;  // a corrupt block is reported by the op that uses it
        continue;
      }
      const uint64_t k = key(L, e);
      const auto it = where_.find(k);
      if (it != where_.end()) {  // resident or loading: keep it from being the next victim
        lru_.splice(lru_.end(), lru_, slots_[it->second].lru);
        continue;
      }
      const int64_t v = pick_victim();
      if (v < 0) break;
      Slot& s = claim(v, k, true);
      lru_.splice(lru_.end(), lru_, s.lru);
      lk.unlock();
      const bool ok = load_into(L, e, arena_ + v * slot_stride_, &error);
      lk.lock();
      if (ok) {
        s.state = SlotState::kReady;
        ++stats_.prefetch_loads;
        stats_.resident_bytes += L->block_bytes;
        stats_.peak_resident_bytes = std::max(stats_.peak_resident_bytes, stats_.resident_bytes);
      } else {
        s.state = SlotState::kFailed;
        failure_ = error;
      }
      cv_.notify_all();
    }
    busy_ = false;
    cv_.notify_all();
  }
}

ExpertStoreStats ExpertStore::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

// ------------------------------------------------------------------------------------------ registry
namespace {
std::mutex g_registry_mu;
std::unordered_map<std::string, std::shared_ptr<ExpertStore>>& registry() {
  static auto* stores = new std::unordered_map<std::string, std::shared_ptr<ExpertStore>>();
  return *stores;
}
std::string g_last_error;

void set_last_error(const std::string& e) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  g_last_error = e;
}
}  // namespace

std::shared_ptr<ExpertStore> open_expert_store(const std::string& path, int64_t budget_bytes, bool prefetch,
                                               std::string* error) {
  auto store = ExpertStore::open(path, budget_bytes, prefetch, error);
  if (!store) return nullptr;
  std::lock_guard<std::mutex> lk(g_registry_mu);
  registry()[store->id()] = store;
  return store;
}

std::shared_ptr<ExpertStore> find_expert_store(std::string_view id, std::string* error) {
  {
    std::lock_guard<std::mutex> lk(g_registry_mu);
    const auto it = registry().find(std::string(id));
    if (it != registry().end()) return it->second;
  }
  const char* env = std::getenv("POCKETLLM_EXPERT_STORE");
  if (!env || !*env) {
    *error = "expert store " + std::string(id) +
             " is not open: call pocketllm_expert_store_open(<bundle>/experts.bin, budget) after loading the kernel "
             "library, or set POCKETLLM_EXPERT_STORE=<bundle>/experts.bin";
    return nullptr;
  }
  const char* mb = std::getenv("POCKETLLM_EXPERT_CACHE_MB");
  const char* pf = std::getenv("POCKETLLM_EXPERT_PREFETCH");
  const int64_t budget = mb ? static_cast<int64_t>(std::strtod(mb, nullptr) * 1048576.0) : 0;  // MiB, fractional ok
  auto store = open_expert_store(env, budget, !(pf && std::string(pf) == "0"), error);
  if (!store) return nullptr;
  if (store->id() != id) {
    *error = "expert store " + std::string(id) + " is not open (POCKETLLM_EXPERT_STORE=" + env + " is store " +
             store->id() + ", another bundle's)";
    return nullptr;
  }
  return store;
}

bool close_expert_store(std::string_view id) {
  std::lock_guard<std::mutex> lk(g_registry_mu);
  return registry().erase(std::string(id)) > 0;
}

// ------------------------------------------------------------------------------------------ the ops
namespace {

// expert_ids [T, k] -> distinct experts, ascending; false if one is outside [0, E).
bool distinct_experts(const int64_t* ids, int64_t n, int64_t E, std::vector<int64_t>* out) {
  std::vector<uint8_t> seen(E, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= E) return false;
    seen[ids[i]] = 1;
  }
  out->clear();
  for (int64_t e = 0; e < E; ++e)
    if (seen[e]) out->push_back(e);
  return true;
}

bool lookup(std::string_view store_id, int64_t layer, std::shared_ptr<ExpertStore>* store, const ExpertLayer** L,
            std::string* error) {
  *store = find_expert_store(store_id, error);
  if (!*store) return false;
  *L = (*store)->layer(layer);
  if (!*L) {
    *error = (*store)->name() + ": the expert store has no layer " + std::to_string(layer);
    return false;
  }
  return true;
}

bool prefetch_experts(const int64_t* ids, int64_t n, std::string_view store_id, int64_t layer, std::string* error) {
  std::shared_ptr<ExpertStore> store;
  const ExpertLayer* L;
  if (!lookup(store_id, layer, &store, &L, error)) return false;
  std::vector<int64_t> experts;
  if (!distinct_experts(ids, n, L->experts, &experts)) return true;  // expert_store_moe_ffn reports it
  if (static_cast<int64_t>(experts.size()) > store->capacity()) experts.resize(store->capacity());  // first batch
  store->prefetch(L, std::move(experts));
  return true;
}

bool run_stored(const float* x, const int64_t* ids, const float* weights, int64_t T, int64_t k, int64_t H,
                std::string_view store_id, int64_t layer, MoeActivation act, float* out, std::string* error) {
  std::shared_ptr<ExpertStore> store;
  const ExpertLayer* L;
  if (!lookup(store_id, layer, &store, &L, error)) return false;
  if (H != L->hidden) {
    *error = store->name() + ": layer " + std::to_string(layer) + " experts take hidden size " +
             std::to_string(L->hidden) + ", x has " + std::to_string(H);
    return false;
  }
  std::vector<int64_t> experts;
  if (!distinct_experts(ids, T * k, L->experts, &experts)) {
    *error = "expert_store_moe_ffn: expert_ids must lie in [0, " + std::to_string(L->experts) + ")";
    return false;
  }
  const ExpertBlockLayout lay = expert_block_layout(*L);
  const int64_t cap = store->capacity(), E = L->experts, F = L->ffn;
  if (experts.empty()) std::fill(out, out + T * H, 0.0f);
  ExpertStore::Batch batch;
  for (size_t first = 0; first < experts.size(); first += cap) {
    const int64_t n = std::min<int64_t>(cap, experts.size() - first);
    if (!store->acquire(L, experts.data() + first, n, &batch, error)) return false;
    const uint8_t* b = batch.base;
    const bool acc = first > 0;
    if (L->format == kExpertAny4) {
      auto stack = [&](int i, int64_t groups) {
        return Any4Stack{b + lay.offset[i], reinterpret_cast<const uint16_t*>(b + lay.offset[i + 1]),
                         b + lay.offset[i + 2], b + lay.offset[i + 3], groups};
      };
      MoeAny4Experts ex{stack(0, L->gate_groups), stack(4, L->up_groups), stack(8, L->down_groups),
                        L->lut_dtype == 0, L->scales_dtype == 0, E, F};
      ex.expert_stride = batch.stride, ex.slot = batch.block.data(), ex.accumulate = acc;
      moe_ffn_any4(x, ids, weights, T, k, H, ex, act, NeuronSparsity::kAuto, out);
    } else {
      MoeFloatExperts ex{b + lay.offset[0], b + lay.offset[1], b + lay.offset[2], L->format == kExpertBf16, E, F};
      ex.expert_stride = batch.stride, ex.slot = batch.block.data(), ex.accumulate = acc;
      moe_ffn_float(x, ids, weights, T, k, H, ex, act, NeuronSparsity::kAuto, out);
    }
    store->release(L, experts.data() + first, n);
  }
  return true;
}

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

void fail(KernelRuntimeContext& ctx, const std::string& message) {
  ET_LOG(Error, "%s", message.c_str());
  set_last_error(message);
  ctx.fail(Error::InvalidArgument);
}

bool resize_like(const Tensor& like, Tensor& out) {
  SizesType sizes[2] = {static_cast<SizesType>(like.size(0)), static_cast<SizesType>(like.size(1))};
  return executorch::runtime::resize_tensor(out, {sizes, 2}) == Error::Ok;
}

Tensor& expert_store_prefetch_out(KernelRuntimeContext& ctx, const Tensor& expert_ids, std::string_view store,
                            int64_t layer, Tensor& out) {
  if (expert_ids.dim() != 2 || expert_ids.scalar_type() != ScalarType::Long ||
      out.scalar_type() != ScalarType::Long || !resize_like(expert_ids, out)) {
    fail(ctx, "expert_store_prefetch: expected int64 expert_ids [T, k] and an int64 out");
    return out;
  }
  std::memcpy(out.mutable_data_ptr<int64_t>(), expert_ids.const_data_ptr<int64_t>(), expert_ids.nbytes());
  std::string error;
  if (!prefetch_experts(expert_ids.const_data_ptr<int64_t>(), expert_ids.numel(), store, layer, &error))
    fail(ctx, error);
  return out;
}

Tensor& expert_store_moe_ffn_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& ids, const Tensor& w,
                           std::string_view store, int64_t layer, std::string_view activation, Tensor& out) {
  MoeActivation act;
  if (activation == "reglu") act = MoeActivation::kReglu;
  else if (activation == "swiglu") act = MoeActivation::kSwiglu;
  else {
    fail(ctx, "expert_store_moe_ffn: activation must be reglu or swiglu");
    return out;
  }
  const bool ok = x.dim() == 2 && x.scalar_type() == ScalarType::Float && ids.dim() == 2 &&
                  ids.scalar_type() == ScalarType::Long && ids.size(0) == x.size(0) && ids.size(1) >= 1 &&
                  w.dim() == 2 && w.scalar_type() == ScalarType::Float && w.size(0) == ids.size(0) &&
                  w.size(1) == ids.size(1) && out.scalar_type() == ScalarType::Float && resize_like(x, out);
  if (!ok) {
    fail(ctx, "expert_store_moe_ffn: expected x fp32 [T, H], expert_ids int64 [T, k], expert_weights fp32 [T, k], "
              "fp32 out");
    return out;
  }
  std::string error;
  if (!run_stored(x.const_data_ptr<float>(), ids.const_data_ptr<int64_t>(), w.const_data_ptr<float>(), x.size(0),
                  ids.size(1), x.size(1), store, layer, act, out.mutable_data_ptr<float>(), &error))
    fail(ctx, error);
  return out;
}

}  // namespace
}  // namespace pocketllm

EXECUTORCH_LIBRARY(pocketllm, "expert_store_prefetch.out", pocketllm::expert_store_prefetch_out);
EXECUTORCH_LIBRARY(pocketllm, "expert_store_moe_ffn.out", pocketllm::expert_store_moe_ffn_out);

// ------------------------------------------------------------------------------------------ C entry points
// For the Python runner (opening the bundle's store with its budget, statistics) and the tests (ctypes). Strings
// are NUL-terminated; error buffers receive one line. Return 1 on success, 0 otherwise.
namespace {
void copy_error(const std::string& e, char* err, int64_t errlen) {
  if (err && errlen > 0) std::snprintf(err, static_cast<size_t>(errlen), "%s", e.c_str());
}
}  // namespace

// budget_bytes 0: unbounded (memory-mapped). prefetch: start the helper thread. id_out: 33 bytes (32 hex + NUL).
extern "C" int pocketllm_expert_store_open(const char* path, int64_t budget_bytes, int64_t prefetch, char* id_out,
                                           char* err, int64_t errlen) {
  std::string error;
  auto store = pocketllm::open_expert_store(path, budget_bytes, prefetch != 0, &error);
  if (!store) {
    copy_error(error, err, errlen);
    return 0;
  }
  if (id_out) std::snprintf(id_out, 33, "%s", store->id().c_str());
  return 1;
}

extern "C" int pocketllm_expert_store_close(const char* id) { return pocketllm::close_expert_store(id) ? 1 : 0; }

// out: pocketllm::kExpertStatsFields int64 values in ExpertStoreStats order.
extern "C" int pocketllm_expert_store_stats(const char* id, int64_t* out) {
  std::string error;
  auto store = pocketllm::find_expert_store(id, &error);
  if (!store) return 0;
  const pocketllm::ExpertStoreStats s = store->stats();
  std::memcpy(out, &s, sizeof(s));
  return 1;
}

extern "C" int pocketllm_expert_store_drain(const char* id) {
  std::string error;
  auto store = pocketllm::find_expert_store(id, &error);
  if (!store) return 0;
  store->drain();
  return 1;
}

// The message of the last failed expert_store_prefetch.out / expert_store_moe_ffn.out kernel call in this process.
extern "C" int pocketllm_expert_store_last_error(char* err, int64_t errlen) {
  std::lock_guard<std::mutex> lk(pocketllm::g_registry_mu);
  copy_error(pocketllm::g_last_error, err, errlen);
  return pocketllm::g_last_error.empty() ? 0 : 1;
}

extern "C" int pocketllm_expert_store_prefetch(const int64_t* ids, int64_t T, int64_t k, const char* id, int64_t layer,
                                         char* err, int64_t errlen) {
  std::string error;
  if (!pocketllm::prefetch_experts(ids, T * k, id, layer, &error)) {
    copy_error(error, err, errlen);
    return 0;
  }
  return 1;
}

// activation: 0 reglu, 1 swiglu.
extern "C" int pocketllm_expert_store_moe_ffn(const float* x, const int64_t* ids, const float* weights, int64_t T,
                                        int64_t k, int64_t H, const char* id, int64_t layer, int64_t activation,
                                        float* out, char* err, int64_t errlen) {
  std::string error;
  if (!pocketllm::run_stored(x, ids, weights, T, k, H, id, layer, static_cast<pocketllm::MoeActivation>(activation),
                             out, &error)) {
    copy_error(error, err, errlen);
    return 0;
  }
  return 1;
}
