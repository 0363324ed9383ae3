// Input checks and layout handling shared by the CPU kernels and the CUDA bindings of the
// fastres:: BatchNorm family (semantics: csrc/fastres.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace fastres {

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

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "fastres: expected a floating-point tensor, got ", x.scalar_type());
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  const auto opts = p.scale.options();
  Tensor coef = at::zeros({6, C}, opts);
  Tensor a = coef[0], b = coef[1], k = coef[2];
  a.copy_(p.scale);
  if (train_x) {
    const Tensor inv = channel_param(*invstd, C, p.acc, "invstd");
    const Tensor mu = channel_param(*mean, C, p.acc, "mean");
    const Tensor sd = channel_param(*sum_dy, C, p.acc, "sum_dy") / static_cast<double>(count);
    const Tensor sx =
        channel_param(*sum_dy_xmu, C, p.acc, "sum_dy_xmu") / static_cast<double>(count);
    b.copy_(-p.scale * inv * inv * sx);
    k.copy_(-p.scale * sd - b * mu);
  }
  if (want_r && p.scale_r.defined()) {
    Tensor ar = coef[3], br = coef[4], kr = coef[5];
    ar.copy_(p.scale_r);
    if (train_r) {
      const Tensor inv = channel_param(*invstd_r, C, p.acc, "invstd_r");
      const Tensor mu = channel_param(*mean_r, C, p.acc, "mean_r");
      const Tensor sd = channel_param(*sum_dy, C, p.acc, "sum_dy") / static_cast<double>(count);
      const Tensor sr =
          channel_param(*sum_dy_rmu, C, p.acc, "sum_dy_rmu") / static_cast<double>(count);
      br.copy_(-p.scale_r * inv * inv * sr);
      kr.copy_(-p.scale_r * sd - br * mu);
    }
  } else if (want_r) {
    coef[3].fill_(1);
  }
  return {coef, train_x, train_r};
}

}  // namespace fastres
