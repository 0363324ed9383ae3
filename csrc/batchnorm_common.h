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
// where r's does (train_r); elsewhere the kernels leave x and r out of the gradient.
struct ElemtCoefficients {
  at::Tensor coef;
  bool train_x;
  bool train_r;
  bool want_r;  // grad_r wanted: grad_residual and a residual
};

inline ElemtCoefficients elemt_coefficients(
    const Prepared& p, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& invstd, const std::optional<at::Tensor>& sum_dy,
    const std::optional<at::Tensor>& sum_dy_xmu, const std::optional<at::Tensor>& mean_r,
    const std::optional<at::Tensor>& invstd_r, const std::optional<at::Tensor>& sum_dy_rmu,
    int64_t count, bool grad_residual) {
  using at::Tensor;
  const int64_t C = p.g.c;
  const bool train_x = sum_dy.has_value();
  const bool want_r = grad_residual && p.r.defined();
  const bool train_r = want_r && p.scale_r.defined() && sum_dy_rmu.has_value();
  TORCH_CHECK(!train_x || (mean && invstd && sum_dy_xmu && count > 0),
              "fastres: bn_backward_elemt with sum_dy needs mean, invstd, sum_dy_xmu, count > 0");
  TORCH_CHECK(!train_r || (train_x && mean_r && invstd_r),
              "fastres: bn_backward_elemt with sum_dy_rmu needs sum_dy, mean_r and invstd_r");
  // Uninitialised: each kernel reads only the rows written below under the same flags (row 0
  // always; 1, 2 with train_x; 3 with want_r; 4, 5 with train_r).
  Tensor coef = at::empty({6, C}, p.scale.options());
  const double n = static_cast<double>(count);
  // sum_dy / count, shared by both norms' batch terms (train_r needs train_x).
  const Tensor sd = train_x ? channel_param(*sum_dy, C, p.acc, "sum_dy") / n : Tensor();
  // A training norm's batch-statistics terms, written into rows first + 1 (the input's
  // coefficient) and first + 2 (the constant): -scale * invstd^2 * sum_dy_?mu / count and
  // -scale * sum_dy / count - that * mean.
  const auto batch_terms = [&](int64_t first, const Tensor& scale, const at::Tensor& invstd_t,
                               const at::Tensor& mean_t, const at::Tensor& sum_dy_mu_t,
                               const char* invstd_name, const char* mean_name,
                               const char* sum_dy_mu_name) {
    const Tensor inv = channel_param(invstd_t, C, p.acc, invstd_name);
    const Tensor mu = channel_param(mean_t, C, p.acc, mean_name);
    const Tensor smu = channel_param(sum_dy_mu_t, C, p.acc, sum_dy_mu_name) / n;
    Tensor b = coef[first + 1];
    b.copy_(-scale * inv * inv * smu);
    coef[first + 2].copy_(-scale * sd - b * mu);
  };
  coef[0].copy_(p.scale);
  if (train_x) {
    batch_terms(0, p.scale, *invstd, *mean, *sum_dy_xmu, "invstd", "mean", "sum_dy_xmu");
  }
  if (want_r && p.scale_r.defined()) {
    coef[3].copy_(p.scale_r);
    if (train_r) {
      batch_terms(3, p.scale_r, *invstd_r, *mean_r, *sum_dy_rmu, "invstd_r", "mean_r",
                  "sum_dy_rmu");
    }
  } else if (want_r) {
    coef[3].fill_(1);
  }
  return {coef, train_x, train_r, want_r};
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

}  // namespace fastres
