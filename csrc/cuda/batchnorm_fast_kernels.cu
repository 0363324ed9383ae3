// Bandwidth-bound CUDA kernels of the fastres:: BatchNorm family (launchers and contracts:
// batchnorm_fast_kernels.h; semantics: csrc/fastres.cpp). fp32 / fp16 / bf16 in, fp32
// accumulation; fp64 runs the kernels of batchnorm_kernels.cu.
//
// Work split, per layout (x viewed as [N, C, S]):
// - channels_last (rows of C): 512-thread blocks of TX lanes x TY rows, TX the power of two
//   that covers C / VEC channel vectors (at most 32; blockIdx.y picks the tile of TX vectors),
//   so a warp holds 32 / TX rows and no lane idles where C / VEC is a power of two. A thread
//   keeps its VEC channels for the whole kernel; blockIdx.x picks a slice of the rows.
// - NCHW (planes of S): one channel per blockIdx.y, the channel's N * S values flattened
//   (image = index / (S / VEC) by a multiply-shift division) and sliced over blockIdx.x.
// Every thread issues U independent loads of VEC elements (16 bytes where the pointers and C
// or S allow, else 4 bytes or one element) before it uses any.
// Statistics: per thread, each batch of U loads is reduced to (count, mean, M2) exactly and
// merged into the thread's Welford state with Chan's formula (one reciprocal per batch). Block
// merge: shuffles over the rows of a warp, then the warps' results in shared memory in warp
// order. Grid merge in the same launch: each block writes its partials, then counts itself in
// an arrival counter of its channel tile; the last block to arrive merges all partials in
// slice order (deterministic) and writes the outputs (mean, M2, and the finalize).
// Element-wise kernels (apply, backward element-wise): the same split, per-channel constants
// loaded once per thread into registers.
// No torch headers: see batchnorm_kernels.h.

#include "batchnorm_fast_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <initializer_list>
#include <type_traits>

namespace fastres {
namespace cuda {
namespace fast {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPartials = 1024;     // row slices per channel tile in a reduction
// U, loads in flight per thread and input: with two 512-thread blocks per SM (at most 64
// registers) that keeps 32-64 KiB in flight per SM, above what its share of DRAM bandwidth times
// latency needs (about 3.35 TB/s x 0.6 us / 132 SMs = 15 KB on an H100).
constexpr int kStatsLoads = 4;
constexpr int kApplyLoads = 2;
constexpr int kBackwardLoads = 1;  // grad_out, x and r: three loads in flight
// Blocks per SM the register budget is set for (__launch_bounds__): two, 64 registers.
constexpr int kMinBlocks = 2;
// Channels per thread in channels_last of the kernels with per-channel constants (apply,
// backward): 4 (16-byte fp32, 8-byte fp16 / bf16 loads) keeps them within kMinBlocks' registers.
constexpr int kMaxChannels = 4;
constexpr int64_t kMaxRows = 1 << 24;  // N * S: counts exact in fp32, NCHW indices in 32 bits
constexpr int64_t kMaxChannelTiles = 65535;  // gridDim.y
constexpr int kBlocksPerSm = 2048 / kThreads;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 1 / v for v >= 1: the hardware approximation refined by a Newton step (IEEE division
// compiles to a slow-path call).
__device__ __forceinline__ float recip(float v) {
  const float r = __fdividef(1.0f, v);
  return r * (2.0f - v * r);
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + i);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, int64_t i, const Pack<T, VEC>& v) {
  *reinterpret_cast<Pack<T, VEC>*>(p + i) = v;
}

// n / d for 32-bit n and d >= 1 by a multiply and a shift (Granlund-Montgomery): with
// l = ceil(log2 d) and m = floor(2^32 (2^l - d) / d) + 1, n / d = (mulhi(m, n) + n) >> l.
struct FastDiv {
  uint32_t d, m, l;
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(__umulhi(m, n)) + n) >> l);
  }
};

FastDiv make_fast_div(uint32_t d) {
  uint32_t l = 0;
  while ((uint64_t{1} << l) < d) ++l;
  const uint64_t m = ((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1;
  return {d, static_cast<uint32_t>(m), l};
}

// Where a thread works: channels_last, lanes tx over channel vectors and rows ty (TX = 1 << log_tx
// lanes, TY = kThreads / TX rows); NCHW, log_tx = 0: every thread a row.
struct Lane {
  int log_tx;
  __device__ __forceinline__ int tx() const { return threadIdx.x & ((1 << log_tx) - 1); }
  __device__ __forceinline__ int ty() const { return threadIdx.x >> log_tx; }
  __device__ __forceinline__ int rows() const { return kThreads >> log_tx; }
  __device__ __forceinline__ int lanes() const { return 1 << log_tx; }
};

// ---------------------------------------------------------------------------------------------
// Block merges. After the call, thread t < lanes * W holds column t = tx * W + j (the channel
// tile's t-th channel). Every thread of the block must call them; a __syncthreads() must
// separate two calls (they share their static shared memory).

// Merges (nb, mb, qb) into the Welford state (n, mean, m2) of W channels sharing the count.
template <int W>
__device__ __forceinline__ void welford_merge(float& n, float (&mean)[W], float (&m2)[W],
                                              float nb, const float (&mb)[W],
                                              const float (&qb)[W]) {
  const float total = n + nb;
  if (total == 0.0f) return;
  const float wb = nb * recip(total);
  const float nwb = n * wb;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const float d = mb[j] - mean[j];
    mean[j] += d * wb;
    m2[j] += qb[j] + d * d * nwb;
  }
  n = total;
}

struct Column {
  float n, mean, m2;
};

template <int W>
__device__ __forceinline__ Column welford_block_merge(float n, float (&mean)[W], float (&m2)[W],
                                                      Lane lane) {
  // The rows of a warp (lanes tx, tx + TX, ...): halving shuffles down to the first row.
  for (int off = 16; off >= lane.lanes(); off >>= 1) {
    float mb[W], qb[W];
    const float nb = __shfl_down_sync(0xffffffffu, n, off);
#pragma unroll
    for (int j = 0; j < W; ++j) {
      mb[j] = __shfl_down_sync(0xffffffffu, mean[j], off);
      qb[j] = __shfl_down_sync(0xffffffffu, m2[j], off);
    }
    welford_merge(n, mean, m2, nb, mb, qb);
  }
  __shared__ float s_n[kWarps][32];
  __shared__ float s_mean[kWarps][32 * W];
  __shared__ float s_m2[kWarps][32 * W];
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32;
  if (l < lane.lanes()) {
    s_n[warp][l] = n;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      s_mean[warp][l * W + j] = mean[j];
      s_m2[warp][l * W + j] = m2[j];
    }
  }
  __syncthreads();
  Column col{0.0f, 0.0f, 0.0f};
  const int t = threadIdx.x;
  if (t < lane.lanes() * W) {
    float cn = s_n[0][t / W], cm[1] = {s_mean[0][t]}, cq[1] = {s_m2[0][t]};
    for (int w = 1; w < kWarps; ++w) {
      const float mb[1] = {s_mean[w][t]}, qb[1] = {s_m2[w][t]};
      welford_merge(cn, cm, cq, s_n[w][t / W], mb, qb);
    }
    col = {cn, cm[0], cq[0]};
  }
  return col;
}

// Sums K fields of W channels per thread over the block's rows (field by field, one shared
// buffer); returns the column's K sums.
template <int K, int W>
__device__ __forceinline__ void sum_block_merge(float (&v)[K][W], Lane lane, float (&col)[K]) {
  for (int off = 16; off >= lane.lanes(); off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
#pragma unroll
      for (int j = 0; j < W; ++j) v[k][j] += __shfl_down_sync(0xffffffffu, v[k][j], off);
    }
  }
  __shared__ float s_sum[kWarps][32 * W];
  const int warp = threadIdx.x / 32, l = threadIdx.x % 32, t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (l < lane.lanes()) {
#pragma unroll
      for (int j = 0; j < W; ++j) s_sum[warp][l * W + j] = v[k][j];
    }
    __syncthreads();
    float a = 0.0f;
    if (t < lane.lanes() * W) {
      for (int w = 0; w < kWarps; ++w) a += s_sum[w][t];
    }
    col[k] = a;
    __syncthreads();
  }
}

// The grid step of a reduction: this block (slice blockIdx.x of blockIdx.y's channels) has
// written its partials; counts its arrival and returns whether it is the last of its tile, in
// which case every partial of the tile is visible to it. Every thread must call it.
__device__ __forceinline__ bool last_to_arrive(unsigned* arrivals) {
  __shared__ bool s_last;
  __threadfence();  // this thread's partials before the count
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(arrivals + blockIdx.y, 1u) == gridDim.x - 1;
  __syncthreads();
  if (s_last) __threadfence();
  return s_last;
}

// ---------------------------------------------------------------------------------------------
// Statistics

struct StatsOut {
  float* mean;
  float* m2;
  float* part_mean;  // [P, C]
  float* part_m2;    // [P, C]
  float* part_n;     // [tiles, P]
  unsigned* arrivals;
  // Finalize (see Finalize in the header; nullptr: not wanted).
  const float* weight;
  const float* bias;
  float eps;
  float* scale;
  float* shift;
  float* invstd;
  float* running_mean;
  float* running_var;
  float momentum;
};

__device__ __forceinline__ void write_stats(const StatsOut& o, int64_t c, const Column& col) {
  o.mean[c] = col.mean;
  o.m2[c] = col.m2;
  if (o.scale) {
    const float inv = rsqrtf(col.m2 / col.n + o.eps);
    const float s = o.weight ? o.weight[c] * inv : inv;
    o.scale[c] = s;
    o.shift[c] = (o.bias ? o.bias[c] : 0.0f) - col.mean * s;
    if (o.invstd) o.invstd[c] = inv;
  }
  if (o.running_mean) {
    const float f = o.momentum;
    o.running_mean[c] = (1.0f - f) * o.running_mean[c] + f * col.mean;
    o.running_var[c] = (1.0f - f) * o.running_var[c] + f * col.m2 / (col.n - 1.0f);
  }
}

// The end of both statistics kernels: the block's columns (thread t < lanes * W, channel
// tile_c0 + t) are published, and the last block of the tile merges every slice's. W: channels
// per column thread; c0 / active: this thread's first channel and whether it has any (for the
// last block's loads).
template <int W>
__device__ __forceinline__ void finish_stats(const StatsOut& o, int64_t C, Lane lane,
                                             int64_t tile_c0, int64_t c0, bool active,
                                             const Column& col) {
  const int t = threadIdx.x;
  const bool owner = t < lane.lanes() * W && tile_c0 + t < C;
  const int64_t P = gridDim.x;
  if (P == 1) {
    if (owner) write_stats(o, tile_c0 + t, col);
    return;
  }
  if (owner) {
    o.part_mean[blockIdx.x * C + tile_c0 + t] = col.mean;
    o.part_m2[blockIdx.x * C + tile_c0 + t] = col.m2;
  }
  if (t == 0) o.part_n[blockIdx.y * P + blockIdx.x] = col.n;  // the same for all the tile's
  if (!last_to_arrive(o.arrivals)) return;
  float n = 0.0f, mean[W], m2[W];
#pragma unroll
  for (int j = 0; j < W; ++j) mean[j] = m2[j] = 0.0f;
  if (active) {
    for (int64_t p = lane.ty(); p < P; p += lane.rows()) {
      float mb[W], qb[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        mb[j] = __ldcg(o.part_mean + p * C + c0 + j);
        qb[j] = __ldcg(o.part_m2 + p * C + c0 + j);
      }
      welford_merge(n, mean, m2, __ldcg(o.part_n + blockIdx.y * P + p), mb, qb);
    }
  }
  __syncthreads();  // the first merge's shared memory
  const Column total = welford_block_merge<W>(n, mean, m2, lane);
  if (owner) write_stats(o, tile_c0 + t, total);
}

// The exact (count, mean, M2) of the first nb of U loaded vectors, merged into the thread's
// state: per channel j of the vectors (channels_last), or over all their values (NCHW, below).
template <typename T, int VEC, int U>
__device__ __forceinline__ void merge_batch_per_channel(const Pack<T, VEC> (&v)[U], int nb,
                                                        float& n, float (&mean)[VEC],
                                                        float (&m2)[VEC]) {
  const float inv = recip(static_cast<float>(nb));
  float mb[VEC], qb[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u) s += u < nb ? to_acc(v[u].v[j]) : 0.0f;
    mb[j] = s * inv;
    float q = 0.0f;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float d = to_acc(v[u].v[j]) - mb[j];
      q += u < nb ? d * d : 0.0f;
    }
    qb[j] = q;
  }
  welford_merge(n, mean, m2, static_cast<float>(nb), mb, qb);
}

template <typename T, int VEC, int U>
__device__ __forceinline__ void merge_batch_one_channel(const Pack<T, VEC> (&v)[U], int nb,
                                                        float& n, float (&mean)[1],
                                                        float (&m2)[1]) {
  const float count = static_cast<float>(nb * VEC);
  float s = 0.0f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += u < nb ? to_acc(v[u].v[j]) : 0.0f;
  }
  const float mb[1] = {s * recip(count)};
  float q = 0.0f;
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = to_acc(v[u].v[j]) - mb[0];
      q += u < nb ? d * d : 0.0f;
    }
  }
  const float qb[1] = {q};
  welford_merge(n, mean, m2, count, mb, qb);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_cl_kernel(const T* __restrict__ x, int64_t rows, int64_t C, int log_tx, StatsOut o) {
  constexpr int U = kStatsLoads;
  const Lane lane{log_tx};
  const int64_t tile_c0 = static_cast<int64_t>(blockIdx.y) * lane.lanes() * VEC;
  const int64_t c0 = tile_c0 + lane.tx() * VEC;
  const bool active = c0 < C;
  float n = 0.0f, mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = 0.0f;
  if (active) {
    const int64_t step = static_cast<int64_t>(lane.rows()) * U;
    for (int64_t r0 = blockIdx.x * step + lane.ty(); r0 < rows; r0 += gridDim.x * step) {
      Pack<T, VEC> v[U] = {};
      int nb = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t r = r0 + static_cast<int64_t>(u) * lane.rows();
        if (r < rows) {
          v[u] = load<T, VEC>(x, r * C + c0);
          nb = u + 1;
        }
      }
      merge_batch_per_channel<T, VEC, U>(v, nb, n, mean, m2);
    }
  }
  const Column col = welford_block_merge<VEC>(n, mean, m2, lane);
  finish_stats<VEC>(o, C, lane, tile_c0, c0, active, col);
}

// x's offset of the k-th vector of channel c: image k / (S / VEC), position k % (S / VEC).
__device__ __forceinline__ int64_t plane_offset(uint32_t k, const FastDiv& per_image, int64_t C,
                                                int64_t S, int64_t c, int vec) {
  const uint32_t img = per_image.div(k);
  const uint32_t pos = k - img * per_image.d;
  return (static_cast<int64_t>(img) * C + c) * S + static_cast<int64_t>(pos) * vec;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_nchw_kernel(const T* __restrict__ x, int64_t C, int64_t S, FastDiv per_image,
                      int64_t vectors, StatsOut o) {
  constexpr int U = kStatsLoads;
  const Lane lane{0};
  const int64_t c = blockIdx.y;
  float n = 0.0f, mean[1] = {0.0f}, m2[1] = {0.0f};
  const int64_t step = static_cast<int64_t>(kThreads) * U;
  for (int64_t k0 = blockIdx.x * step + threadIdx.x; k0 < vectors; k0 += gridDim.x * step) {
    Pack<T, VEC> v[U] = {};
    int nb = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * kThreads;
      if (k < vectors) {
        v[u] = load<T, VEC>(x, plane_offset(static_cast<uint32_t>(k), per_image, C, S, c, VEC));
        nb = u + 1;
      }
    }
    merge_batch_one_channel<T, VEC, U>(v, nb, n, mean, m2);
  }
  const Column col = welford_block_merge<1>(n, mean, m2, lane);
  finish_stats<1>(o, C, lane, c, c, true, col);
}

// ---------------------------------------------------------------------------------------------
// Per-channel constants in registers

// The tail's constants of VEC channels from c0 (scale_r / shift_r only with a second BN).
template <int VEC, bool HAS_SR>
struct TailRegs {
  float sc[VEC], sh[VEC], sc_r[HAS_SR ? VEC : 1], sh_r[HAS_SR ? VEC : 1];

  __device__ __forceinline__ void load(const Tail& t, int64_t c0) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sc[j] = static_cast<const float*>(t.scale)[c0 + j];
      sh[j] = static_cast<const float*>(t.shift)[c0 + j];
      if constexpr (HAS_SR) {
        sc_r[j] = static_cast<const float*>(t.scale_r)[c0 + j];
        sh_r[j] = static_cast<const float*>(t.shift_r)[c0 + j];
      }
    }
  }

  // z = x * scale + shift [+ r | + r * scale_r + shift_r] of channel c0 + j.
  template <bool HAS_R>
  __device__ __forceinline__ float z(float x, float r, int j) const {
    float v = x * sc[j] + sh[j];
    if constexpr (HAS_R) {
      if constexpr (HAS_SR) {
        v += r * sc_r[j] + sh_r[j];
      } else {
        v += r;
      }
    }
    return v;
  }
};

// ReLU's gradient as PyTorch's threshold_backward: 0 where z <= 0, g elsewhere (NaN z too).
__device__ __forceinline__ float relu_grad(float z, float g) { return z <= 0.0f ? 0.0f : g; }

// Channel j's constants for a thread: channels_last, c0 + j; NCHW, the block's channel.
template <bool CL>
__device__ __forceinline__ int channel_slot(int j) {
  return CL ? j : 0;
}

// Where the kernels below iterate: channels_last, rows ty, ty + TY, ... of the block's slice,
// at offset row * C + c0; NCHW, the channel's vectors k at plane_offset. Calls
// body(u, offset) for each of U loads in flight, in two passes: load(u, offset), then use(u,
// offset), so that all U loads are issued before any value is used.
struct Walk {
  int64_t C, S, units, c0;
  FastDiv per_image;
  Lane lane;

  template <bool CL, int VEC, int U, typename Load, typename Use>
  __device__ __forceinline__ void run(Load load_fn, Use use_fn) const {
    const int64_t step = static_cast<int64_t>(CL ? lane.rows() : kThreads) * U;
    const int64_t first = CL ? lane.ty() : threadIdx.x;
    const int64_t stride = CL ? lane.rows() : kThreads;
    for (int64_t i0 = blockIdx.x * step + first; i0 < units; i0 += gridDim.x * step) {
      int64_t off[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t i = i0 + u * stride;
        off[u] = i >= units ? -1
                 : CL       ? i * C + c0
                            : plane_offset(static_cast<uint32_t>(i), per_image, C, S, c0, VEC);
        if (off[u] >= 0) load_fn(u, off[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (off[u] >= 0) use_fn(u, off[u]);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Apply and backward element-wise

template <typename T, int VEC, bool CL, bool HAS_R, bool HAS_SR, bool RELU>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    apply_kernel(const T* __restrict__ x, Tail tail, Walk w, T* __restrict__ out) {
  constexpr int U = kApplyLoads;
  if (CL) w.c0 = (static_cast<int64_t>(blockIdx.y) * w.lane.lanes() + w.lane.tx()) * VEC;
  else w.c0 = blockIdx.y;
  if (w.c0 >= w.C) return;
  constexpr int CH = CL ? VEC : 1;  // channels per thread
  TailRegs<CH, HAS_SR> k;
  k.load(tail, w.c0);
  const T* r = static_cast<const T*>(tail.residual);
  Pack<T, VEC> xv[U], rv[U];
  w.run<CL, VEC, U>(
      [&](int u, int64_t off) {
        xv[u] = load<T, VEC>(x, off);
        if constexpr (HAS_R) rv[u] = load<T, VEC>(r, off);
      },
      [&](int u, int64_t off) {
        Pack<T, VEC> o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          float z = k.template z<HAS_R>(to_acc(xv[u].v[j]), HAS_R ? to_acc(rv[u].v[j]) : 0.0f,
                                        channel_slot<CL>(j));
          if (RELU && z < 0.0f) z = 0.0f;
          o.v[j] = from_acc<T>(z);
        }
        store<T, VEC>(out, off, o);
      });
}

// coef rows (see batchnorm_kernels.h): grad_x = c0 g [+ c1 x + c2], grad_r = c3 g [+ c4 r + c5].
template <int CH, bool TX, bool TR, bool GRAD_R>
struct CoefRegs {
  float a[CH], b[TX ? CH : 1], k[TX ? CH : 1];
  float ra[GRAD_R ? CH : 1], rb[TR ? CH : 1], rk[TR ? CH : 1];

  __device__ __forceinline__ void load(const float* coef, int64_t C, int64_t c0) {
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      a[j] = coef[c0 + j];
      if constexpr (TX) {
        b[j] = coef[C + c0 + j];
        k[j] = coef[2 * C + c0 + j];
      }
      if constexpr (GRAD_R) ra[j] = coef[3 * C + c0 + j];
      if constexpr (TR) {
        rb[j] = coef[4 * C + c0 + j];
        rk[j] = coef[5 * C + c0 + j];
      }
    }
  }
};

template <typename T, int VEC, bool CL, bool HAS_R, bool HAS_SR, bool RELU, bool GRAD_R, bool TX,
          bool TR>
// With both norms training and a ReLU, 10 constants per channel: one block per SM.
__global__ void __launch_bounds__(kThreads, RELU && TR ? 1 : kMinBlocks)
    backward_elemt_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, Tail tail,
                          const float* __restrict__ coef, Walk w, T* __restrict__ grad_x,
                          T* __restrict__ grad_r) {
  constexpr int U = kBackwardLoads;
  constexpr bool NEED_X = RELU || TX;
  constexpr bool NEED_R = HAS_R && ((RELU && HAS_R) || (GRAD_R && TR));
  if (CL) w.c0 = (static_cast<int64_t>(blockIdx.y) * w.lane.lanes() + w.lane.tx()) * VEC;
  else w.c0 = blockIdx.y;
  if (w.c0 >= w.C) return;
  constexpr int CH = CL ? VEC : 1;
  TailRegs<CH, HAS_SR && RELU> k;
  if constexpr (RELU) k.load(tail, w.c0);
  CoefRegs<CH, TX, TR, GRAD_R && HAS_R> cf;
  cf.load(coef, w.C, w.c0);
  const T* r = static_cast<const T*>(tail.residual);
  Pack<T, VEC> gv[U], xv[U], rv[U];
  w.run<CL, VEC, U>(
      [&](int u, int64_t off) {
        gv[u] = load<T, VEC>(grad_out, off);
        if constexpr (NEED_X) xv[u] = load<T, VEC>(x, off);
        if constexpr (NEED_R) rv[u] = load<T, VEC>(r, off);
      },
      [&](int u, int64_t off) {
        Pack<T, VEC> ox, orr;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int s = channel_slot<CL>(j);
          const float xa = NEED_X ? to_acc(xv[u].v[j]) : 0.0f;
          const float ra = NEED_R ? to_acc(rv[u].v[j]) : 0.0f;
          float g = to_acc(gv[u].v[j]);
          if constexpr (RELU) g = relu_grad(k.template z<HAS_R>(xa, ra, s), g);
          float gx = cf.a[s] * g;
          if constexpr (TX) gx += cf.b[s] * xa + cf.k[s];
          ox.v[j] = from_acc<T>(gx);
          if constexpr (GRAD_R && HAS_R) {
            float gr = cf.ra[s] * g;
            if constexpr (TR) gr += cf.rb[s] * ra + cf.rk[s];
            orr.v[j] = from_acc<T>(gr);
          }
        }
        store<T, VEC>(grad_x, off, ox);
        if constexpr (GRAD_R && HAS_R) store<T, VEC>(grad_r, off, orr);
      });
}

// ---------------------------------------------------------------------------------------------
// Backward reduce: sum g, sum g (x - mean), sum g (r - mean_r) per channel.

struct ReduceOut {
  float* sum[3];   // sum_dy, sum_dy_xmu, sum_dy_rmu (the last nullptr without a second BN)
  float* part[3];  // [P, C] each
  unsigned* arrivals;
};

template <typename T, int VEC, bool CL, bool HAS_R, bool HAS_SR, bool RELU>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    backward_reduce_kernel(const T* __restrict__ grad_out, const T* __restrict__ x, Tail tail,
                           const float* __restrict__ mean, const float* __restrict__ mean_r,
                           Walk w, ReduceOut o) {
  constexpr int U = kBackwardLoads;
  constexpr int CH = CL ? VEC : 1;
  constexpr int K = HAS_SR ? 3 : 2;
  const Lane lane = w.lane;
  const int64_t tile_c0 =
      CL ? static_cast<int64_t>(blockIdx.y) * lane.lanes() * VEC : static_cast<int64_t>(blockIdx.y);
  w.c0 = CL ? tile_c0 + lane.tx() * VEC : tile_c0;
  const bool active = w.c0 < w.C;
  float s[K][CH];
#pragma unroll
  for (int q = 0; q < K; ++q) {
#pragma unroll
    for (int j = 0; j < CH; ++j) s[q][j] = 0.0f;
  }
  if (active) {
    TailRegs<CH, HAS_SR && RELU> k;
    if constexpr (RELU) k.load(tail, w.c0);
    float mu[CH], mu_r[HAS_SR ? CH : 1];
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      mu[j] = mean[w.c0 + j];
      if constexpr (HAS_SR) mu_r[j] = mean_r[w.c0 + j];
    }
    const T* r = static_cast<const T*>(tail.residual);
    constexpr bool NEED_R = HAS_R && (RELU || HAS_SR);
    Pack<T, VEC> gv[U], xv[U], rv[U];
    w.run<CL, VEC, U>(
        [&](int u, int64_t off) {
          gv[u] = load<T, VEC>(grad_out, off);
          xv[u] = load<T, VEC>(x, off);
          if constexpr (NEED_R) rv[u] = load<T, VEC>(r, off);
        },
        [&](int u, int64_t) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const int sl = channel_slot<CL>(j);
            const float xa = to_acc(xv[u].v[j]);
            const float ra = NEED_R ? to_acc(rv[u].v[j]) : 0.0f;
            float g = to_acc(gv[u].v[j]);
            if constexpr (RELU) g = relu_grad(k.template z<HAS_R>(xa, ra, sl), g);
            s[0][sl] += g;
            s[1][sl] += g * (xa - mu[sl]);
            if constexpr (HAS_SR) s[K - 1][sl] += g * (ra - mu_r[sl]);
          }
        });
  }
  float col[K];
  sum_block_merge<K, CH>(s, lane, col);
  const int t = threadIdx.x;
  const bool owner = t < lane.lanes() * CH && tile_c0 + t < w.C;
  const int64_t P = gridDim.x;
  if (P > 1) {
    if (owner) {
#pragma unroll
      for (int q = 0; q < K; ++q) o.part[q][blockIdx.x * w.C + tile_c0 + t] = col[q];
    }
    if (!last_to_arrive(o.arrivals)) return;
#pragma unroll
    for (int q = 0; q < K; ++q) {
#pragma unroll
      for (int j = 0; j < CH; ++j) s[q][j] = 0.0f;
    }
    if (active) {
      for (int64_t p = lane.ty(); p < P; p += lane.rows()) {
#pragma unroll
        for (int q = 0; q < K; ++q) {
#pragma unroll
          for (int j = 0; j < CH; ++j) s[q][j] += __ldcg(o.part[q] + p * w.C + w.c0 + j);
        }
      }
    }
    sum_block_merge<K, CH>(s, lane, col);  // (the first merge ends with a barrier)
  }
  if (owner) {
    o.sum[0][tile_c0 + t] = col[0];
    o.sum[1][tile_c0 + t] = col[1];
    if (HAS_SR && o.sum[2]) o.sum[2][tile_c0 + t] = col[K - 1];
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cached[dev] = n > 0 ? n : 132;
  }
  return cached[dev];
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether these kernels take the geometry (else the kernels of batchnorm_kernels.cu run).
bool fits(DType dtype, const Geometry& g) {
  return dtype != DType::kFloat64 && g.c >= 1 && g.n * g.s >= 1 && g.n * g.s < kMaxRows &&
         (g.channels_last || g.c <= kMaxChannelTiles);
}

// The launch shape of one kernel: vector width, lanes, channel tiles, row slices.
struct Plan {
  int vec;
  int log_tx;     // channels_last lanes per row: 1 << log_tx
  int64_t tiles;  // gridDim.y
  int64_t units;  // rows (channels_last) or vectors per channel (NCHW)
  int64_t slices; // gridDim.x
  FastDiv per_image;
};

// loads: U of the kernel; reduction: whether the grid's slices merge (few, so that partials
// stay small) or are element-wise (enough for a few waves, the rest by grid-stride).
Plan make_plan(const Geometry& g, int vec, int loads, bool reduction) {
  Plan p{};
  p.vec = vec;
  const int64_t target = static_cast<int64_t>(sm_count()) * kBlocksPerSm;
  int64_t per_block;
  if (g.channels_last) {
    const int64_t vectors = g.c / vec;
    while (p.log_tx < 5 && (int64_t{1} << p.log_tx) < vectors) ++p.log_tx;
    p.tiles = ceil_div(vectors, int64_t{1} << p.log_tx);
    p.units = g.n * g.s;
    per_block = static_cast<int64_t>(kThreads >> p.log_tx) * loads;
  } else {
    p.tiles = g.c;
    p.units = g.n * (g.s / vec);
    p.per_image = make_fast_div(static_cast<uint32_t>(g.s / vec));
    per_block = static_cast<int64_t>(kThreads) * loads;
  }
  const int64_t needed = ceil_div(p.units, per_block);
  const int64_t wanted = reduction ? std::min<int64_t>(ceil_div(target, p.tiles), kMaxPartials)
                                   : std::max<int64_t>(1, ceil_div(8 * target, p.tiles));
  p.slices = std::max<int64_t>(1, std::min(needed, wanted));
  return p;
}

Walk walk_of(const Geometry& g, const Plan& p) {
  return {g.c, g.s, p.units, 0, p.per_image, Lane{g.channels_last ? p.log_tx : 0}};
}

dim3 grid_of(const Plan& p) {
  return dim3(static_cast<unsigned>(p.slices), static_cast<unsigned>(p.tiles));
}

// Workspace layout: arrival counters [tiles] (256-byte aligned), then `fields` partial arrays
// [slices, C] and the statistics' counts [tiles, slices].
constexpr size_t kCounterBytes = 256;

size_t workspace_bytes(const Plan& p, const Geometry& g, int fields) {
  const size_t counters = ceil_div(p.tiles * sizeof(unsigned), kCounterBytes) * kCounterBytes;
  return counters +
         sizeof(float) * static_cast<size_t>(fields * p.slices * g.c + p.tiles * p.slices);
}

// The largest workspace any vector width may need (the width depends on pointers not yet known).
template <int LOADS, int FIELDS>
size_t max_workspace_bytes(DType dtype, const Geometry& g) {
  size_t bytes = 0;
  const int widths[] = {1, 2, 4, 8};
  const int elem = dtype == DType::kFloat32 ? 4 : 2;
  const int64_t inner = g.channels_last ? g.c : g.s;
  for (int vec : widths) {
    if (vec * elem > 16 || inner % vec != 0) continue;
    bytes = std::max(bytes, workspace_bytes(make_plan(g, vec, LOADS, true), g, FIELDS));
  }
  return bytes;
}

template <typename F>
cudaError_t visit_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::kFloat32:
      f(float{});
      break;
    case DType::kFloat16:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case DType::kFloat64:
      break;  // not reached: fits() sends fp64 to batchnorm_kernels.cu
  }
  return cudaGetLastError();
}

// Calls f(cl, vec) with cl = integral_constant<bool, channels_last> and vec =
// integral_constant<int, VEC>, VEC the widest of (16 bytes, at most CL_CHANNELS channels in
// channels_last), 4 bytes and one element that divides C (channels_last) or S (NCHW) and suits
// every pointer. CL_CHANNELS caps the channels (and so the per-channel constants in registers)
// per thread.
template <typename T, int CL_CHANNELS, typename F>
void visit_shape(const Geometry& g, std::initializer_list<const void*> ptrs, F f) {
  constexpr int V16 = vec16<T>();
  constexpr int V4 = sizeof(T) == 2 ? 2 : 1;
  const int64_t inner = g.channels_last ? g.c : g.s;
  auto width_fits = [&](int vec) {
    bool ok = inner % vec == 0;
    for (const void* p : ptrs) ok = ok && aligned(p, vec * sizeof(T));
    return ok;
  };
  auto with_widest = [&](auto cl, auto widest) {
    constexpr int W = decltype(widest)::value;
    if (width_fits(W)) {
      f(cl, std::integral_constant<int, W>{});
    } else if (V4 > 1 && width_fits(V4)) {
      f(cl, std::integral_constant<int, V4>{});
    } else {
      f(cl, std::integral_constant<int, 1>{});
    }
  };
  if (g.channels_last) {
    with_widest(std::true_type{}, std::integral_constant<int, std::min(V16, CL_CHANNELS)>{});
  } else {
    with_widest(std::false_type{}, std::integral_constant<int, V16>{});
  }
}

template <typename F>
void visit_tail(const Tail& t, F f) {
  auto with_relu = [&](auto r, auto sr) {
    if (t.relu) {
      f(r, sr, std::true_type{});
    } else {
      f(r, sr, std::false_type{});
    }
  };
  if (!t.residual) {
    with_relu(std::false_type{}, std::false_type{});
  } else if (t.scale_r) {
    with_relu(std::true_type{}, std::true_type{});
  } else {
    with_relu(std::true_type{}, std::false_type{});
  }
}

// Zeroes the arrival counters of a reduction that has several slices.
cudaError_t clear_counters(const Plan& p, void* workspace, cudaStream_t stream) {
  if (p.slices == 1) return cudaSuccess;
  return cudaMemsetAsync(workspace, 0, p.tiles * sizeof(unsigned), stream);
}

float* partials(const Plan& p, void* workspace, int index, int64_t c) {
  const size_t counters = ceil_div(p.tiles * sizeof(unsigned), kCounterBytes) * kCounterBytes;
  return reinterpret_cast<float*>(static_cast<char*>(workspace) + counters) +
         index * p.slices * c;
}

cudaError_t stats_impl(DType dtype, const void* x, Geometry g, void* mean, void* m2,
                       const Finalize* fin, void* workspace, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  const cudaError_t launch = visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    visit_shape<T, vec16<T>()>(g, {x}, [&](auto, auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const Plan p = make_plan(g, VEC, kStatsLoads, true);
      err = clear_counters(p, workspace, stream);
      if (err != cudaSuccess) return;
      StatsOut o{};
      o.mean = static_cast<float*>(mean);
      o.m2 = static_cast<float*>(m2);
      o.part_mean = partials(p, workspace, 0, g.c);
      o.part_m2 = partials(p, workspace, 1, g.c);
      o.part_n = partials(p, workspace, 2, g.c);
      o.arrivals = static_cast<unsigned*>(workspace);
      if (fin) {
        o.weight = static_cast<const float*>(fin->weight);
        o.bias = static_cast<const float*>(fin->bias);
        o.eps = static_cast<float>(fin->eps);
        o.scale = static_cast<float*>(fin->scale);
        o.shift = static_cast<float*>(fin->shift);
        o.invstd = static_cast<float*>(fin->invstd);
        o.running_mean = static_cast<float*>(fin->running_mean);
        o.running_var = static_cast<float*>(fin->running_var);
        o.momentum = static_cast<float>(fin->momentum);
      }
      const T* xp = static_cast<const T*>(x);
      if (g.channels_last) {
        stats_cl_kernel<T, VEC><<<grid_of(p), kThreads, 0, stream>>>(xp, p.units, g.c, p.log_tx, o);
      } else {
        stats_nchw_kernel<T, VEC>
            <<<grid_of(p), kThreads, 0, stream>>>(xp, g.c, g.s, p.per_image, p.units, o);
      }
    });
  });
  return err != cudaSuccess ? err : launch;
}

}  // namespace

size_t bn_stats_workspace_bytes(DType dtype, Geometry g) {
  if (!fits(dtype, g)) return cuda::bn_stats_workspace_bytes(dtype, g);
  return max_workspace_bytes<kStatsLoads, 2>(dtype, g);
}

size_t bn_backward_reduce_workspace_bytes(DType dtype, Geometry g) {
  if (!fits(dtype, g)) return cuda::bn_backward_reduce_workspace_bytes(dtype, g);
  return max_workspace_bytes<kBackwardLoads, 3>(dtype, g);
}

cudaError_t launch_bn_stats(DType dtype, const void* x, Geometry g, void* mean, void* m2,
                            void* workspace, cudaStream_t stream) {
  if (!fits(dtype, g)) return cuda::launch_bn_stats(dtype, x, g, mean, m2, workspace, stream);
  return stats_impl(dtype, x, g, mean, m2, nullptr, workspace, stream);
}

cudaError_t launch_bn_stats_finalize(DType dtype, const void* x, Geometry g, void* mean,
                                     void* m2, const Finalize& fin, void* workspace,
                                     cudaStream_t stream) {
  if (fits(dtype, g)) return stats_impl(dtype, x, g, mean, m2, &fin, workspace, stream);
  // fp64 or a geometry these kernels leave out: the two launches of batchnorm_kernels.cu (the
  // running statistics are then the caller's).
  if (fin.running_mean) return cudaErrorNotSupported;
  const cudaError_t err = cuda::launch_bn_stats(dtype, x, g, mean, m2, workspace, stream);
  if (err != cudaSuccess) return err;
  const math::FinalizePointers<void> p{mean, m2, fin.weight, fin.bias, fin.scale, fin.shift,
                                       fin.invstd};
  return cuda::launch_bn_finalize(dtype, p, g.n * g.s, fin.eps, g.c, stream);
}

cudaError_t launch_bn_apply(DType dtype, const void* x, Tail tail, Geometry g, void* out,
                            cudaStream_t stream) {
  if (!fits(dtype, g)) return cuda::launch_bn_apply(dtype, x, tail, g, out, stream);
  return visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    visit_shape<T, kMaxChannels>(g, {x, tail.residual, out}, [&](auto cl, auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const Plan p = make_plan(g, VEC, kApplyLoads, false);
      visit_tail(tail, [&](auto hr, auto hs, auto rl) {
        apply_kernel<T, VEC, decltype(cl)::value, decltype(hr)::value, decltype(hs)::value,
                     decltype(rl)::value><<<grid_of(p), kThreads, 0, stream>>>(
            static_cast<const T*>(x), tail, walk_of(g, p), static_cast<T*>(out));
      });
    });
  });
}

cudaError_t launch_bn_backward_reduce(DType dtype, const void* grad_out, const void* x, Tail tail,
                                      const void* mean, const void* mean_r, Geometry g,
                                      void* sum_dy, void* sum_dy_xmu, void* sum_dy_rmu,
                                      void* workspace, cudaStream_t stream) {
  if (!fits(dtype, g)) {
    return cuda::launch_bn_backward_reduce(dtype, grad_out, x, tail, mean, mean_r, g, sum_dy,
                                           sum_dy_xmu, sum_dy_rmu, workspace, stream);
  }
  cudaError_t err = cudaSuccess;
  const cudaError_t launch = visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    visit_shape<T, kMaxChannels>(g, {grad_out, x, tail.residual}, [&](auto cl, auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const Plan p = make_plan(g, VEC, kBackwardLoads, true);
      err = clear_counters(p, workspace, stream);
      if (err != cudaSuccess) return;
      ReduceOut o{};
      o.sum[0] = static_cast<float*>(sum_dy);
      o.sum[1] = static_cast<float*>(sum_dy_xmu);
      o.sum[2] = static_cast<float*>(sum_dy_rmu);
      for (int q = 0; q < 3; ++q) o.part[q] = partials(p, workspace, q, g.c);
      o.arrivals = static_cast<unsigned*>(workspace);
      visit_tail(tail, [&](auto hr, auto hs, auto rl) {
        backward_reduce_kernel<T, VEC, decltype(cl)::value, decltype(hr)::value,
                               decltype(hs)::value, decltype(rl)::value>
            <<<grid_of(p), kThreads, 0, stream>>>(
                static_cast<const T*>(grad_out), static_cast<const T*>(x), tail,
                static_cast<const float*>(mean), static_cast<const float*>(mean_r),
                walk_of(g, p), o);
      });
    });
  });
  return err != cudaSuccess ? err : launch;
}

cudaError_t launch_bn_backward_elemt(DType dtype, const void* grad_out, const void* x, Tail tail,
                                     const void* coef, bool train_x, bool train_r, Geometry g,
                                     void* grad_x, void* grad_r, cudaStream_t stream) {
  if (!fits(dtype, g)) {
    return cuda::launch_bn_backward_elemt(dtype, grad_out, x, tail, coef, train_x, train_r, g,
                                          grad_x, grad_r, stream);
  }
  return visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto ptrs = {grad_out, x, tail.residual, static_cast<const void*>(grad_x),
                       static_cast<const void*>(grad_r)};
    visit_shape<T, kMaxChannels>(g, ptrs, [&](auto cl, auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const Plan p = make_plan(g, VEC, kBackwardLoads, false);
      visit_tail(tail, [&](auto hr, auto hs, auto rl) {
        auto launch = [&](auto grad_r_tag, auto tx_tag, auto tr_tag) {
          backward_elemt_kernel<T, VEC, decltype(cl)::value, decltype(hr)::value,
                                decltype(hs)::value, decltype(rl)::value,
                                decltype(grad_r_tag)::value, decltype(tx_tag)::value,
                                decltype(tr_tag)::value><<<grid_of(p), kThreads, 0, stream>>>(
              static_cast<const T*>(grad_out), static_cast<const T*>(x), tail,
              static_cast<const float*>(coef), walk_of(g, p), static_cast<T*>(grad_x),
              static_cast<T*>(grad_r));
        };
        // train_r implies train_x, and its terms need grad_r and a second BN.
        auto with_terms = [&](auto grad_r_tag) {
          constexpr bool R_TERMS = decltype(grad_r_tag)::value && decltype(hs)::value;
          if (R_TERMS && train_r) {
            launch(grad_r_tag, std::true_type{}, std::integral_constant<bool, R_TERMS>{});
          } else if (train_x) {
            launch(grad_r_tag, std::true_type{}, std::false_type{});
          } else {
            launch(grad_r_tag, std::false_type{}, std::false_type{});
          }
        };
        // grad_r only with a residual.
        if (decltype(hr)::value && grad_r) {
          with_terms(std::integral_constant<bool, decltype(hr)::value>{});
        } else {
          with_terms(std::false_type{});
        }
      });
    });
  });
}

}  // namespace fast
}  // namespace cuda
}  // namespace fastres
