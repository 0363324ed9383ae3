"""Pure-torch reference of the fused BatchNorm ops (`fastres::bn_*`), the tests' gold.

Same arguments and results as the ops (see `fastres.ops.batchnorm`). Per-channel results are
float64 for float64 inputs and float32 otherwise; element-wise results have the input's dtype.
x is [N, C, *]; the reductions run over every dimension but C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .precision import accumulator_dtype


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel [C] vector shaped to broadcast against x [N, C, *]."""
    return v.to(accumulator_dtype(x.dtype)).reshape(1, -1, *([1] * (x.dim() - 2)))


def _dims(x: Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean [C] and M2 = sum (x - mean)^2 [C] of x [N, C, *]."""
    xa = x.to(accumulator_dtype(x.dtype))
    mean = xa.mean(_dims(x))
    m2 = ((xa - _bcast(mean, x)) ** 2).sum(_dims(x))
    return mean, m2


def bn_finalize(
    mean: Tensor,
    m2: Tensor,
    count: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """scale = weight * invstd, shift = bias - mean * scale, invstd = 1 / sqrt(m2 / count + eps)."""
    acc = accumulator_dtype(mean.dtype)
    mean, m2 = mean.to(acc), m2.to(acc)
    invstd = torch.rsqrt(m2 / count + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -mean * scale if bias is None else bias.to(acc) - mean * scale
    return scale, shift, invstd


def _z(x, scale, shift, residual, scale_r, shift_r) -> Tensor:
    z = x.to(accumulator_dtype(x.dtype)) * _bcast(scale, x) + _bcast(shift, x)
    if residual is not None:
        r = residual.to(accumulator_dtype(x.dtype))
        z = z + (r if scale_r is None else r * _bcast(scale_r, x) + _bcast(shift_r, x))
    return z


def bn_apply(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None,
    scale_r: Tensor | None,
    shift_r: Tensor | None,
    relu: bool,
) -> Tensor:
    """act(x * scale + shift [+ residual | + residual * scale_r + shift_r]), in x's dtype."""
    z = _z(x, scale, shift, residual, scale_r, shift_r)
    return (torch.relu(z) if relu else z).to(x.dtype)


def _masked(grad_out, x, scale, shift, residual, scale_r, shift_r, relu) -> Tensor:
    g = grad_out.to(accumulator_dtype(x.dtype))
    if relu:
        g = torch.where(_z(x, scale, shift, residual, scale_r, shift_r) > 0, g, 0.0)
    return g


def bn_backward_reduce(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None,
    scale_r: Tensor | None,
    shift_r: Tensor | None,
    relu: bool,
    mean: Tensor | None,
    mean_r: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """sum g, sum g (x - mean), sum g (r - mean_r) per channel, g = grad_out * ReLU mask.

    A missing mean counts as 0; sum_dy_rmu is empty unless residual and scale_r are given.
    """
    g = _masked(grad_out, x, scale, shift, residual, scale_r, shift_r, relu)
    xa = x.to(accumulator_dtype(x.dtype))
    xmu = xa if mean is None else xa - _bcast(mean, x)
    sum_dy = g.sum(_dims(x))
    sum_dy_xmu = (g * xmu).sum(_dims(x))
    if residual is not None and scale_r is not None:
        ra = residual.to(accumulator_dtype(x.dtype))
        rmu = ra if mean_r is None else ra - _bcast(mean_r, x)
        sum_dy_rmu = (g * rmu).sum(_dims(x))
    else:
        sum_dy_rmu = sum_dy.new_empty(0)
    return sum_dy, sum_dy_xmu, sum_dy_rmu


def bn_backward_elemt(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None,
    scale_r: Tensor | None,
    shift_r: Tensor | None,
    relu: bool,
    mean: Tensor | None,
    invstd: Tensor | None,
    sum_dy: Tensor | None,
    sum_dy_xmu: Tensor | None,
    mean_r: Tensor | None,
    invstd_r: Tensor | None,
    sum_dy_rmu: Tensor | None,
    count: int,
    grad_residual: bool,
) -> tuple[Tensor, Tensor]:
    """Input gradients of bn_apply, and of training-mode BNs in front of it.

    grad_x = scale * (g - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count) when
    sum_dy is given (x came from a training-mode BN), else scale * g. grad_r (when
    grad_residual and a residual is given, else empty): g without scale_r; the same formula
    with the r-terms when sum_dy_rmu is given; else scale_r * g.
    """
    g = _masked(grad_out, x, scale, shift, residual, scale_r, shift_r, relu)

    def grad_of(t, s, mu, inv, s_dy_tmu):
        if s_dy_tmu is None:
            return g * _bcast(s, t)
        centered = t.to(accumulator_dtype(t.dtype)) - _bcast(mu, t)
        proj = centered * _bcast(inv * inv * s_dy_tmu / count, t)
        return _bcast(s, t) * (g - _bcast(sum_dy / count, t) - proj)

    grad_x = grad_of(x, scale, mean, invstd, sum_dy_xmu if sum_dy is not None else None)
    if not grad_residual or residual is None:
        return grad_x.to(x.dtype), x.new_empty(0)
    grad_r = g if scale_r is None else grad_of(residual, scale_r, mean_r, invstd_r, sum_dy_rmu)
    return grad_x.to(x.dtype), grad_r.to(residual.dtype)


def bn_finalize_update(
    mean: Tensor,
    m2: Tensor,
    count: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`bn_finalize`, and the running statistics updated in place as nn.BatchNorm2d's training
    forward does: factor = momentum (None: 1 / num_batches_tracked after its increment),
    running = (1 - factor) running + factor * (mean | M2 / (count - 1))."""
    acc = accumulator_dtype(mean.dtype)
    factor = momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / num_batches_tracked.item()
    for running, value in ((running_mean, mean.to(acc)), (running_var, m2.to(acc) / (count - 1))):
        running.copy_((1 - factor) * running.to(acc) + factor * value)
    return bn_finalize(mean, m2, count, weight, bias, eps)


def bn_backward(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None,
    scale_r: Tensor | None,
    shift_r: Tensor | None,
    relu: bool,
    mean: Tensor,
    invstd: Tensor,
    mean_r: Tensor | None,
    invstd_r: Tensor | None,
    count: int,
    grad_residual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`bn_backward_reduce`, then `bn_backward_elemt` with the batch terms of both norms where
    count > 0 (0: norms on running statistics), and the affine gradients: grad_weight =
    sum g (x - mean) * invstd, grad_bias = sum g, and those of r's norm ([0] without scale_r)."""
    sums = bn_backward_reduce(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean,
                              mean_r)  # fmt: skip
    sum_dy, sum_dy_xmu, sum_dy_rmu = sums
    train = count > 0
    grad_x, grad_r = bn_backward_elemt(
        grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, invstd,
        sum_dy if train else None, sum_dy_xmu, mean_r, invstd_r,
        sum_dy_rmu if train and scale_r is not None else None, max(count, 1), grad_residual,
    )  # fmt: skip
    acc = sum_dy.dtype
    grad_w_r = sum_dy_rmu * invstd_r.to(acc) if scale_r is not None else sum_dy.new_empty(0)
    grad_b_r = sum_dy if scale_r is not None else sum_dy.new_empty(0)
    return grad_x, grad_r, sum_dy_xmu * invstd.to(acc), sum_dy, grad_w_r, grad_b_r


def add_relu_(y: Tensor, r: Tensor) -> Tensor:
    """y = ReLU(y + r) in place (in y's precision, rounded once)."""
    acc = accumulator_dtype(y.dtype)
    return y.copy_(torch.relu(y.to(acc) + r.to(acc)))
