// The per-channel arithmetic of the fastres:: BatchNorm family, one channel per call, shared by
// the CPU loops (cpu/batchnorm_cpu.cpp) and the CUDA kernels (cuda/batchnorm_kernels.cu), so
// that the CPU tests check the formulas the GPU runs. Free of torch headers (nvcc compiles it
// with the kernels); per-channel pointers are of the accumulation type A (float, or double for
// double inputs).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTRES_HD __host__ __device__ __forceinline__
#else
#define FASTRES_HD inline
#endif

namespace fastres {
namespace math {

template <typename A>
FASTRES_HD A rsqrt_of(A v) {
#if defined(__CUDA_ARCH__)
  return A(1) / ::sqrt(v);
#else
  return A(1) / std::sqrt(v);
#endif
}

// bn_finalize / bn_finalize_update: the normalization of channel c as an affine map,
// bn(x) = x * scale + shift, from the batch statistics (mean, M2 over count values).
template <typename A>
struct FinalizePointers {
  const A* mean;
  const A* m2;
  const A* weight;  // nullptr: 1
  const A* bias;    // nullptr: 0
  A* scale;         // nullptr: not wanted
  A* shift;
  A* invstd;
};

template <typename A>
FASTRES_HD void finalize_channel(const FinalizePointers<A>& p, int64_t count, double eps,
                                 int64_t c) {
  if (p.scale == nullptr) return;
  const A inv = rsqrt_of(p.m2[c] / static_cast<A>(count) + static_cast<A>(eps));
  const A s = p.weight ? p.weight[c] * inv : inv;
  p.invstd[c] = inv;
  p.scale[c] = s;
  p.shift[c] = (p.bias ? p.bias[c] : A(0)) - p.mean[c] * s;
}

// The running-statistics update of nn.BatchNorm2d in training mode: with factor = momentum (or
// 1 / num_batches_tracked after its increment, the cumulative average),
// running_mean = (1 - factor) running_mean + factor mean and
// running_var = (1 - factor) running_var + factor M2 / (count - 1) (unbiased), in A; the
// callers load and store the running statistics in their own type.
template <typename A>
struct Running {
  A mean, var;
};

template <typename A>
FASTRES_HD Running<A> updated_running(A mean, A m2, int64_t count, A factor, Running<A> old) {
  const A unbiased = m2 / static_cast<A>(count - 1);
  return {(A(1) - factor) * old.mean + factor * mean, (A(1) - factor) * old.var + factor * unbiased};
}

// The factor of that update; num_batches_tracked is the count before this batch's increment.
template <typename A>
FASTRES_HD A running_factor(double momentum, bool cumulative, int64_t num_batches_tracked) {
  return cumulative ? A(1) / static_cast<A>(num_batches_tracked + 1) : static_cast<A>(momentum);
}

// The backward's per-channel coefficients [6, C] (rows of C, see ElemtCoefficients in
// batchnorm_common.h): grad_x = c0 g + c1 x + c2, grad_r = c3 g + c4 r + c5, and the affine
// gradients of the norms. x's norm: scale, and with batch statistics (train_x) mean, invstd and
// the sums; r's: scale_r (nullptr: r is added as is), with batch statistics (train_r) mean_r,
// invstd_r, sum_dy_rmu.
template <typename A>
struct CoefPointers {
  const A* scale;
  const A* scale_r;
  const A* mean;
  const A* invstd;
  const A* sum_dy;
  const A* sum_dy_xmu;
  const A* mean_r;
  const A* invstd_r;
  const A* sum_dy_rmu;
  A* coef;
  // Optional (nullptr: not wanted): the affine gradients sum_dy_xmu * invstd and sum_dy of x's
  // norm, sum_dy_rmu * invstd_r and sum_dy of r's (the sums of this process's batch).
  A* grad_weight;
  A* grad_bias;
  A* grad_weight_r;
  A* grad_bias_r;
};

struct CoefFlags {
  int64_t c;  // channels
  double count;
  bool train_x, train_r, want_r;
};

template <typename A>
FASTRES_HD void coef_channel(const CoefPointers<A>& p, const CoefFlags& f, int64_t c) {
  const int64_t C = f.c;
  A* row = p.coef;
  const A n = static_cast<A>(f.count);
  row[c] = p.scale[c];
  A sd = A(0);
  if (f.train_x) {
    // The batch-statistics terms: -scale invstd^2 sum_dy_xmu / count on x and
    // -scale sum_dy / count - that * mean.
    sd = p.sum_dy[c] / n;
    const A inv = p.invstd[c];
    const A b = -p.scale[c] * inv * inv * (p.sum_dy_xmu[c] / n);
    row[C + c] = b;
    row[2 * C + c] = -p.scale[c] * sd - b * p.mean[c];
  }
  if (f.want_r) {
    row[3 * C + c] = p.scale_r ? p.scale_r[c] : A(1);
    if (f.train_r) {
      const A inv = p.invstd_r[c];
      const A b = -p.scale_r[c] * inv * inv * (p.sum_dy_rmu[c] / n);
      row[4 * C + c] = b;
      row[5 * C + c] = -p.scale_r[c] * sd - b * p.mean_r[c];
    }
  }
  if (p.grad_weight) p.grad_weight[c] = p.sum_dy_xmu[c] * p.invstd[c];
  if (p.grad_bias) p.grad_bias[c] = p.sum_dy[c];
  if (p.grad_weight_r) p.grad_weight_r[c] = p.sum_dy_rmu[c] * p.invstd_r[c];
  if (p.grad_bias_r) p.grad_bias_r[c] = p.sum_dy[c];
}

}  // namespace math
}  // namespace fastres
