// CUDA bindings of the fastres:: BatchNorm family: checks, layout and output allocation with
// ATen, then the raw-pointer launchers of batchnorm_kernels.cu on the current stream.
// Compiled only in CUDA builds (setup.py).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../batchnorm_common.h"
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

cuda::Tail tail_of(const Prepared& p, bool relu) {
  auto ptr = [](const Tensor& t) -> const void* { return t.defined() ? t.const_data_ptr() : nullptr; };
  return {ptr(p.scale), ptr(p.shift), ptr(p.r), ptr(p.scale_r), ptr(p.shift_r), relu};
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastres: ", op, " kernel launch failed: ",
              cudaGetErrorString(err));
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& x_in) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = acc_type_of(x_in);
  const Geometry g = geometry_of(x_in);
  const Tensor x = x_in.contiguous(format_of(x_in));
  Tensor mean = at::empty({g.c}, x.options().dtype(acc));
  Tensor m2 = at::empty({g.c}, x.options().dtype(acc));
  if (g.c == 0) return {mean, m2};
  if (g.n * g.s == 0) {
    mean.zero_();
    m2.zero_();
    return {mean, m2};
  }
  const auto dt = dtype_of(x);
  const auto cg = cuda_geometry(g);
  Tensor ws = workspace(cuda::bn_stats_workspace_bytes(dt, cg), x);
  check(cuda::launch_bn_stats(dt, x.const_data_ptr(), cg, mean.data_ptr(), m2.data_ptr(),
                              ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "bn_stats");
  return {mean, m2};
}

std::tuple<Tensor, Tensor, Tensor> bn_finalize_cuda(const Tensor& mean_in, const Tensor& m2_in,
                                                    int64_t count,
                                                    const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias,
                                                    double eps) {
  TORCH_CHECK(count > 0, "fastres: bn_finalize needs count > 0, got ", count);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const auto acc = acc_type_of(mean_in);
  const int64_t C = mean_in.numel();
  const Tensor mean = channel_param(mean_in, C, acc, "mean");
  const Tensor m2 = channel_param(m2_in, C, acc, "m2");
  const Tensor w = weight.has_value() ? channel_param(*weight, C, acc, "weight") : Tensor();
  const Tensor b = bias.has_value() ? channel_param(*bias, C, acc, "bias") : Tensor();
  Tensor scale = at::empty({C}, mean.options());
  Tensor shift = at::empty({C}, mean.options());
  Tensor invstd = at::empty({C}, mean.options());
  if (C == 0) return {scale, shift, invstd};
  check(cuda::launch_bn_finalize(
            acc == at::kDouble ? cuda::DType::kFloat64 : cuda::DType::kFloat32,
            mean.const_data_ptr(), m2.const_data_ptr(), count,
            w.defined() ? w.const_data_ptr() : nullptr, b.defined() ? b.const_data_ptr() : nullptr,
            eps, C, scale.data_ptr(), shift.data_ptr(), invstd.data_ptr(),
            c10::cuda::getCurrentCUDAStream()),
        "bn_finalize");
  return {scale, shift, invstd};
}

Tensor bn_apply_cuda(const Tensor& x_in, const Tensor& scale, const Tensor& shift,
                     const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
                     const std::optional<Tensor>& shift_r, bool relu) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Prepared p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  Tensor out = at::empty_like(p.x, p.x.options(), p.fmt);
  if (out.numel() == 0) return out;
  check(cuda::launch_bn_apply(dtype_of(p.x), p.x.const_data_ptr(), tail_of(p, relu),
                              cuda_geometry(p.g), out.data_ptr(),
                              c10::cuda::getCurrentCUDAStream()),
        "bn_apply");
  return out;
}

std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& mean_r) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Prepared p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  const Tensor dy = like_x(grad_out, x_in, p.fmt, "grad_out");
  const int64_t C = p.g.c;
  const bool want_r = p.scale_r.defined();
  const Tensor mu = mean.has_value() ? channel_param(*mean, C, p.acc, "mean")
                                     : at::zeros({C}, p.scale.options());
  const Tensor mu_r = mean_r.has_value() ? channel_param(*mean_r, C, p.acc, "mean_r")
                                         : at::zeros({C}, p.scale.options());
  Tensor sum_dy = at::zeros({C}, p.scale.options());
  Tensor sum_dy_xmu = at::zeros({C}, p.scale.options());
  Tensor sum_dy_rmu = at::zeros({want_r ? C : 0}, p.scale.options());
  if (p.x.numel() == 0 || C == 0) return {sum_dy, sum_dy_xmu, sum_dy_rmu};
  const auto dt = dtype_of(p.x);
  const auto cg = cuda_geometry(p.g);
  Tensor ws = workspace(cuda::bn_backward_reduce_workspace_bytes(dt, cg), p.x);
  check(cuda::launch_bn_backward_reduce(
            dt, dy.const_data_ptr(), p.x.const_data_ptr(), tail_of(p, relu), mu.const_data_ptr(),
            mu_r.const_data_ptr(), cg, sum_dy.data_ptr(), sum_dy_xmu.data_ptr(),
            want_r ? sum_dy_rmu.data_ptr() : nullptr, ws.data_ptr(),
            c10::cuda::getCurrentCUDAStream()),
        "bn_backward_reduce");
  return {sum_dy, sum_dy_xmu, sum_dy_rmu};
}

std::tuple<Tensor, Tensor> bn_backward_elemt_cuda(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& invstd, const std::optional<Tensor>& sum_dy,
    const std::optional<Tensor>& sum_dy_xmu, const std::optional<Tensor>& mean_r,
    const std::optional<Tensor>& invstd_r, const std::optional<Tensor>& sum_dy_rmu,
    int64_t count, bool grad_residual) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Prepared p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  const Tensor dy = like_x(grad_out, x_in, p.fmt, "grad_out");
  const ElemtCoefficients ec = elemt_coefficients(p, mean, invstd, sum_dy, sum_dy_xmu, mean_r,
                                                  invstd_r, sum_dy_rmu, count, grad_residual);
  const bool want_r = grad_residual && p.r.defined();
  Tensor grad_x = at::empty_like(p.x, p.x.options(), p.fmt);
  Tensor grad_r =
      want_r ? at::empty_like(p.x, p.x.options(), p.fmt) : at::empty({0}, p.x.options());
  if (p.x.numel() == 0) return {grad_x, grad_r};
  check(cuda::launch_bn_backward_elemt(dtype_of(p.x), dy.const_data_ptr(), p.x.const_data_ptr(),
                                       tail_of(p, relu), ec.coef.const_data_ptr(),
                                       ec.train_x, ec.train_r, cuda_geometry(p.g),
                                       grad_x.data_ptr(),
                                       want_r ? grad_r.data_ptr() : nullptr,
                                       c10::cuda::getCurrentCUDAStream()),
        "bn_backward_elemt");
  return {grad_x, grad_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cuda);
}

}  // namespace fastres
