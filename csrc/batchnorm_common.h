// What the CPU and CUDA bindings of the fastres:: BatchNorm family share (semantics:
// csrc/fastres.cpp): per op, a prepare_* function checks the arguments, lays x and its
// companions out in x's memory format, converts the per-channel vectors to the accumulation
// dtype and allocates the outputs; the bindings add the device guard, the kernel call and
// their handling of empty tensors.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <optional>

#include "batchnorm_math.h"

namespace fastres {

// The accumulation rule: ATen's opmath type (fp64 tensors accumulate in fp64; fp32, fp16 and
// bf16 in fp32). The host takes it from ATen: at::opmath_type<scalar_t> in the CPU kernels,
// acc_type_of(x) (at::toOpMathType) for tensors. The CUDA kernels, free of torch headers, state
// it once more on their own (Acc in cuda/batchnorm_kernels.cu); the two must agree.
inline at::ScalarType acc_type_of(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fastres: expected a floating-point tensor, got ", x.scalar_type());
  return at::toOpMathType(x.scalar_type());
}

struct Geometry {
  int64_t n, c, s;
  bool channels_last;
};

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline Geometry geometry_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "fastres: expected x of shape [N, C, *], got ", x.sizes());
  const int64_t s = x.dim() > 2 ? x.numel() / std::max<int64_t>(1, x.size(0) * x.size(1)) : 1;
  return {x.size(0), x.size(1), s, is_channels_last(x)};
}

// A per-element tensor that must share x's shape, dtype and layout (made contiguous in it).
inline at::Tensor like_x(const at::Tensor& t, const at::Tensor& x, at::MemoryFormat fmt,
                         const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastres: ", name, " has shape ", t.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fastres: ", name, " is on another device than x");
  return t.contiguous(fmt);
}

// A per-channel vector in the accumulation dtype.
inline at::Tensor channel_param(const at::Tensor& t, int64_t c, at::ScalarType acc,
                                const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, "fastres: ", name, " must have shape [", c,
              "], got ", t.sizes());
  return t.to(acc).contiguous();
}

struct Prepared {
  Geometry g;
  at::MemoryFormat fmt;
  at::ScalarType acc;
  at::Tensor x, r, scale, shift, scale_r, shift_r;
};

inline Prepared prepare(const at::Tensor& x_in, const at::Tensor& scale,
                        const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                        const std::optional<at::Tensor>& scale_r,
                        const std::optional<at::Tensor>& shift_r) {
  Prepared p;
  p.acc = acc_type_of(x_in);
  p.g = geometry_of(x_in);
  p.fmt = format_of(x_in);
  p.x = x_in.contiguous(p.fmt);
  p.scale = channel_param(scale, p.g.c, p.acc, "scale");
  p.shift = channel_param(shift, p.g.c, p.acc, "shift");
  TORCH_CHECK(scale_r.has_value() == shift_r.has_value(),
              "fastres: give both scale_r and shift_r or neither");
  if (residual.has_value()) {
    p.r = like_x(*residual, x_in, p.fmt, "residual");
    if (scale_r.has_value()) {
      p.scale_r = channel_param(*scale_r, p.g.c, p.acc, "scale_r");
      p.shift_r = channel_param(*shift_r, p.g.c, p.acc, "shift_r");
    }
  } else {
    TORCH_CHECK(!scale_r.has_value(), "fastres: scale_r / shift_r need a residual");
  }
  return p;
}

// Per-channel coefficients [6, C] (accumulation dtype) of bn_backward_elemt:
// grad_x = c0 * g + c1 * x + c2 and grad_r = c3 * g + c4 * r + c5, g = grad_out * ReLU mask.
// The x terms (c1, c2) exist only where x's norm trains (train_x), the r terms (c4, c5) only
// where r's does (train_r); elsewhere the kernels leave x and r out of the gradient. The
// arithmetic is math::coef_channel (batchnorm_math.h), one loop (CPU) or kernel (CUDA); here
// the inputs it reads, as [C] vectors in the accumulation dtype (undefined where absent).
struct ElemtCoefficients {
  at::Tensor coef;
  bool train_x;
  bool train_r;
  bool want_r;  // grad_r wanted: grad_residual and a residual
  double count;
  at::Tensor mean, invstd, sum_dy, sum_dy_xmu, mean_r, invstd_r, sum_dy_rmu;

  // The pointers of math::coef_channel (acc_t: the accumulation type, or void for the CUDA
  // launcher); the affine gradients [4] (grads, BackwardArgs) not wanted unless given.
  template <typename acc_t>
  math::CoefPointers<acc_t> pointers(const Prepared& p, at::Tensor* grads = nullptr) const {
    const auto in = [](const at::Tensor& t) -> const acc_t* {
      return t.defined() && t.numel() > 0 ? static_cast<const acc_t*>(t.const_data_ptr())
                                          : nullptr;
    };
    const auto out = [](at::Tensor* t) -> acc_t* {
      return t != nullptr && t->defined() && t->numel() > 0 ? static_cast<acc_t*>(t->data_ptr())
                                                            : nullptr;
    };
    return {in(p.scale), in(p.scale_r), in(mean), in(invstd), in(sum_dy), in(sum_dy_xmu),
            in(mean_r), in(invstd_r), in(sum_dy_rmu), static_cast<acc_t*>(coef.data_ptr()),
            grads ? out(grads) : nullptr, grads ? out(grads + 1) : nullptr,
            grads ? out(grads + 2) : nullptr, grads ? out(grads + 3) : nullptr};
  }

  math::CoefFlags flags(const Prepared& p) const {
    return {p.g.c, count, train_x, train_r, want_r};
  }
};

inline at::Tensor optional_channel(const std::optional<at::Tensor>& t, const Prepared& p,
                                   const char* name) {
  return t.has_value() ? channel_param(*t, p.g.c, p.acc, name) : at::Tensor();
}

inline ElemtCoefficients elemt_coefficients(
    const Prepared& p, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& sum_dy,
    const std::optional<at::Tensor>& sum_dy_xmu, const std::optional<at::Tensor>& mean_r,
    const std::optional<at::Tensor>& invstd_r, const std::optional<at::Tensor>& sum_dy_rmu,
    int64_t count, bool grad_residual) {
  ElemtCoefficients ec;
  ec.train_x = sum_dy.has_value();
  ec.want_r = grad_residual && p.r.defined();
  ec.train_r = ec.want_r && p.scale_r.defined() && sum_dy_rmu.has_value();
  TORCH_CHECK(!ec.train_x || (mean && invstd && sum_dy_xmu && count > 0),
              "fastres: bn_backward_elemt with sum_dy needs mean, invstd, sum_dy_xmu, count > 0");
  TORCH_CHECK(!ec.train_r || (ec.train_x && mean_r && invstd_r),
              "fastres: bn_backward_elemt with sum_dy_rmu needs sum_dy, mean_r and invstd_r");
  ec.count = static_cast<double>(count);
  if (ec.train_x) {
    ec.mean = optional_channel(mean, p, "mean");
    ec.invstd = optional_channel(invstd, p, "invstd");
    ec.sum_dy = optional_channel(sum_dy, p, "sum_dy");
    ec.sum_dy_xmu = optional_channel(sum_dy_xmu, p, "sum_dy_xmu");
  }
  if (ec.train_r) {
    ec.mean_r = optional_channel(mean_r, p, "mean_r");
    ec.invstd_r = optional_channel(invstd_r, p, "invstd_r");
    ec.sum_dy_rmu = optional_channel(sum_dy_rmu, p, "sum_dy_rmu");
  }
  // Uninitialised: each kernel reads only the rows coef_channel writes under the same flags
  // (row 0 always; 1, 2 with train_x; 3 with want_r; 4, 5 with train_r).
  ec.coef = at::empty({6, p.g.c}, p.scale.options());
  return ec;
}

// ---------------------------------------------------------------------------------------------
// Per op: the checked, laid-out arguments and the allocated (uninitialised) outputs.

// An output of x's shape, dtype, device and memory format.
inline at::Tensor empty_like_x(const Prepared& p) {
  return at::empty_like(p.x, p.x.options(), p.fmt);
}

// bn_stats: x in its memory format; mean, m2 [C] in the accumulation dtype.
struct StatsArgs {
  Geometry g;
  at::Tensor x, mean, m2;
};

inline StatsArgs prepare_stats(const at::Tensor& x_in) {
  const auto acc = acc_type_of(x_in);
  StatsArgs a;
  a.g = geometry_of(x_in);
  a.x = x_in.contiguous(format_of(x_in));
  a.mean = at::empty({a.g.c}, a.x.options().dtype(acc));
  a.m2 = at::empty({a.g.c}, a.x.options().dtype(acc));
  return a;
}

// bn_finalize: every vector [C] in the accumulation dtype of mean; weight / bias undefined
// where not given.
struct FinalizeArgs {
  int64_t c;
  at::Tensor mean, m2, weight, bias;
  at::Tensor scale, shift, invstd;
};

inline FinalizeArgs prepare_finalize(const at::Tensor& mean_in, const at::Tensor& m2_in,
                                     int64_t count, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(count > 0, "fastres: bn_finalize needs count > 0, got ", count);
  const auto acc = acc_type_of(mean_in);
  FinalizeArgs a;
  a.c = mean_in.numel();
  a.mean = channel_param(mean_in, a.c, acc, "mean");
  a.m2 = channel_param(m2_in, a.c, acc, "m2");
  a.weight = weight.has_value() ? channel_param(*weight, a.c, acc, "weight") : at::Tensor();
  a.bias = bias.has_value() ? channel_param(*bias, a.c, acc, "bias") : at::Tensor();
  a.scale = at::empty({a.c}, a.mean.options());
  a.shift = at::empty({a.c}, a.mean.options());
  a.invstd = at::empty({a.c}, a.mean.options());
  return a;
}

// The pointers of math::finalize_channel (acc_t: the accumulation type, or void for CUDA).
template <typename acc_t>
math::FinalizePointers<acc_t> finalize_pointers(const FinalizeArgs& a) {
  const auto in = [](const at::Tensor& t) -> const acc_t* {
    return t.defined() ? static_cast<const acc_t*>(t.const_data_ptr()) : nullptr;
  };
  return {in(a.mean),
          in(a.m2),
          in(a.weight),
          in(a.bias),
          static_cast<acc_t*>(a.scale.data_ptr()),
          static_cast<acc_t*>(a.shift.data_ptr()),
          static_cast<acc_t*>(a.invstd.data_ptr())};
}

// bn_finalize_update: bn_finalize's arguments, and the running statistics it updates in place
// ([C], contiguous, any floating dtype; num_batches_tracked an int64 of one element, needed
// for the cumulative average: momentum None).
inline void check_running(const at::Tensor& mean, const at::Tensor& running_mean,
                          const at::Tensor& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked,
                          const std::optional<double>& momentum) {
  const int64_t c = mean.numel();
  for (const at::Tensor* t : {&running_mean, &running_var}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == c && t->is_contiguous() &&
                    at::isFloatingType(t->scalar_type()) && t->device() == mean.device(),
                "fastres: the running statistics must be contiguous floating [", c,
                "] tensors on the statistics' device, got ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(running_mean.scalar_type() == running_var.scalar_type(),
              "fastres: running_mean and running_var differ in dtype");
  TORCH_CHECK(mean.scalar_type() != at::kDouble || running_mean.scalar_type() == at::kDouble,
              "fastres: float64 statistics update float64 running statistics only, got ",
              running_mean.scalar_type());
  if (num_batches_tracked.has_value()) {
    TORCH_CHECK(num_batches_tracked->numel() == 1 &&
                    num_batches_tracked->scalar_type() == at::kLong &&
                    num_batches_tracked->device() == mean.device(),
                "fastres: num_batches_tracked must be an int64 tensor of one element");
  }
  TORCH_CHECK(momentum.has_value() || num_batches_tracked.has_value(),
              "fastres: the cumulative average (momentum None) needs num_batches_tracked");
}

// add_relu_: whether y and r (same shape, dtype, device) can be walked as one flat array
// (same strides over dense memory: same layout); elsewhere the bindings fall back to ATen.
inline bool add_relu_flat(const at::Tensor& y, const at::Tensor& r) {
  TORCH_CHECK(y.sizes() == r.sizes() && y.scalar_type() == r.scalar_type() &&
                  y.device() == r.device() && at::isFloatingType(y.scalar_type()),
              "fastres: add_relu_ needs y and r of one shape, floating dtype and device, got ",
              y.sizes(), " ", y.scalar_type(), " and ", r.sizes(), " ", r.scalar_type());
  return y.is_non_overlapping_and_dense() && r.strides() == y.strides();
}

// bn_apply: out like x.
struct ApplyArgs {
  Prepared p;
  at::Tensor out;
};

inline ApplyArgs prepare_apply(const at::Tensor& x_in, const at::Tensor& scale,
                               const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                               const std::optional<at::Tensor>& scale_r,
                               const std::optional<at::Tensor>& shift_r) {
  ApplyArgs a;
  a.p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  a.out = empty_like_x(a.p);
  return a;
}

// bn_backward_reduce: grad_out like x; mean [C] (zeros where not given); mean_r [C] (zeros
// where not given, or just mean where the residual has no BN of its own, the kernels then not
// using it); the sums [C], sum_dy_rmu [0] unless the residual has its own BN (p.scale_r).
struct BackwardReduceArgs {
  Prepared p;
  at::Tensor dy, mean, mean_r;
  at::Tensor sum_dy, sum_dy_xmu, sum_dy_rmu;
};

inline BackwardReduceArgs prepare_backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale_r, const std::optional<at::Tensor>& shift_r,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& mean_r) {
  BackwardReduceArgs a;
  a.p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  a.dy = like_x(grad_out, x_in, a.p.fmt, "grad_out");
  const int64_t C = a.p.g.c;
  const auto opts = a.p.scale.options();
  const bool second_bn = a.p.scale_r.defined();
  a.mean = mean.has_value() ? channel_param(*mean, C, a.p.acc, "mean") : at::zeros({C}, opts);
  // Without a second BN the kernels never use mean_r: any valid [C] vector saves a fill.
  a.mean_r = mean_r.has_value() ? channel_param(*mean_r, C, a.p.acc, "mean_r")
             : second_bn        ? at::zeros({C}, opts)
                                : a.mean;
  a.sum_dy = at::empty({C}, opts);
  a.sum_dy_xmu = at::empty({C}, opts);
  a.sum_dy_rmu = at::empty({second_bn ? C : 0}, opts);
  return a;
}

// bn_backward_elemt: grad_out like x; the coefficients; grad_x like x, grad_r like x where
// wanted (grad_residual and a residual: ec.want_r), else [0].
struct BackwardElemtArgs {
  Prepared p;
  at::Tensor dy;
  ElemtCoefficients ec;
  at::Tensor grad_x, grad_r;
};

inline BackwardElemtArgs prepare_backward_elemt(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale_r, const std::optional<at::Tensor>& shift_r,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
    const std::optional<at::Tensor>& sum_dy, const std::optional<at::Tensor>& sum_dy_xmu,
    const std::optional<at::Tensor>& mean_r, const std::optional<at::Tensor>& invstd_r,
    const std::optional<at::Tensor>& sum_dy_rmu, int64_t count, bool grad_residual) {
  BackwardElemtArgs a;
  a.p = prepare(x_in, scale, shift, residual, scale_r, shift_r);
  a.dy = like_x(grad_out, x_in, a.p.fmt, "grad_out");
  a.ec = elemt_coefficients(a.p, mean, invstd, sum_dy, sum_dy_xmu, mean_r, invstd_r, sum_dy_rmu,
                            count, grad_residual);
  a.grad_x = empty_like_x(a.p);
  a.grad_r = a.ec.want_r ? empty_like_x(a.p) : at::empty({0}, a.p.x.options());
  return a;
}

// bn_backward: bn_backward_reduce's arguments and outputs (the sums), then the coefficients
// and outputs of bn_backward_elemt, and the affine gradients [C] (of r's norm: [C] where it
// has one, scale_r, else [0]). count > 0: batch statistics (the batch terms of both norms);
// 0: running statistics (mean, mean_r: the running means, for the affine gradients).
struct BackwardArgs {
  BackwardReduceArgs r;
  ElemtCoefficients ec;
  at::Tensor grad_x, grad_r;
  at::Tensor grads[4];  // grad_weight, grad_bias, grad_weight_r, grad_bias_r
};

inline BackwardArgs prepare_backward(
    const at::Tensor& grad_out, const at::Tensor& x_in, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale_r, const std::optional<at::Tensor>& shift_r,
    const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& mean_r,
    const std::optional<at::Tensor>& invstd_r, int64_t count, bool grad_residual) {
  TORCH_CHECK(count >= 0, "fastres: bn_backward needs count >= 0, got ", count);
  TORCH_CHECK(!scale_r.has_value() || (mean_r.has_value() && invstd_r.has_value()),
              "fastres: bn_backward with scale_r needs mean_r and invstd_r");
  BackwardArgs a;
  a.r = prepare_backward_reduce(grad_out, x_in, scale, shift, residual, scale_r, shift_r, mean,
                                mean_r);
  const Prepared& p = a.r.p;
  const int64_t C = p.g.c;
  const bool second_bn = p.scale_r.defined();
  ElemtCoefficients& ec = a.ec;
  ec.train_x = count > 0;
  ec.want_r = grad_residual && p.r.defined();
  ec.train_r = ec.train_x && ec.want_r && second_bn;
  ec.count = static_cast<double>(count);
  ec.mean = a.r.mean;
  ec.invstd = channel_param(invstd, C, p.acc, "invstd");
  ec.sum_dy = a.r.sum_dy;
  ec.sum_dy_xmu = a.r.sum_dy_xmu;
  if (second_bn) {
    ec.mean_r = a.r.mean_r;
    ec.invstd_r = channel_param(*invstd_r, C, p.acc, "invstd_r");
    ec.sum_dy_rmu = a.r.sum_dy_rmu;
  }
  ec.coef = at::empty({6, C}, p.scale.options());
  a.grad_x = empty_like_x(p);
  a.grad_r = ec.want_r ? empty_like_x(p) : at::empty({0}, p.x.options());
  const auto opts = p.scale.options();
  a.grads[0] = at::empty({C}, opts);
  a.grads[1] = at::empty({C}, opts);
  a.grads[2] = at::empty({second_bn ? C : 0}, opts);
  a.grads[3] = at::empty({second_bn ? C : 0}, opts);
  return a;
}

}  // namespace fastres
