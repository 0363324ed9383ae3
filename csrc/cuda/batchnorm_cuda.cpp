// CUDA bindings of the fastres:: BatchNorm family: the checks, layout and output allocation
// shared with the CPU (prepare_* in batchnorm_common.h) under a device guard, then the
// raw-pointer launchers of batchnorm_kernels.cu on the current stream. Compiled only in CUDA
// builds (setup.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../batchnorm_common.h"
#include "batchnorm_fast_kernels.h"
#include "batchnorm_kernels.h"

namespace fastres {
namespace {

using at::Tensor;

cuda::DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      TORCH_CHECK(false, "fastres: unsupported dtype ", x.scalar_type());
  }
}

cuda::Geometry cuda_geometry(const Geometry& g) { return {g.n, g.c, g.s, g.channels_last}; }

// An optional tensor's data, nullptr where it is undefined.
const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

cuda::Tail tail_of(const Prepared& p, bool relu) {
  return {ptr_or_null(p.scale), ptr_or_null(p.shift), ptr_or_null(p.r), ptr_or_null(p.scale_r),
          ptr_or_null(p.shift_r), relu};
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastres: ", op, " kernel launch failed: ",
              cudaGetErrorString(err));
}

// The kernels of an op's `variant`: 0 batchnorm_kernels.cu, 1 batchnorm_fast_kernels.cu.
bool fast_variant(int64_t variant) {
  TORCH_CHECK(variant == 0 || variant == 1, "fastres: kernel variant must be 0 or 1, got ",
              variant);
  return variant == 1;
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& x_in, int64_t variant) {
  const bool fast = fast_variant(variant);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const StatsArgs a = prepare_stats(x_in);
  const Geometry& g = a.g;
  if (g.c == 0) return {a.mean, a.m2};
  if (g.n * g.s == 0) {
    a.mean.zero_();
    a.m2.zero_();
    return {a.mean, a.m2};
  }
  const auto dt = dtype_of(a.x);
  const auto cg = cuda_geometry(g);
  Tensor ws = workspace(fast ? cuda::fast::bn_stats_workspace_bytes(dt, cg)
                             : cuda::bn_stats_workspace_bytes(dt, cg),
                        a.x);
  const auto launch = fast ? cuda::fast::launch_bn_stats : cuda::launch_bn_stats;
  check(launch(dt, a.x.const_data_ptr(), cg, a.mean.data_ptr(), a.m2.data_ptr(), ws.data_ptr(),
               c10::cuda::getCurrentCUDAStream()),
        "bn_stats");
  return {a.mean, a.m2};
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize_cuda(const Tensor& mean_in, const Tensor& m2_in,
                                                    int64_t count,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    double eps) {
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const FinalizeArgs a = prepare_finalize(mean_in, m2_in, count, weight, bias);
  if (a.c == 0) return {a.scale, a.shift, a.invstd};
  check(cuda::launch_bn_finalize(dtype_of(a.mean), finalize_pointers<void>(a), count, eps, a.c,
                                 c10::cuda::getCurrentCUDAStream()),
        "bn_finalize");
  return {a.scale, a.shift, a.invstd};
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize_update_cuda(
    const Tensor& mean_in, const Tensor& m2_in, int64_t count,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& running_mean, const Tensor& running_var,
    const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum) {
  const c10::cuda::CUDAGuard guard(mean_in.device());
  TORCH_CHECK(count > 1, "fastres: bn_finalize_update needs count > 1, got ", count);
  const FinalizeArgs a = prepare_finalize(mean_in, m2_in, count, weight, bias);
  check_running(a.mean, running_mean, running_var, num_batches_tracked, momentum);
  int64_t* nbt = num_batches_tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  check(cuda::launch_bn_finalize_update(dtype_of(a.mean), finalize_pointers<void>(a), count, eps,
                                        a.c, dtype_of(running_mean), running_mean.data_ptr(),
                                        running_var.data_ptr(), nbt, momentum.value_or(0.0),
                                        !momentum.has_value(),
                                        c10::cuda::getCurrentCUDAStream()),
        "bn_finalize_update");
  return {a.scale, a.shift, a.invstd};
}

Tensor bn_apply_cuda(const Tensor& x_in, const Tensor& scale, const Tensor& shift,
                     const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
                     const std::optional<Tensor>& shift_r, bool relu, int64_t variant) {
  const bool fast = fast_variant(variant);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const ApplyArgs a = prepare_apply(x_in, scale, shift, residual, scale_r, shift_r);
  const Prepared& p = a.p;
  if (a.out.numel() == 0) return a.out;
  const auto launch = fast ? cuda::fast::launch_bn_apply : cuda::launch_bn_apply;
  check(launch(dtype_of(p.x), p.x.const_data_ptr(), tail_of(p, relu), cuda_geometry(p.g),
               a.out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "bn_apply");
  return a.out;
}

std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& mean_r, int64_t variant) {
  const bool fast = fast_variant(variant);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BackwardReduceArgs a = prepare_backward_reduce(grad_out, x_in, scale, shift, residual,
                                                       scale_r, shift_r, mean, mean_r);
  const Prepared& p = a.p;
  if (p.x.numel() == 0 || p.g.c == 0) {
    a.sum_dy.zero_();
    a.sum_dy_xmu.zero_();
    a.sum_dy_rmu.zero_();
    return {a.sum_dy, a.sum_dy_xmu, a.sum_dy_rmu};
  }
  const auto dt = dtype_of(p.x);
  const auto cg = cuda_geometry(p.g);
  Tensor ws = workspace(fast ? cuda::fast::bn_backward_reduce_workspace_bytes(dt, cg)
                             : cuda::bn_backward_reduce_workspace_bytes(dt, cg),
                        p.x);
  const auto launch =
      fast ? cuda::fast::launch_bn_backward_reduce : cuda::launch_bn_backward_reduce;
  check(launch(
            dt, a.dy.const_data_ptr(), p.x.const_data_ptr(), tail_of(p, relu),
            a.mean.const_data_ptr(), a.mean_r.const_data_ptr(), cg, a.sum_dy.data_ptr(),
            a.sum_dy_xmu.data_ptr(), p.scale_r.defined() ? a.sum_dy_rmu.data_ptr() : nullptr,
            ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "bn_backward_reduce");
  return {a.sum_dy, a.sum_dy_xmu, a.sum_dy_rmu};
}

std::tuple<Tensor, Tensor> bn_backward_elemt_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& invstd, const std::optional<Tensor>& sum_dy,
    const std::optional<Tensor>& sum_dy_xmu, const std::optional<Tensor>& mean_r,
    const std::optional<Tensor>& invstd_r, const std::optional<Tensor>& sum_dy_rmu,
    int64_t count, bool grad_residual, int64_t variant) {
  const bool fast = fast_variant(variant);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const BackwardElemtArgs a = prepare_backward_elemt(
      grad_out, x_in, scale, shift, residual, scale_r, shift_r, mean, invstd, sum_dy, sum_dy_xmu,
      mean_r, invstd_r, sum_dy_rmu, count, grad_residual);
  const Prepared& p = a.p;
  if (p.x.numel() == 0) return {a.grad_x, a.grad_r};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check(cuda::launch_bn_coef(dtype_of(p.x), a.ec.pointers<void>(p), a.ec.flags(p), stream),
        "bn_backward_elemt coefficients");
  const auto launch = fast ? cuda::fast::launch_bn_backward_elemt : cuda::launch_bn_backward_elemt;
  check(launch(
            dtype_of(p.x), a.dy.const_data_ptr(), p.x.const_data_ptr(), tail_of(p, relu),
            a.ec.coef.const_data_ptr(), a.ec.train_x, a.ec.train_r, cuda_geometry(p.g),
            a.grad_x.data_ptr(), a.ec.want_r ? a.grad_r.data_ptr() : nullptr,
            c10::cuda::getCurrentCUDAStream()),
        "bn_backward_elemt");
  return {a.grad_x, a.grad_r};
}

// bn_backward: the reduce, the coefficients with the affine gradients and the element-wise
// pass (three launches, in one op).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_backward_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& mean_r, const std::optional<Tensor>& invstd_r, int64_t count,
    bool grad_residual, int64_t variant) {
  const bool fast = fast_variant(variant);
  const c10::cuda::CUDAGuard guard(x_in.device());
  BackwardArgs a = prepare_backward(grad_out, x_in, scale, shift, residual, scale_r, shift_r,
                                    mean, invstd, mean_r, invstd_r, count, grad_residual);
  const Prepared& p = a.r.p;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dt = dtype_of(p.x);
  const auto cg = cuda_geometry(p.g);
  if (p.g.c == 0) return {a.grad_x, a.grad_r, a.grads[0], a.grads[1], a.grads[2], a.grads[3]};
  if (p.x.numel() == 0) {
    a.r.sum_dy.zero_();
    a.r.sum_dy_xmu.zero_();
    a.r.sum_dy_rmu.zero_();
  } else {
    Tensor ws = workspace(fast ? cuda::fast::bn_backward_reduce_workspace_bytes(dt, cg)
                               : cuda::bn_backward_reduce_workspace_bytes(dt, cg),
                          p.x);
    const auto reduce =
        fast ? cuda::fast::launch_bn_backward_reduce : cuda::launch_bn_backward_reduce;
    check(reduce(
              dt, a.r.dy.const_data_ptr(), p.x.const_data_ptr(), tail_of(p, relu),
              a.r.mean.const_data_ptr(), a.r.mean_r.const_data_ptr(), cg,
              a.r.sum_dy.data_ptr(), a.r.sum_dy_xmu.data_ptr(),
              p.scale_r.defined() ? a.r.sum_dy_rmu.data_ptr() : nullptr, ws.data_ptr(), stream),
          "bn_backward reduce");
  }
  check(cuda::launch_bn_coef(dt, a.ec.pointers<void>(p, a.grads), a.ec.flags(p), stream),
        "bn_backward coefficients");
  if (p.x.numel() > 0) {
    const auto elemt =
        fast ? cuda::fast::launch_bn_backward_elemt : cuda::launch_bn_backward_elemt;
    check(elemt(
              dt, a.r.dy.const_data_ptr(), p.x.const_data_ptr(), tail_of(p, relu),
              a.ec.coef.const_data_ptr(), a.ec.train_x, a.ec.train_r, cg, a.grad_x.data_ptr(),
              a.ec.want_r ? a.grad_r.data_ptr() : nullptr, stream),
          "bn_backward elemt");
  }
  return {a.grad_x, a.grad_r, a.grads[0], a.grads[1], a.grads[2], a.grads[3]};
}

void add_relu_cuda(const Tensor& y, const Tensor& r) {
  const c10::cuda::CUDAGuard guard(y.device());
  if (!add_relu_flat(y, r)) {
    y.add_(r).relu_();
    return;
  }
  if (y.numel() == 0) return;
  check(cuda::launch_add_relu(dtype_of(y), y.data_ptr(), r.const_data_ptr(), y.numel(),
                              c10::cuda::getCurrentCUDAStream()),
        "add_relu_");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_finalize_update", &bn_finalize_update_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cuda);
  m.impl("bn_backward", &bn_backward_cuda);
  m.impl("add_relu_", &add_relu_cuda);
}

}  // namespace fastres
