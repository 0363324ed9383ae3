// A CPU allocator that keeps large blocks mapped between forwards (see block_cache.h).
//
// Why: glibc hands large freed blocks back to the kernel (heap trim, munmap), so a fresh
// activation buffer takes one page fault per 4 KiB page on first touch. In a ResNet-50 forward
// at batch 8, 224 px, that is 10-30 thousand faults and about a tenth of the time on a 2-core
// VM. Inside a cache scope, allocations of at least kMinBytes come from blocks of the same
// (page-rounded) size freed earlier, which this cache keeps instead of returning them to glibc.
// A cached block that no allocation takes within kStaleScopes scopes is freed (the input shape
// changed, or outputs the caller had kept were freed); cpu_cache_release() frees them all.
// Allocations of at least kMinBytes while paused (long-lived ones: folded and prepacked
// weights) are not cached, but come from the kernel as the cached blocks do (map_block).
// Everything else, outside a scope or smaller, goes to the allocator this one replaced.
//
// Why blocks come from mmap and not from glibc: once glibc has freed one large mapped block,
// its mmap threshold rises to that block's size (up to 32 MiB), and large blocks come from its
// heap instead, which it only shrinks from the top. Weights prepacked again for every new
// input shape, held while the activations around them come and go, then fragment that heap:
// a ResNet-18 at 120 random sizes left 700-900 MiB free in it and resident, which neither
// releasing this cache nor the oracle's 80 MiB explained (bench/results/cpu-memory/). Blocks
// mapped here go back to the kernel when freed, and leave glibc's threshold where it was.

#include "block_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#if !defined(_WIN32)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <cstdint>
#include <iterator>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace fastres {
namespace {

// Smaller blocks come from glibc's arenas, which keep them mapped anyway.
constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kPageBytes = 4096;
// Several training steps of the deepest model (a scope per residual block, 50 in ResNet-152):
// a block freed in the backward is taken again in the next forward.
constexpr uint64_t kStaleScopes = 256;
constexpr uint64_t kSweepEveryScopes = 32;

thread_local int scope_depth = 0;
// cpu_cache_pause() calls on this thread not yet resumed (allocations inside are long-lived).
thread_local int pause_depth = 0;

// A block from the kernel, page-aligned, of a size that is a multiple of kPageBytes.
void* map_block(size_t size) {
#if defined(_WIN32)
  return c10::alloc_cpu(size);
#else
  void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK_WITH(OutOfMemoryError, ptr != MAP_FAILED, "fastres: mmap of ", size,
                   " bytes failed (out of memory)");
  return ptr;
#endif
}

void unmap_block(void* ptr, size_t size) {
#if defined(_WIN32)
  c10::free_cpu(ptr);
#else
  munmap(ptr, size);
#endif
}

class BlockCache final : public c10::Allocator {
 public:
  explicit BlockCache(c10::Allocator* base) : base_(base), base_raw_deleter_(base->raw_deleter()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes || (scope_depth == 0 && pause_depth == 0)) {
      return base_->allocate(nbytes);
    }
    const size_t size = (nbytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    if (scope_depth == 0) {  // paused: long-lived, not cached
      void* ptr = map_block(size);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        long_lived_.emplace(ptr, size);
      }
      report(ptr, static_cast<int64_t>(size));
      return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = take_cached(size);
    const bool hit = ptr != nullptr;
    if (!hit) {
      ptr = map_block(size);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++(hit ? hits_ : misses_);
      live_.emplace(ptr, size);
      live_bytes_ += size;
    }
    report(ptr, static_cast<int64_t>(size));
    return {ptr, ptr, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Blocks from the base allocator keep its deleter; a raw pointer handed back here is
  // recognised as cached or not (raw_allocate / raw_deallocate).
  c10::DeleterFnPtr raw_deleter() const override {
    return base_raw_deleter_ != nullptr ? &free_block : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // An outermost scope begins: the scope clock ticks, and now and then stale blocks go.
  void tick() {
    std::vector<std::pair<void*, size_t>> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (++scopes_ % kSweepEveryScopes != 0) {
        return;
      }
      evict_if(to_free, [this](const Cached& block) {
        return block.freed_at + kStaleScopes < scopes_;
      });
    }
    free_all(to_free);
  }

  CpuCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {live_bytes_, cached_bytes_, hits_, misses_};
  }

  void release() {
    std::vector<std::pair<void*, size_t>> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_if(to_free, [](const Cached&) { return true; });
    }
    free_all(to_free);
  }

  // A child of fork() has one thread: a mutex some other thread of the parent held would
  // never be released.
  void reset_mutex_after_fork() { new (&mutex_) std::mutex(); }

  static void free_block(void* ptr);

 private:
  struct Cached {
    void* ptr;
    uint64_t freed_at;  // the scope clock when it was freed
  };

  void* take_cached(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = cached_.find(size);
    if (it == cached_.end() || it->second.empty()) {
      return nullptr;
    }
    void* ptr = it->second.back().ptr;
    it->second.pop_back();
    cached_bytes_ -= size;
    return ptr;
  }

  void give_back(void* ptr) {
    size_t size = 0;
    bool long_lived = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        cached_[size].push_back({ptr, scopes_});
        cached_bytes_ += size;
      } else if ((it = long_lived_.find(ptr)) != long_lived_.end()) {
        size = it->second;
        long_lived_.erase(it);
        long_lived = true;
      }
    }
    if (size == 0) {
      base_raw_deleter_(ptr);  // not this cache's block: the base allocator's (raw_deallocate)
      return;
    }
    report(ptr, -static_cast<int64_t>(size));
    if (long_lived) {
      unmap_block(ptr, size);
    }
  }

  // Moves the cached blocks that `evict` picks into to_free (freed after the lock is released).
  template <typename Pred>
  void evict_if(std::vector<std::pair<void*, size_t>>& to_free, const Pred& evict) {
    for (auto entry = cached_.begin(); entry != cached_.end();) {
      auto& blocks = entry->second;
      for (size_t i = 0; i < blocks.size();) {
        if (evict(blocks[i])) {
          to_free.emplace_back(blocks[i].ptr, entry->first);
          cached_bytes_ -= entry->first;
          blocks[i] = blocks.back();
          blocks.pop_back();
        } else {
          ++i;
        }
      }
      entry = blocks.empty() ? cached_.erase(entry) : std::next(entry);
    }
  }

  static void free_all(const std::vector<std::pair<void*, size_t>>& blocks) {
    for (const auto& [ptr, size] : blocks) {
      unmap_block(ptr, size);
    }
  }

  // To torch.profiler's memory view, as PyTorch's own CPU allocator reports (outside the lock).
  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) {
      return;
    }
    size_t live = 0;
    size_t cached = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      cached = cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(
        ptr, delta, live, live + cached, c10::Device(c10::DeviceType::CPU));
  }

  c10::Allocator* const base_;
  const c10::DeleterFnPtr base_raw_deleter_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;
  std::unordered_map<void*, size_t> long_lived_;  // allocated while paused, never cached
  std::unordered_map<size_t, std::vector<Cached>> cached_;
  size_t live_bytes_ = 0;
  size_t cached_bytes_ = 0;
  uint64_t scopes_ = 0;  // outermost scopes entered so far, on any thread
  uint64_t hits_ = 0;
  uint64_t misses_ = 0;
};

// Never destroyed: tensors holding its blocks may outlive every static destructor. Null until
// the first scope installs it, and if another allocator of higher priority keeps the CPU.
BlockCache* installed_cache = nullptr;

void BlockCache::free_block(void* ptr) { installed_cache->give_back(ptr); }

bool install() {
  static const bool installed = [] {
    auto* candidate = new BlockCache(c10::GetCPUAllocator());
    c10::SetCPUAllocator(candidate, /*priority=*/0);
    if (c10::GetCPUAllocator() != candidate) {
      delete candidate;  // a higher-priority allocator is set: leave it alone, cache nothing
      return false;
    }
    installed_cache = candidate;
#if !defined(_WIN32)
    pthread_atfork(nullptr, nullptr, [] { installed_cache->reset_mutex_after_fork(); });
#endif
    return true;
  }();
  return installed;
}

}  // namespace

bool cpu_cache_enter() {
  if (!install()) {
    return false;
  }
  if (scope_depth++ == 0) {
    installed_cache->tick();
  }
  return true;
}

void cpu_cache_exit() {
  if (scope_depth > 0) {
    --scope_depth;
  }
}

int cpu_cache_pause() {
  const int depth = scope_depth;
  scope_depth = 0;
  ++pause_depth;
  return depth;
}

void cpu_cache_resume(int depth) {
  scope_depth = depth;
  if (pause_depth > 0) {
    --pause_depth;
  }
}

void cpu_cache_release() {
  if (installed_cache != nullptr) {
    installed_cache->release();
  }
}

CpuCacheStats cpu_cache_stats() {
  return installed_cache != nullptr ? installed_cache->stats() : CpuCacheStats{};
}

}  // namespace fastres
