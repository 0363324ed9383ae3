// The native backend's CPU block cache (block_cache.cpp), called from the module fastres._C.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastres {

struct CpuCacheStats {
  size_t live_bytes = 0;        // in cached-allocator blocks now held by tensors
  size_t cached_bytes = 0;      // freed blocks kept for reuse
  uint64_t hits = 0;            // allocations served from the cache
  uint64_t misses = 0;          // allocations inside a scope that found no cached block
};

// Enters a scope on this thread (scopes nest): large CPU allocations reuse cached blocks.
// Installs the cache as the CPU allocator on first use; false (and no scope) where a
// higher-priority CPU allocator keeps it out.
bool cpu_cache_enter();
void cpu_cache_exit();
// Leaves every scope of this thread (for long-lived allocations, not cached: those of 1 MiB or
// more are mapped from the kernel), returning what resume takes; every pause needs its resume.
int cpu_cache_pause();
void cpu_cache_resume(int depth);
// Frees every cached block; blocks still held by tensors come back later.
void cpu_cache_release();
CpuCacheStats cpu_cache_stats();

}  // namespace fastres
