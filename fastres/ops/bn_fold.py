"""Launchers, `fastres::` custom ops and autograd of the BatchNorm fold (`kernels/fold_bn.py`).

    weight, bias = bn_fold(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                           bn.running_var, bn.eps, torch.bfloat16)

gives bn(conv(x)) = conv'(x) + bias for an eval-mode BatchNorm: conv' weight arranged for the
fused convolution (`arrange_weight`'s layout) in the kernels' dtype, and the bias in the
accumulator's dtype, in one launch; differentiable in the conv weight and bias and the BN's
weight and bias (one launch backward). The formula is `fastres.backends.folding.fold`'s; this
is how the triton backend folds a frozen BatchNorm whose parameters learn (norm_eval training)
in eager mode, at fewer kernels than eager's BatchNorm.

- `fastres::bn_fold` -> (weight, bias).
- `fastres::bn_fold_backward` -> (grad_weight, grad_conv_bias, grad_bn_weight): the last two
  empty where the conv has no bias / the BN no weight. The BN bias's gradient is the folded
  bias's.

Both have fake implementations; the autograd (`_BNFold`) is a plain autograd.Function, so the
ops run in eager mode (torch.compile and torch.func compose `fold` from PyTorch ops instead).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import conv2d_fused
from .conv2d_fused import apply_function, call_op, interpreting, layout_key
from .precision import accumulator_dtype, cast, triton_accumulator

# Tile of one program: K (C_in * KH * KW) x output channels (32 x 32: the fp32
# backward at 64 x 32 spills 16 B under Triton 3.6, scripts/check_triton36.sh). Under the
# interpreter every program costs Python overhead: the fewest, largest tiles.
_BLOCK_K, _BLOCK_C = 32, 32
_INTERPRETER_BLOCK_K, _INTERPRETER_BLOCK_C = 1024, 256


def _arranged_empty(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialized tensor of weight's shape in `dtype`, in `arrange_weight`'s layout."""
    return conv2d_fused.arranged_empty(weight.shape, dtype, weight.device)


@functools.cache
def fold_tiles(c_out: int, k: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C) of a weight [c_out, k]; `interpret`: `interpreting()`."""
    import triton

    block_k, block_c = (
        (_INTERPRETER_BLOCK_K, _INTERPRETER_BLOCK_C) if interpret else (_BLOCK_K, _BLOCK_C)
    )
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    return block_k, min(block_c, max(16, triton.next_power_of_2(c_out)))


def _check(weight: Tensor, *channel_vectors: Tensor | None) -> None:
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight [C_out, C_in, KH, KW], got {tuple(weight.shape)}")
    for t in channel_vectors:
        conv2d_fused.check_channel_vector(
            t, "a per-channel BatchNorm / bias tensor", len(weight), weight
        )


# A launch's key (what it reads of its arguments but their data and addresses: their layouts,
# eps, the dtype) -> the launch (`launcher.DirectLaunch`), None for an empty weight: checked at
# the key's first call, kept. Cleared when full (ever new shapes re-prepare, as conv2d_fused).
_LAUNCHES: dict[tuple, object] = {}
_LAUNCHES_MAX = 4096


def kept_launch(key: tuple, make):
    """The launch kept for `key`, made (and checked) by `make()` at its first call."""
    if key in _LAUNCHES:
        return _LAUNCHES[key]
    made = make()
    if len(_LAUNCHES) >= _LAUNCHES_MAX:
        _LAUNCHES.clear()
    _LAUNCHES[key] = made
    return made


def _bn_fold_body(
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    vectors = (conv_bias, bn_weight, bn_bias, running_mean, running_var)
    key = ("fold", layout_key(weight), *map(layout_key, vectors), eps, dtype, interpreting())
    fold = kept_launch(key, lambda: _fold_launch(weight, vectors, eps, dtype))
    # Not part of the kept verdict: scripts/compile_report.py replaces it for a while.
    conv2d_fused.check_triton_device(weight, "the BatchNorm fold")
    out_w = _arranged_empty(weight, dtype)
    out_b = weight.new_empty(weight.shape[0], dtype=accumulator_dtype(dtype))
    if fold is None:
        return out_w, out_b.zero_()
    fold(weight, *vectors, out_w, out_b)
    return out_w, out_b


def _fold_launch(weight: Tensor, vectors: tuple, eps: float, dtype: torch.dtype):
    """The fold's launch for these arguments' layouts (checked), None for an empty weight."""
    from fastres.kernels.fold_bn import fold_bn_kernel

    from .launcher import DirectLaunch

    _check(weight, *vectors)
    conv2d_fused.check_triton_device(weight, "the BatchNorm fold")
    if weight.numel() == 0:
        return None
    conv_bias, bn_weight, bn_bias, _, _ = vectors
    c_out, c_in, kh, kw = weight.shape
    k = c_in * kh * kw
    interpret = interpreting()
    block_k, block_c = fold_tiles(c_out, k, interpret)
    out_strides = _arranged_empty(weight, dtype).stride()
    return DirectLaunch(
        fold_bn_kernel, (-(-c_out // block_c),), 8,
        (eps, c_out, c_in, k, kw, *weight.stride(), *out_strides),
        dict(
            HAS_CONV_BIAS=conv_bias is not None, HAS_GAMMA=bn_weight is not None,
            HAS_BETA=bn_bias is not None, ACC=triton_accumulator(dtype),
            EMULATE_RTNE=int(interpret), BLOCK_K=block_k, BLOCK_C=block_c,
        ),
    )  # fmt: skip


_bn_fold_op = torch.library.custom_op("fastres::bn_fold", mutates_args=())(_bn_fold_body)


@_bn_fold_op.register_fake
def _(weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype):
    return _arranged_empty(weight, dtype), weight.new_empty(
        weight.shape[0], dtype=accumulator_dtype(dtype)
    )


def _bn_fold_backward_body(
    grad_weight: Tensor,
    grad_bias: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    grad_w, grad_conv_bias, grad_gamma = _backward_outputs(weight, conv_bias, bn_weight)
    # The kernel reads the bias gradient at unit stride; autograd may hand an expanded one.
    grad_bias = grad_bias.contiguous()
    inputs = (grad_weight, grad_bias, weight, conv_bias, bn_weight, running_mean, running_var)
    key = ("backward", *map(layout_key, inputs), eps, interpreting())
    fold_backward = kept_launch(key, lambda: _fold_backward_launch(inputs, grad_w, eps))
    if fold_backward is None:
        return grad_w, grad_conv_bias.zero_(), grad_gamma.zero_()
    fold_backward(*inputs, grad_w, grad_conv_bias, grad_gamma, None)
    return grad_w, grad_conv_bias, grad_gamma


def _fold_backward_launch(inputs: tuple, grad_w: Tensor, eps: float):
    """The fold backward's launch for these arguments' layouts, None for an empty weight
    (`grad_w`: one with the strides of those launches will write)."""
    from fastres.kernels.fold_bn import fold_bn_backward_kernel

    from .launcher import DirectLaunch

    grad_weight, _, weight, conv_bias, bn_weight, _, _ = inputs
    if weight.numel() == 0:
        return None
    c_out, c_in, kh, kw = weight.shape
    k = c_in * kh * kw
    block_k, block_c = fold_tiles(c_out, k, interpreting())
    scalars = (
        eps, c_out, c_in, k, kw, *weight.stride(), *grad_weight.stride(), *grad_w.stride()
    )  # fmt: skip
    return DirectLaunch(
        fold_bn_backward_kernel, (-(-c_out // block_c),), 11, scalars,
        dict(
            HAS_CONV_BIAS=conv_bias is not None, HAS_GAMMA=bn_weight is not None, HAS_BETA=False,
            ACC=triton_accumulator(weight.dtype), BLOCK_K=block_k, BLOCK_C=block_c,
        ),
    )  # fmt: skip


_bn_fold_backward_op = torch.library.custom_op("fastres::bn_fold_backward", mutates_args=())(
    _bn_fold_backward_body
)


def _backward_outputs(weight, conv_bias, bn_weight) -> tuple[Tensor, Tensor, Tensor]:
    """The gradient buffers of weight, conv_bias and bn_weight (empty for an absent one)."""
    grad_w = torch.empty_like(weight)
    # Two empty tensors, not one: a custom op's outputs must not alias each other.
    grad_conv_bias = weight.new_empty(0) if conv_bias is None else torch.empty_like(conv_bias)
    grad_gamma = weight.new_empty(0) if bn_weight is None else torch.empty_like(bn_weight)
    return grad_w, grad_conv_bias, grad_gamma


_bn_fold_backward_op.register_fake(
    lambda grad_weight, grad_bias, weight, conv_bias, bn_weight, *_: _backward_outputs(
        weight, conv_bias, bn_weight
    )
)


class _BNFold(torch.autograd.Function):
    """The autograd of `fastres::bn_fold`: one `fastres::bn_fold_backward` backward.

    Both ops' bodies are called directly where nothing could see their dispatch, else the ops
    below the Autograd key (`call_op`): this Function is their autograd, and the custom ops'
    own dispatch layers would only cost host time. Dispatch modes and profiles still see them."""

    @staticmethod
    def forward(ctx, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype):
        inputs = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype)
        out = call_op(torch.ops.fastres.bn_fold, _bn_fold_body, inputs)
        ctx.save_for_backward(weight, conv_bias, bn_weight, running_mean, running_var)
        ctx.eps, ctx.bias_dtype = eps, None if bn_bias is None else bn_bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        weight, conv_bias, bn_weight, running_mean, running_var = ctx.saved_tensors
        inputs = (
            grad_weight, grad_bias, weight, conv_bias, bn_weight, running_mean, running_var,
            ctx.eps,
        )  # fmt: skip
        grad_w, grad_conv_bias, grad_gamma = call_op(
            torch.ops.fastres.bn_fold_backward, _bn_fold_backward_body, inputs
        )
        need = ctx.needs_input_grad
        return (
            grad_w if need[0] else None,
            grad_conv_bias if need[1] else None,
            grad_gamma if need[2] else None,
            cast(grad_bias, ctx.bias_dtype) if need[3] else None,
            None, None, None, None,
        )  # fmt: skip


def bn_fold(
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """bn(conv(x)) = conv'(x) + bias for a BatchNorm on running statistics, in one launch.

    Args:
        weight: the conv weight [C_out, C_in, KH, KW], any strides; conv_bias: [C_out] or None.
        bn_weight, bn_bias: the BN's affine parameters [C_out], or None (no affine).
        running_mean, running_var, eps: the BN's statistics (constants to autograd).
        dtype: the dtype of the folded weight (the kernels'): float32, float16, bfloat16
            (float64 under the interpreter).

    Returns:
        The folded weight [C_out, C_in, KH, KW] in `dtype`, channels_last (`arrange_weight`'s
        layout), and the folded bias [C_out] in `accumulator_dtype(dtype)`.
        Differentiable in weight, conv_bias, bn_weight and bn_bias (eager mode).
    """
    return apply_function(
        _BNFold, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, float(eps), dtype
    )


class _FoldedConv(torch.autograd.Function):
    """`bn_fold`, then `conv2d_fused` with the folded weight and bias, as one autograd node (a
    BN-frozen training unit): one Python node backward instead of two. Inputs: `bn_fold`'s,
    then the convolution's op inputs but its weight and bias (x, stride, ..., relu, stats).
    Backward: the convolution's (`conv2d_fused.conv_backward`), then one
    `fastres::bn_fold_backward`."""

    @staticmethod
    def forward(ctx, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype,
                x, *rest):  # fmt: skip
        fold_inputs = (weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, dtype)
        folded_weight, bias = call_op(torch.ops.fastres.bn_fold, _bn_fold_body, fold_inputs)
        conv_inputs = (x, folded_weight, bias, *rest)
        out, mean, m2 = call_op(
            torch.ops.fastres.conv2d_fused, conv2d_fused.conv2d_fused_body, conv_inputs
        )
        ctx.mark_non_differentiable(mean, m2)
        ctx.set_materialize_grads(False)
        args = conv2d_fused.ConvArgs.of_op_inputs(conv_inputs)
        conv2d_fused.save_args(
            ctx, args, out, weight, conv_bias, bn_weight, running_mean, running_var
        )
        ctx.eps, ctx.bias_dtype = eps, None if bn_bias is None else bn_bias.dtype
        return out, mean, m2

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_m2):
        need = ctx.needs_input_grad
        if grad_out is None:
            return (None,) * len(need)
        args, (out, weight, conv_bias, bn_weight, running_mean, running_var) = (
            conv2d_fused.saved_args(ctx)
        )
        fold_needs = any(need[:4])
        conv_needs = conv2d_fused.ConvArgs.of_op_inputs(
            (need[8], fold_needs, fold_needs, *need[9:])
        )
        grads = conv2d_fused.conv_backward(args, out, conv_needs, grad_out)
        grad_weight = grad_conv_bias = grad_gamma = grad_beta = None
        if fold_needs:
            inputs = (
                grads["weight"], grads["bias"], weight, conv_bias, bn_weight, running_mean,
                running_var, ctx.eps,
            )  # fmt: skip
            grad_weight, grad_conv_bias, grad_gamma = call_op(
                torch.ops.fastres.bn_fold_backward, _bn_fold_backward_body, inputs
            )
            grad_beta = cast(grads["bias"], ctx.bias_dtype) if need[3] else None
        conv_grads = [g for name, g in grads.items() if name not in ("weight", "bias")]
        return (
            grad_weight if need[0] else None, grad_conv_bias if need[1] else None,
            grad_gamma if need[2] else None, grad_beta, None, None, None, None, *conv_grads, None,
        )  # fmt: skip


def folded_conv2d(
    x: Tensor,
    weight: Tensor,
    conv_bias: Tensor | None,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    residual: Tensor | None = None,
    input_pool: int = 1,
    relu: bool = False,
) -> Tensor:
    """`conv2d_fused(x, *bn_fold(weight, ..., x.dtype), ...)`, a conv with an eval-mode
    BatchNorm folded in per call, as one autograd node (`_FoldedConv`): for eager mode with
    gradients (`conv2d_fused.eager_autograd`); differentiable in x, residual, the conv weight
    and bias and the BN weight and bias."""
    args = conv2d_fused.ConvArgs(
        x, weight, None, stride=conv2d_fused.as_pair(stride, "stride"),
        padding=conv2d_fused.as_pair(padding, "padding"),
        dilation=conv2d_fused.as_pair(dilation, "dilation"), groups=1,
        allow_tf32=bool(torch.backends.cudnn.allow_tf32), residual=residual,
        input_pool=int(input_pool), relu=bool(relu),
    )  # fmt: skip
    out, _, _ = apply_function(
        _FoldedConv, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var,
        float(eps), x.dtype, x, *args[3:], False,
    )  # fmt: skip
    return out
