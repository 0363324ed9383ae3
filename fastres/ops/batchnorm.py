"""The fused BatchNorm ops of the extension `fastres._C`: `fastres::bn_*` custom ops.

The kernels (CPU always, CUDA where built) are registered in C++ (`csrc/`); this module loads
the extension, adds the fake implementations (torch.compile) and the autograd formula of
`bn_apply`, and offers typed Python wrappers. The pure-torch reference with the same
signatures is `fastres.ops.batchnorm_reference`.

Ops (x [N, C, *], NCHW or channels_last; per-channel tensors [C] in float32, float64 for float64
inputs):

- `bn_stats(x) -> (mean, m2)`: mean and M2 = sum (x - mean)^2 over N, H, W. (count, mean, M2)
  of several processes merge with Chan's formula (`combine_stats`), which is how SyncBN
  would all-gather them.
- `bn_finalize(mean, m2, count, weight, bias, eps) -> (scale, shift, invstd)`.
- `bn_apply(x, scale, shift, residual, scale_r, shift_r, relu)`: act(x * scale + shift
  [+ residual | + residual * scale_r + shift_r]).
- `bn_backward_reduce` / `bn_backward_elemt`: the two passes of the backward of `bn_apply` and
  of training-mode BatchNorms in front of it (formulas in the reference).
"""

from __future__ import annotations

import torch
from torch import Tensor

EXTENSION_ERROR: str | None
try:
    from .. import _C  # noqa: F401  (loading it registers the fastres:: ops)

    EXTENSION_ERROR = None
except (ImportError, OSError) as exc:  # not built (FASTRES_BUILD_EXT=0), or built for another torch
    EXTENSION_ERROR = f"the C++ extension fastres._C is not built or does not load ({exc})"


def cuda_kernels_built() -> bool:
    """Whether the extension has CUDA kernels (it was built against a CUDA torch with nvcc)."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastres::bn_apply", "CUDA")


def accumulate_dtype(x: Tensor) -> torch.dtype:
    """The dtype the ops accumulate and return statistics in: fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout the kernels produce for x: channels_last where x is, else contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


def _channels(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape[1], dtype=dtype)


def _register_fakes() -> None:
    @torch.library.register_fake("fastres::bn_stats")
    def _(x):
        return _channels(x, accumulate_dtype(x)), _channels(x, accumulate_dtype(x))

    @torch.library.register_fake("fastres::bn_finalize")
    def _(mean, m2, count, weight, bias, eps):
        return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("fastres::bn_apply")
    def _(x, scale, shift, residual, scale_r, shift_r, relu):
        return torch.empty_like(x, memory_format=memory_format_of(x))

    @torch.library.register_fake("fastres::bn_backward_reduce")
    def _(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, mean_r):
        c = x.shape[1]
        rmu = c if residual is not None and scale_r is not None else 0
        acc = accumulate_dtype(x)
        return x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(rmu, dtype=acc)

    @torch.library.register_fake("fastres::bn_backward_elemt")
    def _(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, invstd, sum_dy,
          sum_dy_xmu, mean_r, invstd_r, sum_dy_rmu, count, grad_residual):  # fmt: skip
        grad_x = torch.empty_like(x, memory_format=memory_format_of(x))
        if grad_residual and residual is not None:
            return grad_x, torch.empty_like(x, memory_format=memory_format_of(x))
        return grad_x, x.new_empty(0)

    def apply_setup_context(ctx, inputs, output):
        x, scale, shift, residual, scale_r, shift_r, relu = inputs
        ctx.save_for_backward(x, scale, shift, residual, scale_r, shift_r)
        ctx.relu = relu

    def apply_backward(ctx, grad):
        x, scale, shift, residual, scale_r, shift_r = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad_scale = grad_shift = grad_r = grad_scale_r = grad_shift_r = None
        if need[1] or need[2] or need[4] or need[5]:
            sum_dy, sum_dy_x, sum_dy_r = torch.ops.fastres.bn_backward_reduce(
                grad, x, scale, shift, residual, scale_r, shift_r, ctx.relu, None, None
            )
            grad_scale, grad_shift = sum_dy_x.to(scale.dtype), sum_dy.to(shift.dtype)
            if scale_r is not None:
                grad_scale_r, grad_shift_r = sum_dy_r.to(scale_r.dtype), sum_dy.to(shift_r.dtype)
        if need[0] or need[3]:
            grad_x, grad_r = torch.ops.fastres.bn_backward_elemt(
                grad, x, scale, shift, residual, scale_r, shift_r, ctx.relu,
                None, None, None, None, None, None, None, 1, bool(need[3]),
            )  # fmt: skip
            grad_r = grad_r if need[3] else None
        return grad_x, grad_scale, grad_shift, grad_r, grad_scale_r, grad_shift_r, None

    torch.library.register_autograd(
        "fastres::bn_apply", apply_backward, setup_context=apply_setup_context
    )


if EXTENSION_ERROR is None:
    _register_fakes()


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean [C] and M2 [C] of x [N, C, *] (count = x.numel() / C)."""
    return torch.ops.fastres.bn_stats(x)


def combine_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merges per-process statistics (e.g. all-gathered for SyncBN) with Chan's formula.

    Args:
        count: [P] values per channel in each part; mean, m2: [P, C] `bn_stats` of each part.

    Returns:
        The total count (0-d), mean [C] and M2 [C] of the union.
    """
    count = count.to(mean.dtype)
    total = count.sum()
    weights = (count / total).unsqueeze(1)
    merged_mean = (weights * mean).sum(0)
    merged_m2 = m2.sum(0) + (count.unsqueeze(1) * (mean - merged_mean) ** 2).sum(0)
    return total, merged_mean, merged_m2


def bn_finalize(
    mean: Tensor,
    m2: Tensor,
    count: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch statistics and BN weight / bias [C] -> scale, shift, invstd [C]."""
    return torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, eps)


def bn_apply(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    scale_r: Tensor | None = None,
    shift_r: Tensor | None = None,
    relu: bool = True,
) -> Tensor:
    """act(x * scale + shift [+ residual | + residual * scale_r + shift_r]) [N, C, *], x's dtype.

    Differentiable in x, scale, shift, residual, scale_r and shift_r.
    """
    return torch.ops.fastres.bn_apply(x, scale, shift, residual, scale_r, shift_r, relu)


def bn_backward_reduce(*args) -> tuple[Tensor, Tensor, Tensor]:
    """`fastres::bn_backward_reduce`; see `batchnorm_reference.bn_backward_reduce`."""
    return torch.ops.fastres.bn_backward_reduce(*args)


def bn_backward_elemt(*args) -> tuple[Tensor, Tensor]:
    """`fastres::bn_backward_elemt`; see `batchnorm_reference.bn_backward_elemt`."""
    return torch.ops.fastres.bn_backward_elemt(*args)


def _train_act_impl(y, weight, bias, eps, residual, y_d, weight_d, bias_d, eps_d, relu):
    count = y.numel() // y.shape[1]
    mean, m2 = torch.ops.fastres.bn_stats(y)
    scale, shift, _ = torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, eps)
    if y_d is None:
        out = torch.ops.fastres.bn_apply(y, scale, shift, residual, None, None, relu)
        return out, mean, m2, mean.new_empty(0), m2.new_empty(0)
    mean_d, m2_d = torch.ops.fastres.bn_stats(y_d)
    scale_d, shift_d, _ = torch.ops.fastres.bn_finalize(
        mean_d, m2_d, count, weight_d, bias_d, eps_d
    )
    out = torch.ops.fastres.bn_apply(y, scale, shift, y_d, scale_d, shift_d, relu)
    return out, mean, m2, mean_d, m2_d


def _train_act_fake(y, weight, bias, eps, residual, y_d, weight_d, bias_d, eps_d, relu):
    c, acc = y.shape[1], accumulate_dtype(y)
    stats_d = c if y_d is not None else 0
    return (
        torch.empty_like(y, memory_format=memory_format_of(y)),
        y.new_empty(c, dtype=acc),
        y.new_empty(c, dtype=acc),
        y.new_empty(stats_d, dtype=acc),
        y.new_empty(stats_d, dtype=acc),
    )


def _train_act_setup_context(ctx, inputs, output):
    y, weight, bias, eps, residual, y_d, weight_d, bias_d, eps_d, relu = inputs
    _, mean, m2, mean_d, m2_d = output
    two_bn = y_d is not None
    ctx.save_for_backward(
        y, weight, bias, y_d if two_bn else residual, weight_d, bias_d, mean, m2, mean_d, m2_d
    )
    ctx.eps, ctx.eps_d, ctx.relu, ctx.two_bn = eps, eps_d, relu, two_bn
    ctx.mark_non_differentiable(mean, m2, mean_d, m2_d)


def _train_act_backward(ctx, grad_out, *unused):
    y, weight, bias, r, weight_d, bias_d, mean, m2, mean_d, m2_d = ctx.saved_tensors
    need = ctx.needs_input_grad
    count = y.numel() // y.shape[1]
    # scale / shift / invstd are [C] vectors: recomputing them is cheaper than saving them.
    scale, shift, invstd = torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, ctx.eps)
    scale_d = shift_d = invstd_d = None
    if ctx.two_bn:
        scale_d, shift_d, invstd_d = torch.ops.fastres.bn_finalize(
            mean_d, m2_d, count, weight_d, bias_d, ctx.eps_d
        )
    mu_d = mean_d if ctx.two_bn else None
    grad_out = grad_out.to(y.dtype)
    sum_dy, sum_dy_xmu, sum_dy_rmu = torch.ops.fastres.bn_backward_reduce(
        grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, mu_d
    )
    want_r = r is not None and bool(need[4] or need[5])
    grad_y, grad_r = torch.ops.fastres.bn_backward_elemt(
        grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, invstd, sum_dy,
        sum_dy_xmu, mu_d, invstd_d, sum_dy_rmu if ctx.two_bn else None, count, want_r,
    )  # fmt: skip
    grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if need[1] else None
    grad_b = sum_dy.to(bias.dtype) if need[2] else None
    grad_residual = grad_r if want_r and not ctx.two_bn else None
    grad_y_d = grad_r if want_r and ctx.two_bn else None
    grad_w_d = grad_b_d = None
    if ctx.two_bn:
        grad_w_d = (sum_dy_rmu * invstd_d).to(weight_d.dtype) if need[6] else None
        grad_b_d = sum_dy.to(bias_d.dtype) if need[7] else None
    return grad_y, grad_w, grad_b, None, grad_residual, grad_y_d, grad_w_d, grad_b_d, None, None


if EXTENSION_ERROR is None:
    # A composite op of the kernels above, so that torch.compile sees one opaque op with a
    # fake implementation (dynamo could not trace the equivalent hand-written
    # autograd.Function with optional inputs); register_autograd wraps it in an
    # autograd.Function.
    _train_act_op = torch.library.custom_op(
        "fastres::bn_train_act",
        _train_act_impl,
        mutates_args=(),
        schema=(
            "(Tensor y, Tensor weight, Tensor bias, float eps, Tensor? residual, Tensor? y_d,"
            " Tensor? weight_d, Tensor? bias_d, float eps_d, bool relu)"
            " -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
        ),
    )
    _train_act_op.register_fake(_train_act_fake)
    _train_act_op.register_autograd(_train_act_backward, setup_context=_train_act_setup_context)


def bn_train_act(
    y: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    residual: Tensor | None = None,
    y_d: Tensor | None = None,
    weight_d: Tensor | None = None,
    bias_d: Tensor | None = None,
    eps_d: float = 1e-5,
    relu: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """act(BN(y) [+ residual | + BN_d(y_d)]) with batch statistics (training-mode BN).

    Args:
        y: [N, C, H, W] conv output; weight, bias: [C] BN affine parameters.
        residual: [N, C, H, W] shortcut added as is, or None.
        y_d, weight_d, bias_d: the downsample conv output and its BN's parameters (the
            two-BN tail), or None.

    Returns:
        out [N, C, H, W] and the statistics (mean, m2) [C] of y and of y_d (empty without
        y_d), for the running-statistics update, which the caller does.
    """
    return torch.ops.fastres.bn_train_act(
        y, weight, bias, eps, residual, y_d, weight_d, bias_d, eps_d, relu
    )
