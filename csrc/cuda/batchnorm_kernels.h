// Launchers of the CUDA kernels of the fastres:: BatchNorm family (semantics: csrc/fastres.cpp).
//
// Plain C++ over raw device pointers and a cudaStream_t: no torch headers, so that the kernels
// compile with nvcc alone (scripts/check_cuda_compile.sh). Per-channel pointers ("acc") are of
// the accumulation type of dtype (Acc in batchnorm_kernels.cu, acc_type_of on the host).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../batchnorm_math.h"

namespace fastres {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// x viewed as [N, C, S]: NCHW (planes of S values of one channel) or channels_last (rows of C).
struct Geometry {
  int64_t n, c, s;
  bool channels_last;
};

// The element-wise tail z = x * scale + shift [+ r | + r * scale_r + shift_r], act ReLU or not.
struct Tail {
  const void* scale;
  const void* shift;
  const void* residual;  // nullptr: none (same dtype and layout as x)
  const void* scale_r;   // nullptr: the residual is added as is
  const void* shift_r;
  bool relu;
};

// Workspace (device memory) the reductions need for their per-block partial results.
size_t bn_stats_workspace_bytes(DType dtype, Geometry g);
size_t bn_backward_reduce_workspace_bytes(DType dtype, Geometry g);

cudaError_t launch_bn_stats(DType dtype, const void* x, Geometry g, void* mean, void* m2,
                            void* workspace, cudaStream_t stream);

// Per-channel launches (math:: in batchnorm_math.h): every pointer is acc, dtype that of the
// statistics or of the x they come from.
cudaError_t launch_bn_finalize(DType dtype, const math::FinalizePointers<void>& p, int64_t count,
                               double eps, int64_t c, cudaStream_t stream);

// bn_finalize, and the running statistics (of running_dtype; num_batches_tracked may be
// nullptr where momentum is used) updated in place: one block.
cudaError_t launch_bn_finalize_update(DType dtype, const math::FinalizePointers<void>& p,
                                      int64_t count, double eps, int64_t c,
                                      DType running_dtype, void* running_mean,
                                      void* running_var, int64_t* num_batches_tracked,
                                      double momentum, bool cumulative, cudaStream_t stream);

// The coefficients of launch_bn_backward_elemt (and the affine gradients) from the sums.
cudaError_t launch_bn_coef(DType dtype, const math::CoefPointers<void>& p,
                           const math::CoefFlags& f, cudaStream_t stream);

cudaError_t launch_bn_apply(DType dtype, const void* x, Tail tail, Geometry g, void* out,
                            cudaStream_t stream);

// y = ReLU(y + r) in place, numel elements of y and r in the same layout.
cudaError_t launch_add_relu(DType dtype, void* y, const void* r, int64_t numel,
                            cudaStream_t stream);

// sum_dy_rmu may be nullptr (no second BN: tail.scale_r nullptr). mean and mean_r must be valid
// [C] vectors; mean_r is used only with a second BN (elsewhere any [C] vector, mean say, does).
cudaError_t launch_bn_backward_reduce(DType dtype, const void* grad_out, const void* x, Tail tail,
                                      const void* mean, const void* mean_r, Geometry g,
                                      void* sum_dy, void* sum_dy_xmu, void* sum_dy_rmu,
                                      void* workspace, cudaStream_t stream);

// coef: [6, C] acc, grad_x = coef0 * g + coef1 * x + coef2, grad_r = coef3 * g + coef4 * r +
// coef5 with g = grad_out * ReLU mask; the x terms only with train_x, the r terms only with
// train_r (which needs train_x). grad_r may be nullptr.
cudaError_t launch_bn_backward_elemt(DType dtype, const void* grad_out, const void* x, Tail tail,
                                     const void* coef, bool train_x, bool train_r, Geometry g,
                                     void* grad_x, void* grad_r, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastres
