// CUDA kernels of the fastres:: BatchNorm family (semantics: csrc/fastres.cpp).
//
// Layout: x is [N, C, S]; channels_last rows of C channels, or NCHW planes of S values.
// Loads and stores are 16 bytes wide (4 fp32, 8 fp16 / bf16, 2 fp64) wherever the pointers
// are 16-byte aligned and C (channels_last) or S (NCHW) is a multiple of the vector width;
// otherwise the same kernels run with one element per access.
// Reductions are grid-wide in two steps: every block writes per-channel partials (Welford
// count / mean / M2 for the statistics, sums for the backward) to a workspace, and a second
// kernel merges them per channel in fp64 (Chan's formula for the statistics).
// Accumulation in Acc<T> (below); 64-bit element offsets throughout.
// No torch headers: see batchnorm_kernels.h.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "batchnorm_kernels.h"

namespace fastres {
namespace cuda {
namespace {

constexpr int kRowsPerBlock = 8;   // channels_last reductions: blockDim (32, 8)
constexpr int kPlaneThreads = 256;  // NCHW reductions and element-wise kernels
constexpr int kMaxPartials = 256;  // blocks per channel in a reduction

// The accumulation type of element type T, the device side's one statement of the rule (the
// host takes ATen's at::opmath_type, see acc_type_of in batchnorm_common.h; the two must agree):
// fp64 for fp64, fp32 for everything else.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// 1 / v for counts v >= 1: the hardware approximation refined by Newton steps. IEEE division
// compiles to a slow-path subroutine call whose calling convention spills registers.
__device__ __forceinline__ float recip(float v) {
  const float r = __fdividef(1.0f, v);
  return r * (2.0f - v * r);
}
__device__ __forceinline__ double recip(double v) {
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(v)));
  r = r * (2.0 - v * r);
  return r * (2.0 - v * r);
}

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
template <typename T>
__device__ __forceinline__ T from_acc(double v) {
  return static_cast<T>(v);
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

// Channel of element i (the first of a vector: a vector never straddles channels in NCHW,
// and spans channels c .. c + VEC - 1 in channels_last).
__device__ __forceinline__ int64_t channel_of(int64_t i, const Geometry& g) {
  return g.channels_last ? i % g.c : (i / g.s) % g.c;
}

template <typename T, int VEC, bool HAS_R, bool HAS_SR>
struct TailEval {
  using A = typename Acc<T>::type;
  const A* scale;
  const A* shift;
  const T* r;
  const A* scale_r;
  const A* shift_r;

  // z for element j of a vector at i whose first channel is c.
  __device__ __forceinline__ A z(A x, const Pack<T, VEC>& rv, int j, int64_t c,
                                 bool channels_last) const {
    const int64_t cj = channels_last ? c + j : c;
    A v = x * scale[cj] + shift[cj];
    if constexpr (HAS_R) {
      const A rj = to_acc(rv.v[j]);
      if constexpr (HAS_SR) {
        v += rj * scale_r[cj] + shift_r[cj];
      } else {
        v += rj;
      }
    }
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Block reduction of the NCHW reductions (one channel per block, blockDim.x = THREADS)

// __shfl_down_sync of a trivially copyable struct, one 32-bit word at a time (what the
// built-in overloads do for double and 64-bit integers).
template <typename V>
__device__ __forceinline__ V shfl_down(const V& v, int off) {
  static_assert(sizeof(V) % sizeof(unsigned) == 0, "shfl_down: size not a multiple of 4 bytes");
  constexpr int kWords = sizeof(V) / sizeof(unsigned);
  unsigned w[kWords];
  memcpy(w, &v, sizeof(V));
#pragma unroll
  for (int k = 0; k < kWords; ++k) w[k] = __shfl_down_sync(0xffffffffu, w[k], off);
  V out;
  memcpy(&out, w, sizeof(V));
  return out;
}

// Reduces each thread's v over the block with combine(V a, const V& b) -> V (a: the lower
// threads' value): within each warp by shuffles, then thread 0 folds the warps' results in
// warp order. The result is valid in thread 0 only. Every thread of the block must call it,
// and at most once per kernel: there is no barrier after thread 0 reads the shared array, so a
// second call could overwrite it first (add a __syncthreads() before calling it again).
template <int THREADS, typename V, typename Combine>
__device__ __forceinline__ V block_reduce(V v, Combine combine) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block_reduce: whole warps");
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = combine(v, shfl_down(v, off));
  __shared__ V s[THREADS / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) s[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    v = s[0];
    for (int k = 1; k < THREADS / 32; ++k) v = combine(v, s[k]);
  }
  return v;
}

// Writes this block's three per-channel partials of channel c into part [3][P][C], P =
// gridDim.x (one slice of the rows per block); the merge kernels reduce over P.
template <typename A>
__device__ __forceinline__ void store_partials(A* part, int64_t C, int64_t c, A v0, A v1, A v2) {
  const int64_t P = gridDim.x;
  part[(0 * P + blockIdx.x) * C + c] = v0;
  part[(1 * P + blockIdx.x) * C + c] = v1;
  part[(2 * P + blockIdx.x) * C + c] = v2;
}

// ---------------------------------------------------------------------------------------------
// Statistics

template <typename A>
__device__ __forceinline__ void chan_merge(A& n, A& mean, A& m2, A nb, A mb, A qb) {
  const A total = n + nb;
  if (total == A(0)) return;
  const A delta = mb - mean;
  const A wb = nb * recip(total);
  mean += delta * wb;
  m2 += qb + delta * delta * n * wb;
  n = total;
}

// Welford state (count, mean, M2) of a thread, merged with Chan's formula.
template <typename A>
struct Welford {
  A n, mean, m2;
};

struct WelfordMerge {
  template <typename A>
  __device__ __forceinline__ Welford<A> operator()(Welford<A> a, const Welford<A>& b) const {
    chan_merge(a.n, a.mean, a.m2, b.n, b.mean, b.m2);
    return a;
  }
};

// channels_last: blockIdx.y picks 32 * VEC channels, blockIdx.x a slice of the rows.
template <typename T, int VEC>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    stats_cl_kernel(const T* __restrict__ x, Geometry g, typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x) * VEC;
  const int64_t rows = g.n * g.s;
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = A(0);
  A n = 0;
  if (c0 < g.c) {
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
      const Pack<T, VEC> v = load<T, VEC>(x, row * g.c + c0);
      n += A(1);
      const A inv = recip(n);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xv = to_acc(v.v[j]);
        const A d = xv - mean[j];
        mean[j] += d * inv;
        m2[j] += d * (xv - mean[j]);
      }
    }
  }
  __shared__ A s_mean[kRowsPerBlock][32 * VEC];
  __shared__ A s_m2[kRowsPerBlock][32 * VEC];
  __shared__ A s_n[kRowsPerBlock];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_mean[threadIdx.y][threadIdx.x * VEC + j] = mean[j];
    s_m2[threadIdx.y][threadIdx.x * VEC + j] = m2[j];
  }
  if (threadIdx.x == 0) s_n[threadIdx.y] = n;
  __syncthreads();
  if (threadIdx.y != 0 || c0 >= g.c) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    A nn = s_n[0], mm = s_mean[0][threadIdx.x * VEC + j], qq = s_m2[0][threadIdx.x * VEC + j];
    for (int k = 1; k < kRowsPerBlock; ++k) {
      chan_merge(nn, mm, qq, s_n[k], s_mean[k][threadIdx.x * VEC + j],
                 s_m2[k][threadIdx.x * VEC + j]);
    }
    const int64_t c = c0 + j;
    store_partials(part, g.c, c, nn, mm, qq);
  }
}

// NCHW: blockIdx.y is the channel, blockIdx.x a slice of the images.
template <typename T, int VEC>
__global__ void __launch_bounds__(kPlaneThreads)
    stats_nchw_kernel(const T* __restrict__ x, Geometry g,
                      typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  const int64_t c = blockIdx.y;
  A n = 0, mean = 0, m2 = 0;
  for (int64_t img = blockIdx.x; img < g.n; img += gridDim.x) {
    const T* plane = x + (img * g.c + c) * g.s;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < g.s;
         i += static_cast<int64_t>(kPlaneThreads) * VEC) {
      const Pack<T, VEC> v = load<T, VEC>(plane, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xv = to_acc(v.v[j]);
        n += A(1);
        const A d = xv - mean;
        mean += d * recip(n);
        m2 += d * (xv - mean);
      }
    }
  }
  const Welford<A> w = block_reduce<kPlaneThreads>(Welford<A>{n, mean, m2}, WelfordMerge{});
  if (threadIdx.x != 0) return;
  store_partials(part, g.c, c, w.n, w.mean, w.m2);
}

template <typename A>
__global__ void stats_merge_kernel(const A* __restrict__ part, int64_t P, int64_t C,
                                   A* __restrict__ mean_out, A* __restrict__ m2_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, mean = 0, m2 = 0;
  for (int64_t k = 0; k < P; ++k) {
    chan_merge<double>(n, mean, m2, part[k * C + c], part[(P + k) * C + c],
                       part[(2 * P + k) * C + c]);
  }
  mean_out[c] = static_cast<A>(mean);
  m2_out[c] = static_cast<A>(m2);
}

// ---------------------------------------------------------------------------------------------
// Finalize

template <typename A>
__global__ void finalize_kernel(math::FinalizePointers<A> p, int64_t count, double eps,
                                int64_t C) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) math::finalize_channel(p, count, eps, c);
}

// A running statistic of type R from an A value (fp64 ones from fp64 values only).
template <typename R, typename A>
__device__ __forceinline__ R running_from(A v) {
  if constexpr (std::is_same_v<R, double>) {
    return static_cast<double>(v);
  } else {
    return from_acc<R>(static_cast<float>(v));
  }
}

// One block (the whole of C in a block-stride loop), so that every thread has read
// num_batches_tracked before thread 0 increments it.
constexpr int kFinalizeUpdateThreads = 512;

template <typename A, typename R>
__global__ void __launch_bounds__(kFinalizeUpdateThreads)
    finalize_update_kernel(math::FinalizePointers<A> p, int64_t count, double eps, int64_t C,
                           R* __restrict__ running_mean, R* __restrict__ running_var,
                           int64_t* __restrict__ num_batches_tracked, double momentum,
                           bool cumulative) {
  const int64_t before = num_batches_tracked ? *num_batches_tracked : 0;
  const A factor = math::running_factor<A>(momentum, cumulative, before);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    math::finalize_channel(p, count, eps, c);
    const math::Running<A> old{static_cast<A>(to_acc(running_mean[c])),
                               static_cast<A>(to_acc(running_var[c]))};
    const auto u = math::updated_running(p.mean[c], p.m2[c], count, factor, old);
    running_mean[c] = running_from<R>(u.mean);
    running_var[c] = running_from<R>(u.var);
  }
  __syncthreads();
  if (threadIdx.x == 0 && num_batches_tracked) *num_batches_tracked = before + 1;
}

template <typename A>
__global__ void coef_kernel(math::CoefPointers<A> p, math::CoefFlags f) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < f.c) math::coef_channel(p, f, c);
}

// ---------------------------------------------------------------------------------------------
// Apply and backward element-wise

// ReLU's gradient as PyTorch's threshold_backward: 0 where z <= 0, g elsewhere, NaN z included
// (the NaN itself propagates through the other terms, as in PyTorch).
template <typename A>
__device__ __forceinline__ A relu_grad(A z, A g) {
  return z <= A(0) ? A(0) : g;
}

template <typename T, int VEC, bool HAS_R, bool HAS_SR, bool RELU>
__global__ void __launch_bounds__(kPlaneThreads)
    apply_kernel(const T* __restrict__ x, TailEval<T, VEC, HAS_R, HAS_SR> t, Geometry g,
                 int64_t numel, T* __restrict__ out) {
  using A = typename Acc<T>::type;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < numel; i += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    const int64_t c = channel_of(i, g);
    const Pack<T, VEC> xv = load<T, VEC>(x, i);
    Pack<T, VEC> rv;
    if constexpr (HAS_R) rv = load<T, VEC>(t.r, i);
    Pack<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A z = t.z(to_acc(xv.v[j]), rv, j, c, g.channels_last);
      if (RELU && z < A(0)) z = A(0);
      o.v[j] = from_acc<T>(z);
    }
    store<T, VEC>(out, i, o);
  }
}

// TX / TR: the x / r norm trains, so its gradient has the terms in x / r; without them x and r
// stay out of the gradient, so that a NaN there does not leak into one PyTorch computes from g.
template <typename T, int VEC, bool HAS_R, bool HAS_SR, bool RELU, bool GRAD_R, bool TX, bool TR>
__global__ void __launch_bounds__(kPlaneThreads)
    backward_elemt_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                          TailEval<T, VEC, HAS_R, HAS_SR> t,
                          const typename Acc<T>::type* __restrict__ coef, Geometry g,
                          int64_t numel, T* __restrict__ grad_x, T* __restrict__ grad_r) {
  using A = typename Acc<T>::type;
  const A* ca = coef;
  const A* cb = coef + g.c;
  const A* ck = coef + 2 * g.c;
  const A* ra = coef + 3 * g.c;
  const A* rb = coef + 4 * g.c;
  const A* rk = coef + 5 * g.c;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < numel; i += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    const int64_t c = channel_of(i, g);
    const Pack<T, VEC> xv = load<T, VEC>(x, i);
    const Pack<T, VEC> gv = load<T, VEC>(grad_out, i);
    Pack<T, VEC> rv;
    if constexpr (HAS_R) rv = load<T, VEC>(t.r, i);
    Pack<T, VEC> ox, orr;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t cj = g.channels_last ? c + j : c;
      const A xa = to_acc(xv.v[j]);
      A gr = to_acc(gv.v[j]);
      if constexpr (RELU) gr = relu_grad(t.z(xa, rv, j, c, g.channels_last), gr);
      ox.v[j] = from_acc<T>(TX ? ca[cj] * gr + cb[cj] * xa + ck[cj] : ca[cj] * gr);
      if constexpr (GRAD_R && HAS_R) {
        orr.v[j] =
            from_acc<T>(TR ? ra[cj] * gr + rb[cj] * to_acc(rv.v[j]) + rk[cj] : ra[cj] * gr);
      }
    }
    store<T, VEC>(grad_x, i, ox);
    if constexpr (GRAD_R && HAS_R) store<T, VEC>(grad_r, i, orr);
  }
}

// y = ReLU(y + r) in place, over numel elements of the same layout (the inference tail after
// a convolution with the BN folded in).
template <typename T, int VEC>
__global__ void __launch_bounds__(kPlaneThreads)
    add_relu_kernel(T* __restrict__ y, const T* __restrict__ r, int64_t numel) {
  using A = typename Acc<T>::type;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
       i < numel; i += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    Pack<T, VEC> yv = load<T, VEC>(y, i);
    const Pack<T, VEC> rv = load<T, VEC>(r, i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A z = to_acc(yv.v[j]) + to_acc(rv.v[j]);
      yv.v[j] = from_acc<T>(z < A(0) ? A(0) : z);  // NaN stays NaN, as torch.relu
    }
    store<T, VEC>(y, i, yv);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward reduce: partial sums of g, g (x - mean), g (r - mean_r).

// The three sums of a thread.
template <typename A>
struct Sums3 {
  A s0, s1, s2;
};

struct SumsAdd {
  template <typename A>
  __device__ __forceinline__ Sums3<A> operator()(Sums3<A> a, const Sums3<A>& b) const {
    a.s0 += b.s0;
    a.s1 += b.s1;
    a.s2 += b.s2;
    return a;
  }
};

template <typename T, int VEC, bool HAS_R, bool HAS_SR, bool RELU>
__global__ void __launch_bounds__(32 * kRowsPerBlock)
    backward_reduce_cl_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                              TailEval<T, VEC, HAS_R, HAS_SR> t,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ mean_r, Geometry g,
                              typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * 32 + threadIdx.x) * VEC;
  const int64_t rows = g.n * g.s;
  A s0[VEC], s1[VEC], s2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s0[j] = s1[j] = s2[j] = A(0);
  if (c0 < g.c) {
    for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
         row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
      const int64_t i = row * g.c + c0;
      const Pack<T, VEC> xv = load<T, VEC>(x, i);
      const Pack<T, VEC> gv = load<T, VEC>(grad_out, i);
      Pack<T, VEC> rv;
      if constexpr (HAS_R) rv = load<T, VEC>(t.r, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xa = to_acc(xv.v[j]);
        A gr = to_acc(gv.v[j]);
        if constexpr (RELU) gr = relu_grad(t.z(xa, rv, j, c0, true), gr);
        s0[j] += gr;
        s1[j] += gr * (xa - mean[c0 + j]);
        if constexpr (HAS_SR) s2[j] += gr * (to_acc(rv.v[j]) - mean_r[c0 + j]);
      }
    }
  }
  __shared__ A s[3][kRowsPerBlock][32 * VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s[0][threadIdx.y][threadIdx.x * VEC + j] = s0[j];
    s[1][threadIdx.y][threadIdx.x * VEC + j] = s1[j];
    s[2][threadIdx.y][threadIdx.x * VEC + j] = s2[j];
  }
  __syncthreads();
  if (threadIdx.y != 0 || c0 >= g.c) return;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int col = threadIdx.x * VEC + j;
    A a0 = 0, a1 = 0, a2 = 0;
    for (int k = 0; k < kRowsPerBlock; ++k) {
      a0 += s[0][k][col];
      a1 += s[1][k][col];
      a2 += s[2][k][col];
    }
    store_partials(part, g.c, c0 + j, a0, a1, a2);
  }
}

template <typename T, int VEC, bool HAS_R, bool HAS_SR, bool RELU>
__global__ void __launch_bounds__(kPlaneThreads)
    backward_reduce_nchw_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                TailEval<T, VEC, HAS_R, HAS_SR> t,
                                const typename Acc<T>::type* __restrict__ mean,
                                const typename Acc<T>::type* __restrict__ mean_r, Geometry g,
                                typename Acc<T>::type* __restrict__ part) {
  using A = typename Acc<T>::type;
  const int64_t c = blockIdx.y;
  const A mu = mean[c];
  const A mu_r = HAS_SR ? mean_r[c] : A(0);
  // One channel per block: its constants live in registers for the whole loop.
  const A sc = t.scale[c], sh = t.shift[c];
  const A sc_r = HAS_SR ? t.scale_r[c] : A(1), sh_r = HAS_SR ? t.shift_r[c] : A(0);
  A a0 = 0, a1 = 0, a2 = 0;
  for (int64_t img = blockIdx.x; img < g.n; img += gridDim.x) {
    const int64_t base = (img * g.c + c) * g.s;
    for (int64_t k = static_cast<int64_t>(threadIdx.x) * VEC; k < g.s;
         k += static_cast<int64_t>(kPlaneThreads) * VEC) {
      const int64_t i = base + k;
      const Pack<T, VEC> xv = load<T, VEC>(x, i);
      const Pack<T, VEC> gv = load<T, VEC>(grad_out, i);
      Pack<T, VEC> rv;
      if constexpr (HAS_R) rv = load<T, VEC>(t.r, i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xa = to_acc(xv.v[j]);
        A gr = to_acc(gv.v[j]);
        if constexpr (RELU) {
          A z = xa * sc + sh;
          if constexpr (HAS_R) z += to_acc(rv.v[j]) * sc_r + sh_r;
          gr = relu_grad(z, gr);
        }
        a0 += gr;
        a1 += gr * (xa - mu);
        if constexpr (HAS_SR) a2 += gr * (to_acc(rv.v[j]) - mu_r);
      }
    }
  }
  const Sums3<A> b = block_reduce<kPlaneThreads>(Sums3<A>{a0, a1, a2}, SumsAdd{});
  if (threadIdx.x != 0) return;
  store_partials(part, g.c, c, b.s0, b.s1, b.s2);
}

template <typename A>
__global__ void sum_merge_kernel(const A* __restrict__ part, int64_t P, int64_t C,
                                 A* __restrict__ o0, A* __restrict__ o1, A* __restrict__ o2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a0 = 0, a1 = 0, a2 = 0;
  for (int64_t k = 0; k < P; ++k) {
    a0 += part[k * C + c];
    a1 += part[(P + k) * C + c];
    a2 += part[(2 * P + k) * C + c];
  }
  o0[c] = static_cast<A>(a0);
  o1[c] = static_cast<A>(a1);
  if (o2) o2[c] = static_cast<A>(a2);
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether 16-byte accesses are valid for these pointers in this layout.
template <typename T>
bool can_vectorize(const Geometry& g, const void* a, const void* b = nullptr,
                   const void* c = nullptr, const void* d = nullptr, const void* e = nullptr) {
  const int64_t inner = g.channels_last ? g.c : g.s;
  if (inner % vec_width<T>() != 0) return false;
  for (const void* p : {a, b, c, d, e}) {
    if (p && !aligned16(p)) return false;
  }
  return true;
}

// Rows (channels_last) or images (NCHW) are split over at most kMaxPartials blocks.
int64_t partials(const Geometry& g) {
  const int64_t units = g.channels_last ? (g.n * g.s + kRowsPerBlock - 1) / kRowsPerBlock : g.n;
  return units < 1 ? 1 : (units < kMaxPartials ? units : kMaxPartials);
}

int64_t elementwise_blocks(int64_t vectors) {
  const int64_t blocks = (vectors + kPlaneThreads - 1) / kPlaneThreads;
  // Grid-stride loops cover the rest; a few waves of blocks saturate any current GPU.
  return blocks < 1 ? 1 : (blocks < 65536 ? blocks : 65536);
}

template <typename F>
void dispatch_tail(const Tail& t, F f) {
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

// Calls f(T{}) with T the element type of dtype.
template <typename F>
void visit_dtype(DType dtype, F f) {
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
      f(double{});
      break;
  }
}

// visit_dtype for launches: returns the launch error, if any.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F f) {
  visit_dtype(dtype, f);
  return cudaGetLastError();
}

size_t acc_size(DType dtype) {
  size_t size = 0;
  visit_dtype(dtype, [&](auto tag) { size = sizeof(typename Acc<decltype(tag)>::type); });
  return size;
}

template <typename T, int VEC, bool HR, bool HS>
TailEval<T, VEC, HR, HS> tail_eval(const Tail& t) {
  using A = typename Acc<T>::type;
  return {static_cast<const A*>(t.scale), static_cast<const A*>(t.shift),
          static_cast<const T*>(t.residual), static_cast<const A*>(t.scale_r),
          static_cast<const A*>(t.shift_r)};
}

template <typename T, int VEC>
void stats_typed(const T* x, Geometry g, typename Acc<T>::type* mean, typename Acc<T>::type* m2,
                 typename Acc<T>::type* part, cudaStream_t stream) {
  const int64_t P = partials(g);
  if (g.channels_last) {
    const dim3 grid(static_cast<unsigned>(P),
                    static_cast<unsigned>((g.c + 32 * VEC - 1) / (32 * VEC)));
    stats_cl_kernel<T, VEC><<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(x, g, part);
  } else {
    const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(g.c));
    stats_nchw_kernel<T, VEC><<<grid, kPlaneThreads, 0, stream>>>(x, g, part);
  }
  stats_merge_kernel<<<static_cast<unsigned>((g.c + 127) / 128), 128, 0, stream>>>(part, P, g.c,
                                                                                   mean, m2);
}

template <typename T, int VEC>
void reduce_typed(const T* grad_out, const T* x, const Tail& tail, const void* mean,
                  const void* mean_r, Geometry g, void* o0, void* o1, void* o2, void* workspace,
                  cudaStream_t stream) {
  using A = typename Acc<T>::type;
  A* part = static_cast<A*>(workspace);
  const int64_t P = partials(g);
  dispatch_tail(tail, [&](auto hr, auto hs, auto rl) {
    constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value, RL = decltype(rl)::value;
    const auto t = tail_eval<T, VEC, HR, HS>(tail);
    const A* mu = static_cast<const A*>(mean);
    const A* mu_r = static_cast<const A*>(mean_r);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(P),
                      static_cast<unsigned>((g.c + 32 * VEC - 1) / (32 * VEC)));
      backward_reduce_cl_kernel<T, VEC, HR, HS, RL>
          <<<grid, dim3(32, kRowsPerBlock), 0, stream>>>(grad_out, x, t, mu, mu_r, g, part);
    } else {
      const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(g.c));
      backward_reduce_nchw_kernel<T, VEC, HR, HS, RL>
          <<<grid, kPlaneThreads, 0, stream>>>(grad_out, x, t, mu, mu_r, g, part);
    }
  });
  sum_merge_kernel<<<static_cast<unsigned>((g.c + 127) / 128), 128, 0, stream>>>(
      part, P, g.c, static_cast<A*>(o0), static_cast<A*>(o1), static_cast<A*>(o2));
}

template <typename T, int VEC>
void apply_typed(const T* x, const Tail& tail, Geometry g, T* out, cudaStream_t stream) {
  const int64_t numel = g.n * g.c * g.s;
  const auto blocks = static_cast<unsigned>(elementwise_blocks(numel / VEC));
  dispatch_tail(tail, [&](auto hr, auto hs, auto rl) {
    constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value, RL = decltype(rl)::value;
    apply_kernel<T, VEC, HR, HS, RL>
        <<<blocks, kPlaneThreads, 0, stream>>>(x, tail_eval<T, VEC, HR, HS>(tail), g, numel, out);
  });
}

template <typename T, int VEC>
void elemt_typed(const T* grad_out, const T* x, const Tail& tail, const void* coef, bool train_x,
                 bool train_r, Geometry g, T* grad_x, T* grad_r, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t numel = g.n * g.c * g.s;
  const auto blocks = static_cast<unsigned>(elementwise_blocks(numel / VEC));
  const A* cf = static_cast<const A*>(coef);
  dispatch_tail(tail, [&](auto hr, auto hs, auto rl) {
    constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value, RL = decltype(rl)::value;
    const auto t = tail_eval<T, VEC, HR, HS>(tail);
    auto launch = [&](auto grad_r_tag, auto tx_tag, auto tr_tag) {
      backward_elemt_kernel<T, VEC, HR, HS, RL, decltype(grad_r_tag)::value,
                            decltype(tx_tag)::value, decltype(tr_tag)::value>
          <<<blocks, kPlaneThreads, 0, stream>>>(grad_out, x, t, cf, g, numel, grad_x, grad_r);
    };
    // train_r implies train_x: three cases, times grad_r.
    auto with_terms = [&](auto grad_r_tag) {
      if (train_r) {
        launch(grad_r_tag, std::true_type{}, std::true_type{});
      } else if (train_x) {
        launch(grad_r_tag, std::true_type{}, std::false_type{});
      } else {
        launch(grad_r_tag, std::false_type{}, std::false_type{});
      }
    };
    if (grad_r) {
      with_terms(std::true_type{});
    } else {
      with_terms(std::false_type{});
    }
  });
}

}  // namespace

size_t bn_stats_workspace_bytes(DType dtype, Geometry g) {
  return static_cast<size_t>(3 * partials(g) * g.c) * acc_size(dtype);
}

size_t bn_backward_reduce_workspace_bytes(DType dtype, Geometry g) {
  return bn_stats_workspace_bytes(dtype, g);
}

cudaError_t launch_bn_stats(DType dtype, const void* x, Geometry g, void* mean, void* m2,
                            void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const T* xp = static_cast<const T*>(x);
    A* part = static_cast<A*>(workspace);
    if (can_vectorize<T>(g, x)) {
      stats_typed<T, vec_width<T>()>(xp, g, static_cast<A*>(mean), static_cast<A*>(m2), part,
                                     stream);
    } else {
      stats_typed<T, 1>(xp, g, static_cast<A*>(mean), static_cast<A*>(m2), part, stream);
    }
  });
}

template <typename A>
math::FinalizePointers<A> typed(const math::FinalizePointers<void>& p) {
  return {static_cast<const A*>(p.mean),  static_cast<const A*>(p.m2),
          static_cast<const A*>(p.weight), static_cast<const A*>(p.bias),
          static_cast<A*>(p.scale),       static_cast<A*>(p.shift),
          static_cast<A*>(p.invstd)};
}

template <typename A>
math::CoefPointers<A> typed(const math::CoefPointers<void>& p) {
  return {static_cast<const A*>(p.scale),         static_cast<const A*>(p.scale_r),
          static_cast<const A*>(p.mean),          static_cast<const A*>(p.invstd),
          static_cast<const A*>(p.sum_dy),        static_cast<const A*>(p.sum_dy_xmu),
          static_cast<const A*>(p.mean_r),        static_cast<const A*>(p.invstd_r),
          static_cast<const A*>(p.sum_dy_rmu),    static_cast<A*>(p.coef),
          static_cast<A*>(p.grad_weight),         static_cast<A*>(p.grad_bias),
          static_cast<A*>(p.grad_weight_r),       static_cast<A*>(p.grad_bias_r)};
}

unsigned channel_blocks(int64_t c) { return static_cast<unsigned>((c + 127) / 128); }

cudaError_t launch_bn_finalize(DType dtype, const math::FinalizePointers<void>& p,
                               int64_t count, double eps, int64_t c, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using A = typename Acc<decltype(tag)>::type;
    finalize_kernel<A><<<channel_blocks(c), 128, 0, stream>>>(typed<A>(p), count, eps, c);
  });
}

cudaError_t launch_bn_finalize_update(DType dtype, const math::FinalizePointers<void>& p,
                                      int64_t count, double eps, int64_t c,
                                      DType running_dtype, void* running_mean,
                                      void* running_var, int64_t* num_batches_tracked,
                                      double momentum, bool cumulative, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using A = typename Acc<decltype(tag)>::type;
    visit_dtype(running_dtype, [&](auto rtag) {
      using R = decltype(rtag);
      // fp64 statistics come from fp64 models, whose running statistics are fp64 (the binding
      // checks it): the other pairs are not compiled.
      if constexpr (std::is_same_v<A, float> || std::is_same_v<R, double>) {
        finalize_update_kernel<A, R><<<1, kFinalizeUpdateThreads, 0, stream>>>(
            typed<A>(p), count, eps, c, static_cast<R*>(running_mean),
            static_cast<R*>(running_var), num_batches_tracked, momentum, cumulative);
      }
    });
  });
}

cudaError_t launch_bn_coef(DType dtype, const math::CoefPointers<void>& p,
                           const math::CoefFlags& f, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using A = typename Acc<decltype(tag)>::type;
    coef_kernel<A><<<channel_blocks(f.c), 128, 0, stream>>>(typed<A>(p), f);
  });
}

cudaError_t launch_bn_apply(DType dtype, const void* x, Tail tail, Geometry g, void* out,
                            cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    if (can_vectorize<T>(g, x, tail.residual, out)) {
      apply_typed<T, vec_width<T>()>(xp, tail, g, op, stream);
    } else {
      apply_typed<T, 1>(xp, tail, g, op, stream);
    }
  });
}

cudaError_t launch_add_relu(DType dtype, void* y, const void* r, int64_t numel,
                            cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int VEC = vec_width<T>();
    T* yp = static_cast<T*>(y);
    const T* rp = static_cast<const T*>(r);
    if (numel % VEC == 0 && aligned16(y) && aligned16(r)) {
      add_relu_kernel<T, VEC><<<static_cast<unsigned>(elementwise_blocks(numel / VEC)),
                                kPlaneThreads, 0, stream>>>(yp, rp, numel);
    } else {
      add_relu_kernel<T, 1><<<static_cast<unsigned>(elementwise_blocks(numel)), kPlaneThreads, 0,
                              stream>>>(yp, rp, numel);
    }
  });
}

cudaError_t launch_bn_backward_reduce(DType dtype, const void* grad_out, const void* x, Tail tail,
                                      const void* mean, const void* mean_r, Geometry g,
                                      void* sum_dy, void* sum_dy_xmu, void* sum_dy_rmu,
                                      void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = static_cast<const T*>(grad_out);
    const T* xp = static_cast<const T*>(x);
    if (can_vectorize<T>(g, grad_out, x, tail.residual)) {
      reduce_typed<T, vec_width<T>()>(gp, xp, tail, mean, mean_r, g, sum_dy, sum_dy_xmu,
                                      sum_dy_rmu, workspace, stream);
    } else {
      reduce_typed<T, 1>(gp, xp, tail, mean, mean_r, g, sum_dy, sum_dy_xmu, sum_dy_rmu,
                         workspace, stream);
    }
  });
}

cudaError_t launch_bn_backward_elemt(DType dtype, const void* grad_out, const void* x, Tail tail,
                                     const void* coef, bool train_x, bool train_r, Geometry g,
                                     void* grad_x, void* grad_r, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* gp = static_cast<const T*>(grad_out);
    const T* xp = static_cast<const T*>(x);
    T* gx = static_cast<T*>(grad_x);
    T* gr = static_cast<T*>(grad_r);
    if (can_vectorize<T>(g, grad_out, x, tail.residual, grad_x, grad_r)) {
      elemt_typed<T, vec_width<T>()>(gp, xp, tail, coef, train_x, train_r, g, gx, gr, stream);
    } else {
      elemt_typed<T, 1>(gp, xp, tail, coef, train_x, train_r, g, gx, gr, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastres
