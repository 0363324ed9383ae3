"""Custom op of the fused training convolution: `fastres::conv2d_bn_train`.

    y, mean, m2 = conv2d_bn_train(y_prev, w, padding=1, input_bn=InputBN(...))

computes `y = conv2d(relu(bn(y_prev)), w)` where `bn` is the previous layer's BatchNorm in
training mode, normalizing with its batch statistics, in one launch of the fused convolution
kernel (`kernels/conv2d_fused.py`): the normalization and ReLU happen in the kernel's input load
(the normalized activation is never written) and its epilogue accumulates the per-channel
statistics of `y`, returned as the batch statistics (mean, M2) that the next layer's BatchNorm
needs. This is the MLPerf ResNet-50 pattern: a block stores only raw convolution
outputs, and its tail applies the last BatchNorm with the shortcut and the ReLU
(`fastres.ops.batchnorm.bn_train_act`).

Backward: the prologue's activation relu(bn(y_prev)) is recomputed (`fastres::bn_apply`), the
convolution's data and weight gradients come from PyTorch's `convolution_backward` (cuDNN on
CUDA), and the gradient through the BatchNorm with batch statistics from the extension's
`bn_backward` (for SyncBN `bn_backward_reduce` / `bn_backward_elemt`, the per-channel sums
all-reduced over the process group between them). Saved: the input, the weight and
per-channel statistics.

The input BatchNorm's scale / shift / invstd are `bn_finalize`'d from its statistics in the op,
unless the caller has them already (the triton backend finalizes each BatchNorm once, in the
op that updates its running statistics, `batchnorm.batch_normalized`).

The statistics come from the fp32 accumulator: each tile's sum and M2 about its own mean,
merged with Chan's formula (no one-pass sum of squares, whose cancellation loses the variance
of channels with a large mean, e.g. a conv over post-ReLU inputs).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .. import extension
from . import batchnorm as bn_ops
from .conv2d_fused import (
    ConvArgs,
    PreparedConv,
    apply_function,
    as_pair,
    call_op,
    check_channel_vector,
    dispatch_free,
    eager_autograd,
    layout_key,
    merge_finalize_launch,
    prepare,
    prologue_reference,
    save_args,
    saved_args,
)
from .precision import cast


class InputBN(NamedTuple):
    """The previous layer's training-mode BatchNorm, applied with ReLU in the input load.

    mean, m2: [C_in] fp32 batch statistics of the input over `count` values per channel (every
    process's for SyncBN); weight, bias: the BN's affine parameters [C_in]; group: the SyncBN
    process-group name (`batchnorm.sync_group_name`), "" for none; scale, shift, invstd: their
    `bn_finalize`, when the caller has it (else the op finalizes: one op forward, one backward).
    """

    mean: Tensor
    m2: Tensor
    count: int
    weight: Tensor
    bias: Tensor
    eps: float
    group: str = ""
    scale: Tensor | None = None
    shift: Tensor | None = None
    invstd: Tensor | None = None


class OutputBN(NamedTuple):
    """The training-mode BatchNorm of the convolution's output, finalized from its batch
    statistics in the launch that merges them (`kernels/merge_tile_stats.py`:
    `merge_finalize_kernel`) rather than by a `bn_finalize_update` op after it.

    weight, bias: its affine parameters [C_out]; running_mean, running_var,
    num_batches_tracked: its running statistics, updated in place with factor `momentum` as
    nn.BatchNorm2d's training forward does, or all None for a BN that tracks none. `of` makes
    one from a module where the merge can finalize it.
    """

    weight: Tensor
    bias: Tensor
    eps: float
    momentum: float | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    @classmethod
    def of(cls, bn: torch.nn.Module) -> OutputBN | None:
        """bn's fields, or None where its finalize stays an op of its own: SyncBN across
        processes (the statistics are gathered between the merge and the finalize) and the
        cumulative average (momentum None: its factor reads num_batches_tracked, which the
        launch increments)."""
        if bn_ops.sync_group_name(bn):
            return None
        if not bn_ops.tracks_running_stats(bn):
            return cls(bn.weight, bn.bias, bn.eps, None, None, None, None)
        if bn.momentum is None:
            return None
        return cls(
            bn.weight, bn.bias, bn.eps, bn.momentum, bn.running_mean, bn.running_var,
            bn.num_batches_tracked,
        )  # fmt: skip

    def finalize(self, mean: Tensor, m2: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, invstd) of the statistics by the extension's ops, the running
        statistics updated: what the merge's launch does, where it cannot run."""
        with torch.no_grad():
            if self.running_mean is None:
                return bn_ops.bn_finalize(mean, m2, count, self.weight, self.bias, self.eps)
            return bn_ops.bn_finalize_update(
                mean, m2, count, self.weight, self.bias, self.eps, self.running_mean,
                self.running_var, self.num_batches_tracked, self.momentum,
            )  # fmt: skip


# TrainArgs' input-BatchNorm fields (`in_*`) of a convolution without one.
NO_INPUT_BN = (None, None, 0, None, None, 0.0, "", None, None, None)


class TrainArgs(NamedTuple):
    """The custom op's arguments, in its order: the convolution's (ConvArgs' order), then the
    input BatchNorm's fields (`InputBN`) prefixed `in_`; autograd binds its inputs by name."""

    x: Tensor
    weight: Tensor
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    allow_tf32: bool
    input_pool: int
    input_add: Tensor | None
    in_mean: Tensor | None
    in_m2: Tensor | None
    in_count: int
    in_weight: Tensor | None
    in_bias: Tensor | None
    in_eps: float
    in_group: str
    in_scale: Tensor | None = None
    in_shift: Tensor | None = None
    in_invstd: Tensor | None = None

    def conv_args(self, input_scale: Tensor | None, input_shift: Tensor | None) -> ConvArgs:
        """The fused convolution that runs it, with the input BN folded to a scale and shift."""
        return ConvArgs(
            self.x,
            self.weight,
            bias=None,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            allow_tf32=self.allow_tf32,
            input_scale=input_scale,
            input_shift=input_shift,
            input_relu=input_scale is not None,
            input_pool=self.input_pool,
            input_add=self.input_add,
        )

    def input_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift, invstd) of the input BatchNorm: given, or finalized here."""
        if self.in_scale is not None:
            return self.in_scale, self.in_shift, self.in_invstd
        return bn_ops.bn_finalize(
            self.in_mean, self.in_m2, self.in_count, self.in_weight, self.in_bias, self.in_eps
        )


def conv2d_bn_train_body(
    x: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    allow_tf32: bool,
    input_pool: int,
    input_add: Tensor | None,
    in_mean: Tensor | None,
    in_m2: Tensor | None,
    in_count: int,
    in_weight: Tensor | None,
    in_bias: Tensor | None,
    in_eps: float,
    in_group: str,
    in_scale: Tensor | None = None,
    in_shift: Tensor | None = None,
    in_invstd: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    args = TrainArgs(
        x, weight, stride, padding, dilation, groups, allow_tf32, input_pool, input_add, in_mean,
        in_m2, in_count, in_weight, in_bias, in_eps, in_group, in_scale, in_shift, in_invstd,
    )  # fmt: skip
    conv, prepared, out = _prepared(args)
    mean, m2 = prepared.launch(conv, out)
    return out, mean, m2


def _prepared(
    args: TrainArgs, input_bn_checked: bool = False
) -> tuple[ConvArgs, PreparedConv, Tensor]:
    """args' convolution (its input BN folded to a scale and shift), its prepared launch and
    a new output."""
    scale = shift = None
    if args.in_mean is not None:
        if not input_bn_checked:
            _check_input_bn(args)
        extension.require("conv2d_bn_train with input_bn")  # the BN runs the extension's ops
        scale, shift, _ = args.input_coefficients()
    conv = args.conv_args(scale, shift)
    prepared = prepare(conv, stats=True)
    return conv, prepared, prepared.allocate_output(args.x)


def finalizing_body(
    output_bn: OutputBN,
    inputs: tuple,
    input_bn_checked: bool = False,
    slots: tuple[int, int] = (1, 1),
) -> tuple[Tensor, ...]:
    """`conv2d_bn_train_body`, and output_bn finalized (its running statistics updated) in the
    statistics' merge launch: (y, mean, m2, scale, shift, invstd).

    Args:
        input_bn_checked: the input BN is a previous `finalizing_body`'s output BN, with its
            outputs (nothing to check).
        slots: (slot, width): y's channels are chunks in padded slots of `slot` channels,
            `width` of them real (Res2Net's, see `merge_finalize_kernel`), output_bn the real
            channels' BatchNorm, which the caller has checked (`output_bn_fits`); the
            statistics and coefficients come out padded.
    """
    conv, prepared, out = _prepared(TrainArgs(*inputs), input_bn_checked)
    count = _checked_count(out)
    if prepared.conv is None or (
        slots == (1, 1) and not output_bn_fits(output_bn, prepared.out_shape[1], out)
    ):
        mean, m2 = prepared.launch(conv, out)
        return out, mean, m2, *output_bn.finalize(mean, m2, count)
    tiles = prepared.launch_tiles(conv, out)
    mean, m2, scale, shift, invstd = prepared.channels(out, 5).unbind()
    momentum = None if output_bn.running_mean is None else output_bn.momentum
    launch = merge_finalize_launch(
        *prepared.merge_args, prepared.acc, output_bn.eps, momentum, *slots
    )
    launch(
        *tiles, output_bn.weight, output_bn.bias, mean, m2, scale, shift, invstd,
        output_bn.running_mean, output_bn.running_var, output_bn.num_batches_tracked,
    )  # fmt: skip
    return out, mean, m2, scale, shift, invstd


def _checked_count(y: Tensor) -> int:
    """Values per channel of y's batch statistics; raises for one, as nn.BatchNorm2d does."""
    count = y.shape[0] * y.shape[2] * y.shape[3]
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {y.size()}"
        )
    return count


# The keys of the BatchNorms the merge's launch can finalize (`output_bn_fits`). Cleared
# when full, as the prepared launches are.
_FITTING_OUTPUT_BN: set[tuple] = set()


def output_bn_fits(bn: OutputBN, channels: int, y: Tensor) -> bool:
    """Whether `merge_finalize_kernel` reads and writes bn's tensors as they are: contiguous
    [channels] on y's device (y: the output, or a tensor of its device and dtype), floating
    (float64 running statistics for float64 statistics), num_batches_tracked one int64. Else
    the extension's finalize runs (and raises for what it cannot take)."""
    key = (channels, y.device, y.dtype, bn.momentum is None, *map(layout_key, bn[:2]),
           *map(layout_key, bn[4:]))  # fmt: skip
    if key in _FITTING_OUTPUT_BN:
        return True
    vectors = [bn.weight, bn.bias]
    if bn.running_mean is not None:
        rm, rv, nbt = bn[4:]
        if (
            bn.momentum is None
            or nbt is None
            or not (nbt.numel() == 1 and nbt.dtype == torch.int64 and nbt.device == y.device)
            or rv is None
            or rv.dtype != rm.dtype
            or (y.dtype == torch.float64 and rm.dtype != torch.float64)
        ):
            return False
        vectors += [rm, rv]
    fits = all(
        t.shape == (channels,) and t.is_contiguous() and t.is_floating_point()
        and t.device == y.device
        for t in vectors
    )  # fmt: skip
    if fits:
        if len(_FITTING_OUTPUT_BN) >= _CHECKED_INPUT_BN_MAX:
            _FITTING_OUTPUT_BN.clear()
        _FITTING_OUTPUT_BN.add(key)
    return fits


# The input BatchNorm's checked keys (`_input_bn_key`). Cleared when full, as the prepared
# launches are.
_CHECKED_INPUT_BN: set[tuple] = set()
_CHECKED_INPUT_BN_MAX = 4096


_INPUT_BN_TENSORS = operator.attrgetter(
    "in_mean", "in_m2", "in_weight", "in_bias", "in_scale", "in_shift", "in_invstd"
)


def _input_bn_key(args: TrainArgs) -> tuple:
    """Everything `_check_input_bn` reads from args."""
    x = args.x
    return (
        x.shape[1], x.device, args.input_pool, args.input_add is None,
        *map(layout_key, _INPUT_BN_TENSORS(args)),
    )  # fmt: skip


def _check_input_bn(args: TrainArgs) -> None:
    """Raises unless args' input BatchNorm can run (checked once per `_input_bn_key`)."""
    key = _input_bn_key(args)
    if key in _CHECKED_INPUT_BN:
        return
    x, c_in = args.x, args.x.shape[1]
    for name in ("mean", "m2", "weight", "bias"):
        t = getattr(args, f"in_{name}")
        if t is None:
            raise ValueError(f"input_bn needs its {name}")
        check_channel_vector(t, f"input_bn.{name}", c_in, x)
    coefficients = (args.in_scale, args.in_shift, args.in_invstd)
    if any(t is None for t in coefficients) != all(t is None for t in coefficients):
        raise ValueError("input_bn's scale, shift and invstd go together")
    for name, t in zip(("scale", "shift", "invstd"), coefficients):
        check_channel_vector(t, f"input_bn.{name}", c_in, x)
    if args.input_pool != 1 or args.input_add is not None:
        raise ValueError("input_bn cannot be combined with input_pool or input_add")
    if len(_CHECKED_INPUT_BN) >= _CHECKED_INPUT_BN_MAX:
        _CHECKED_INPUT_BN.clear()
    _CHECKED_INPUT_BN.add(key)


_conv2d_bn_train_op = torch.library.custom_op("fastres::conv2d_bn_train", mutates_args=())(
    conv2d_bn_train_body
)


@_conv2d_bn_train_op.register_fake
def _(*inputs) -> tuple[Tensor, Tensor, Tensor]:
    conv = TrainArgs(*inputs).conv_args(None, None)
    return conv.allocate_output(), *conv.empty_stats(True)


def _setup_context(ctx, inputs, output) -> None:
    args = TrainArgs(*inputs)
    _, mean, m2 = output
    ctx.mark_non_differentiable(mean, m2)
    save_args(ctx, args)


# Where the backward's gradients go among the op's inputs (`TrainArgs`' order): the only
# differentiable ones.
_GRAD_INDEX = tuple(
    TrainArgs._fields.index(name) for name in ("x", "weight", "input_add", "in_weight", "in_bias")
)


def _grads(x=None, weight=None, input_add=None, in_weight=None, in_bias=None) -> tuple:
    """The backward's return: a gradient per op input (`TrainArgs`' order), None but these."""
    grads = [None] * len(TrainArgs._fields)
    for i, grad in zip(_GRAD_INDEX, (x, weight, input_add, in_weight, in_bias)):
        grads[i] = grad
    return tuple(grads)


def _backward(ctx, grad_y: Tensor, _grad_mean, _grad_m2):
    args, _ = saved_args(ctx)
    return train_backward(args, TrainArgs(*ctx.needs_input_grad), grad_y)


def train_backward(args: TrainArgs, needs: TrainArgs, grad_y: Tensor) -> tuple:
    """The op's input gradients (`TrainArgs`' order, None where `needs` is False) from y's."""
    x = args.x
    needs_input = needs.x or needs.in_weight or needs.in_bias or needs.input_add
    if not (needs_input or needs.weight):
        return _grads()
    if args.in_mean is not None:
        scale, shift, invstd = args.input_coefficients()
        conv_input = bn_ops.bn_apply(x, scale, shift, relu=True)
    else:
        conv_input = prologue_reference(x, input_pool=args.input_pool, input_add=args.input_add)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        cast(grad_y, x.dtype), conv_input, args.weight, None, args.stride, args.padding,
        args.dilation, False, [0, 0], args.groups, [needs_input, needs.weight, False],
    )  # fmt: skip
    if not needs_input:
        return _grads(weight=grad_weight)
    grad_add = grad_input if args.input_add is not None and needs.input_add else None
    if args.input_pool > 1:
        pool = [args.input_pool] * 2
        grad_input = torch.ops.aten.avg_pool2d_backward(
            grad_input, x, pool, pool, [0, 0], True, False, None
        )
    if args.in_mean is None:
        return _grads(grad_input, grad_weight, grad_add)
    if not args.in_group:
        grad_x, _, grad_w, grad_b, _, _ = bn_ops.bn_backward(
            grad_input, x, scale, shift, None, None, None, True, args.in_mean, invstd, None,
            None, args.in_count, False,
        )  # fmt: skip
        return _grads(
            grad_x if needs.x else None, grad_weight, grad_add,
            cast(grad_w, args.in_weight.dtype) if needs.in_weight else None,
            cast(grad_b, args.in_bias.dtype) if needs.in_bias else None,
        )  # fmt: skip
    sums = bn_ops.bn_backward_reduce(
        grad_input, x, scale, shift, None, None, None, True, args.in_mean, None
    )
    # The affine parameters' gradients are this process's share (as nn.SyncBatchNorm's: DDP
    # reduces them); the input gradient's batch-statistics terms are over every process's batch.
    local_dy, local_dy_xmu, _ = sums
    sum_dy, sum_dy_xmu, _ = bn_ops.all_reduce_sums(list(sums), args.in_group)
    grad_x = None
    if needs.x:
        grad_x, _ = bn_ops.bn_backward_elemt(
            grad_input, x, scale, shift, None, None, None, True, args.in_mean, invstd, sum_dy,
            sum_dy_xmu, None, None, None, args.in_count, False,
        )  # fmt: skip
    return _grads(
        grad_x, grad_weight, grad_add,
        cast(local_dy_xmu * invstd, args.in_weight.dtype) if needs.in_weight else None,
        cast(local_dy, args.in_bias.dtype) if needs.in_bias else None,
    )  # fmt: skip


torch.library.register_autograd("fastres::conv2d_bn_train", _backward, setup_context=_setup_context)


def _forward(output_bn: OutputBN | None, inputs: tuple) -> tuple[Tensor, ...]:
    """The op on inputs, below its autograd; with output_bn, that BN finalized too: in the
    merge's launch where the body runs directly, else by the extension's op after the op."""
    if output_bn is None:
        return call_op(torch.ops.fastres.conv2d_bn_train, conv2d_bn_train_body, inputs)
    if dispatch_free(inputs):
        return finalizing_body(output_bn, inputs)
    with torch._C._AutoDispatchBelowAutograd():
        y, mean, m2 = torch.ops.fastres.conv2d_bn_train(*inputs)
    return y, mean, m2, *output_bn.finalize(mean, m2, _checked_count(y))


class _Conv2dBNTrain(torch.autograd.Function):
    """The autograd of `fastres::conv2d_bn_train` (same backward) for eager execution with
    gradients, cheaper than the custom op's own wrapper (see `conv2d_fused._Conv2dFused`).
    The op's body is called directly where nothing could see its dispatch, else the op below
    the Autograd key (`call_op`: dispatch modes and profiles see it). Inputs: the output BN
    (`OutputBN`, or None), then the op's."""

    @staticmethod
    def forward(ctx, output_bn, *inputs):
        output = _forward(output_bn, inputs)
        _setup_context(ctx, inputs, output[:3])
        ctx.mark_non_differentiable(*output[1:])  # replaces _setup_context's marks
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
        return output

    @staticmethod
    def backward(ctx, grad_y, *_grad_statistics):
        if grad_y is None:
            return (None,) * len(ctx.needs_input_grad)
        args, _ = saved_args(ctx)
        return None, *train_backward(args, TrainArgs(*ctx.needs_input_grad[1:]), grad_y)


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
    output_bn: OutputBN | None = None,
) -> tuple[Tensor, ...]:
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
        output_bn: the training-mode BatchNorm of y (`OutputBN.of`), finalized from these
            statistics with its running statistics updated, in the statistics' merge launch
            where the op's body runs directly.

    Returns:
        y [N, C_out, OH, OW] channels_last in x's dtype (no bias, no activation), and its
        per-channel mean [C_out] and M2 [C_out] (fp32, this process's batch, from the fp32
        accumulator), not differentiable; with output_bn also its scale, shift and invstd
        [C_out] (`bn_finalize`'s), not differentiable.
    """
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    bn = input_bn or InputBN(None, None, 0, None, None, 0.0, "")
    args = (
        x, weight, as_pair(stride, "stride"), as_pair(padding, "padding"),
        as_pair(dilation, "dilation"), int(groups), allow_tf32, int(input_pool), input_add,
        bn.mean, bn.m2, int(bn.count), bn.weight, bn.bias, float(bn.eps), bn.group, bn.scale,
        bn.shift, bn.invstd,
    )  # fmt: skip
    if eager_autograd():
        return apply_function(_Conv2dBNTrain, output_bn, *args)
    if dispatch_free(args):
        if output_bn is None:
            return conv2d_bn_train_body(*args)
        return finalizing_body(output_bn, args)
    y, mean, m2 = torch.ops.fastres.conv2d_bn_train(*args)
    if output_bn is None:
        return y, mean, m2
    return y, mean, m2, *output_bn.finalize(mean, m2, _checked_count(y))
