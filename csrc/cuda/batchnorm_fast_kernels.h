// Launchers of the bandwidth-bound CUDA kernels of the fastres:: BatchNorm family: drop-in
// alternatives to those of batchnorm_kernels.h (same arguments, layouts, dtypes and outputs),
// selected per call by the ops' `variant` argument (1). fp64, and geometries outside the limits
// below, run the kernels of batchnorm_kernels.h.
//
// Design (batchnorm_fast_kernels.cu): each thread keeps its channels fixed (channels_last: one
// 16-byte vector of channels per thread, the lanes of a warp spread over channels and rows so
// that all 32 are busy down to C = 8 * vector width; NCHW: one channel per block) with their
// per-channel constants in registers, and issues several independent 16-byte loads before
// using any. Reductions finish in-kernel: every block writes its per-channel partials, the
// last block of each channel tile (an atomic counter) merges them in a fixed order
// (deterministic) and writes the result, finalized where asked. No merge launch.
//
// Plain C++ over raw device pointers and a cudaStream_t: no torch headers (see
// batchnorm_kernels.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "batchnorm_kernels.h"

namespace fastres {
namespace cuda {
namespace fast {

// Workspace (device memory, uninitialised) the reductions need: per-block partials and one
// arrival counter per channel tile, zeroed by the launcher on the stream.
size_t bn_stats_workspace_bytes(DType dtype, Geometry g);
size_t bn_backward_reduce_workspace_bytes(DType dtype, Geometry g);

cudaError_t launch_bn_stats(DType dtype, const void* x, Geometry g, void* mean, void* m2,
                            void* workspace, cudaStream_t stream);

// What the statistics kernel's last block also computes per channel c, from this batch's
// count = N * S, mean and m2 (pointers acc, nullptr: not wanted; weight / bias nullptr: 1 / 0):
// invstd = 1 / sqrt(m2 / count + eps), scale = weight * invstd, shift = bias - mean * scale,
// and, where running_mean / running_var are given, in place
// running = (1 - momentum) * running + momentum * (mean | m2 / (count - 1)).
struct Finalize {
  const void* weight;
  const void* bias;
  double eps;
  void* scale;
  void* shift;
  void* invstd;
  void* running_mean;
  void* running_var;
  double momentum;
};

// launch_bn_stats followed by the per-channel finalize, in one launch (fp64: two).
cudaError_t launch_bn_stats_finalize(DType dtype, const void* x, Geometry g, void* mean,
                                     void* m2, const Finalize& fin, void* workspace,
                                     cudaStream_t stream);

cudaError_t launch_bn_apply(DType dtype, const void* x, Tail tail, Geometry g, void* out,
                            cudaStream_t stream);

cudaError_t launch_bn_backward_reduce(DType dtype, const void* grad_out, const void* x, Tail tail,
                                      const void* mean, const void* mean_r, Geometry g,
                                      void* sum_dy, void* sum_dy_xmu, void* sum_dy_rmu,
                                      void* workspace, cudaStream_t stream);

cudaError_t launch_bn_backward_elemt(DType dtype, const void* grad_out, const void* x, Tail tail,
                                     const void* coef, bool train_x, bool train_r, Geometry g,
                                     void* grad_x, void* grad_r, cudaStream_t stream);

}  // namespace fast
}  // namespace cuda
}  // namespace fastres
