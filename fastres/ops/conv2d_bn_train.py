"""Custom op of the fused training convolution: `fastres::conv2d_bn_train`.

    y, mean, m2 = conv2d_bn_train(y_prev, w, padding=1, input_bn=InputBN(...))

computes `y = conv2d(relu(bn(y_prev)), w)` where `bn` is the previous layer's BatchNorm in
training mode, normalizing with its batch statistics, in one launch of the fused convolution
kernel (`kernels/conv2d_fused.py`): the normalization and ReLU happen in the kernel's input load
(the normalized activation is never written) and its epilogue accumulates the per-channel sum
and sum of squares of `y`, returned as the batch statistics (mean, M2) that the next layer's
BatchNorm needs. This is the MLPerf ResNet-50 pattern: a block stores only raw convolution
outputs, and its tail applies the last BatchNorm with the shortcut and the ReLU
(`fastres.ops.batchnorm.bn_train_act`).

Backward: the prologue's activation relu(bn(y_prev)) is recomputed (`fastres::bn_apply`), the
convolution's data and weight gradients come from PyTorch's `convolution_backward` (cuDNN on
CUDA), and the gradient through the BatchNorm with batch statistics from the extension's
`bn_backward_reduce` / `bn_backward_elemt` (its per-channel sums all-reduced over the process
group for SyncBN). Saved: the input, the weight and per-channel statistics.

The statistics come from the fp32 accumulator: each tile's sum and M2 about its own mean,
merged with Chan's formula (no one-pass sum of squares, whose cancellation loses the variance
of channels with a large mean, e.g. a conv over post-ReLU inputs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import batchnorm as bn_ops
from .conv2d_fused import (
    _allocate_out,
    _check_inputs,
    _check_vector,
    _launch,
    _output_size,
    _pair,
    _prologue_reference,
    stats_dtype,
)


class InputBN(NamedTuple):
    """The previous layer's training-mode BatchNorm, applied with ReLU in the input load.

    mean, m2: [C_in] fp32 batch statistics of the input over `count` values per channel (every
    process's for SyncBN); weight, bias: the BN's affine parameters [C_in]; group: the SyncBN
    process-group name (`batchnorm.sync_group_name`), "" for none.
    """

    mean: Tensor
    m2: Tensor
    count: int
    weight: Tensor
    bias: Tensor
    eps: float
    group: str = ""


def _require_extension() -> None:
    """The input BatchNorm runs the extension's ops: say so where it is missing."""
    if bn_ops.EXTENSION_ERROR is not None:
        raise RuntimeError(f"conv2d_bn_train needs {bn_ops.EXTENSION_ERROR}")


@torch.library.custom_op("fastres::conv2d_bn_train", mutates_args=())
def _conv2d_bn_train_op(
    x: Tensor,
    weight: Tensor,
    in_mean: Tensor | None,
    in_m2: Tensor | None,
    in_weight: Tensor | None,
    in_bias: Tensor | None,
    in_eps: float,
    in_count: int,
    in_group: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_pool: int,
    input_add: Tensor | None,
    groups: int,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    scale = shift = None
    if in_mean is not None:
        c_in = x.shape[1]
        for name, t in (("mean", in_mean), ("m2", in_m2), ("weight", in_weight), ("bias", in_bias)):
            if t is None:
                raise ValueError(f"input_bn needs its {name}")
            _check_vector(t, f"input_bn.{name}", c_in, x)
        if input_pool != 1 or input_add is not None:
            raise ValueError("input_bn cannot be combined with input_pool or input_add")
        _require_extension()
        scale, shift, _ = bn_ops.bn_finalize(in_mean, in_m2, in_count, in_weight, in_bias, in_eps)
    sizes = _check_inputs(
        x, weight, None, None, None, None, scale, shift, stride, padding, dilation,
        scale is not None, input_pool, input_add, groups,
    )  # fmt: skip
    out = _allocate_out(x, weight, sizes)
    mean, m2 = _launch(
        x, weight, None, None, None, None, scale, shift, out, True,
        stride, padding, dilation, scale is not None, input_pool, False, allow_tf32,
        input_add, groups,
    )  # fmt: skip
    return out, mean, m2


@_conv2d_bn_train_op.register_fake
def _(
    x, weight, in_mean, in_m2, in_weight, in_bias, in_eps, in_count, in_group, stride, padding,
    dilation, input_pool, input_add, groups, allow_tf32,
):  # fmt: skip
    sizes = _output_size(x, weight, stride, padding, dilation, input_pool)
    c_out = weight.shape[0]
    return (
        _allocate_out(x, weight, sizes),
        x.new_empty(c_out, dtype=stats_dtype(x)),
        x.new_empty(c_out, dtype=stats_dtype(x)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, in_mean, in_m2, in_weight, in_bias, in_eps, in_count, in_group = inputs[:9]
    stride, padding, dilation, input_pool, input_add, groups = inputs[9:15]
    _, mean, m2 = output
    ctx.mark_non_differentiable(mean, m2)
    ctx.save_for_backward(x, weight, in_mean, in_m2, in_weight, in_bias, input_add)
    ctx.in_eps, ctx.in_count, ctx.in_group = in_eps, in_count, in_group
    ctx.conv_args = (stride, padding, dilation)
    ctx.input_pool, ctx.groups = input_pool, groups


def _backward(ctx, grad_y: Tensor, _grad_mean, _grad_m2):
    x, weight, in_mean, in_m2, in_weight, in_bias, input_add = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads: list[Tensor | None] = [None] * 16
    needs_input = needs[0] or needs[4] or needs[5] or needs[13]
    if not (needs_input or needs[1]):
        return tuple(grads)
    if in_mean is not None:
        scale, shift, invstd = bn_ops.bn_finalize(
            in_mean, in_m2, ctx.in_count, in_weight, in_bias, ctx.in_eps
        )
        conv_input = bn_ops.bn_apply(x, scale, shift, relu=True)
    else:
        conv_input = _prologue_reference(x, None, None, False, ctx.input_pool, input_add)
    stride, padding, dilation = ctx.conv_args
    grad_input, grads[1], _ = torch.ops.aten.convolution_backward(
        grad_y.to(x.dtype), conv_input, weight, None, stride, padding, dilation,
        False, [0, 0], ctx.groups, [needs_input, needs[1], False],
    )  # fmt: skip
    if not needs_input:
        return tuple(grads)
    if input_add is not None:
        grads[13] = grad_input if needs[13] else None
    if ctx.input_pool > 1:
        pool = [ctx.input_pool] * 2
        grad_input = torch.ops.aten.avg_pool2d_backward(
            grad_input, x, pool, pool, [0, 0], True, False, None
        )
    if in_mean is None:
        grads[0] = grad_input
        return tuple(grads)
    sums = bn_ops.bn_backward_reduce(
        grad_input, x, scale, shift, None, None, None, True, in_mean, None
    )
    # The affine parameters' gradients are this process's share (as nn.SyncBatchNorm's: DDP
    # reduces them); the input gradient's batch-statistics terms are over every process's batch.
    local_dy, local_dy_xmu, _ = sums
    if ctx.in_group:
        sums = bn_ops.all_reduce_sums(list(sums), ctx.in_group)
    sum_dy, sum_dy_xmu, _ = sums
    if needs[0]:
        grads[0], _ = bn_ops.bn_backward_elemt(
            grad_input, x, scale, shift, None, None, None, True, in_mean, invstd, sum_dy,
            sum_dy_xmu, None, None, None, ctx.in_count, False,
        )  # fmt: skip
    grads[4] = (local_dy_xmu * invstd).to(in_weight.dtype) if needs[4] else None
    grads[5] = local_dy.to(in_bias.dtype) if needs[5] else None
    return tuple(grads)


torch.library.register_autograd("fastres::conv2d_bn_train", _backward, setup_context=_setup_context)


def conv2d_bn_train(
    x: Tensor,
    weight: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    input_bn: InputBN | None = None,
    input_pool: int = 1,
    input_add: Tensor | None = None,
    groups: int = 1,
    allow_tf32: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A training-mode convolution: its raw output and that output's batch statistics.

    Args:
        x: [N, C_in, H, W] float32 / float16 / bfloat16, any strides: the previous layer's raw
            convolution output when `input_bn` is given, else an activation.
        weight: [C_out, C_in / groups, KH, KW] in x's dtype (`arrange_weight` is fastest).
        stride, padding, dilation, groups: of the convolution.
        input_bn: the previous layer's BatchNorm (batch statistics) + ReLU, applied to x in the
            input load; differentiable in x, input_bn.weight and input_bn.bias (the statistics
            are constants to autograd: their gradient terms are in the BN backward formula).
        input_pool: k > 1 average-pools x k x k first (ceil_mode, count_include_pad=False; the
            avg_down shortcut). Not with input_bn.
        input_add: [N, C_in, H, W] added to x in the input load (Res2Net's hierarchical add).
            Not with input_bn.
        allow_tf32: as `conv2d_fused`.

    Returns:
        y [N, C_out, OH, OW] channels_last in x's dtype (no bias, no activation), and its
        per-channel mean [C_out] and M2 [C_out] (fp32, this process's batch, from the fp32
        accumulator), not differentiable.
    """
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    bn = input_bn or InputBN(None, None, 0, None, None, 0.0, "")
    return torch.ops.fastres.conv2d_bn_train(
        x, weight, bn.mean, bn.m2, bn.weight, bn.bias, float(bn.eps), int(bn.count), bn.group,
        _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
        int(input_pool), input_add, int(groups), allow_tf32,
    )  # fmt: skip
