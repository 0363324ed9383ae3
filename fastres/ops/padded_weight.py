"""Launchers, `fastres::` custom ops and autograd of the padded weight (`kernels/padded_weight.py`).

    weight, bias = padded_weight([conv.weight], rows, cols, torch.bfloat16, [(conv.bias,
                                 bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)])

gives the weight of a convolution whose output and input channels sit in padded slots (a
`ChannelMap` each way), in `arrange_weight`'s layout and the kernels' dtype, with an eval-mode
BatchNorm folded in where given (and then its folded bias in the accumulator's dtype, padded as
the rows), in one launch per member; the gradients of the weights (and of the conv biases and the
BN weights and biases) in one launch per member back. Several members (equal shapes, e.g. a
Res2Net block's chunk convs) are stacked along the output channels, each laid out by the
same maps. `padded_weights` lays out several such groups (a Bottle2neck's conv1, chunk convs
and conv3) as one autograd node. This is how the triton backend prepares Res2Net's weights
with gradients, at no more kernels than eager's weight cast.

- `fastres::padded_weight` -> (weight, bias): bias empty without a fold.
- `fastres::padded_weight_backward` -> per member (grad_weight, grad_conv_bias, grad_bn_weight,
  grad_bn_bias), empty where absent.

Both have fake implementations; the autograd (`_PaddedWeight`) is a plain autograd.Function, so
the ops run in eager mode (torch.compile and torch.func compose the same weight from PyTorch
ops: `fastres.backends.triton.res2net`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from . import conv2d_fused
from .bn_fold import fold_tiles, kept_launch
from .conv2d_fused import apply_function, arrange_weight, call_op, interpreting, layout_key
from .precision import accumulator_dtype, cast, triton_accumulator


class ChannelMap(NamedTuple):
    """A padded channel layout: `index` [padded] int32, the source channel of each padded one
    (-1: a zero column, for input channels); `inverse` [source] int32, the padded position of
    each source channel's primary copy."""

    index: Tensor
    inverse: Tensor


# A fold member: (conv bias, BN weight, BN bias, running mean, running var, eps).
Fold = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor, Tensor, float]


@functools.cache
def _arranged_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of an `arrange_weight` result of this shape."""
    return arrange_weight(torch.empty(shape, device="meta")).stride()


def _outputs(weights: list[Tensor], rows: Tensor, cols: Tensor, dtype, fold: bool):
    """The (weight, bias) buffers: [members * padded C_out, padded C_in, KH, KW] arranged, and
    [members * padded C_out] in the accumulator's dtype (empty without a fold)."""
    _, _, kh, kw = weights[0].shape
    shape = (len(weights) * len(rows), len(cols), kh, kw)
    device = weights[0].device
    out_w = torch.empty_strided(shape, _arranged_strides(shape), dtype=dtype, device=device)
    out_b = torch.empty(shape[0] if fold else 0, dtype=accumulator_dtype(dtype), device=device)
    return out_w, out_b


def _check(weights: list[Tensor], rows: Tensor, cols: Tensor, folds: int) -> None:
    if not weights or any(w.dim() != 4 or w.shape != weights[0].shape for w in weights):
        raise ValueError(
            f"expected conv weights [C_out, C_in, KH, KW] of one shape, got "
            f"{[tuple(w.shape) for w in weights]}"
        )
    if folds not in (0, len(weights)):
        raise ValueError(f"{folds} BatchNorms for {len(weights)} weights")
    for t, name in ((rows, "rows"), (cols, "cols")):
        if (
            t.dtype != torch.int32
            or t.dim() != 1
            or t.stride(0) != 1
            or t.device != weights[0].device
        ):
            raise ValueError(f"{name}: expected a contiguous 1-D int32 map on the weights' device")


def _padded_weight_body(
    weights: list[Tensor],
    rows: Tensor,
    cols: Tensor,
    conv_biases: list[Tensor | None],
    gammas: list[Tensor | None],
    betas: list[Tensor | None],
    means: list[Tensor],
    variances: list[Tensor],
    eps: list[float],
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    fold = bool(means)
    _check(weights, rows, cols, len(means))
    conv2d_fused.check_triton_device(weights[0], "the padded weight")
    out_w, out_b = _outputs(weights, rows, cols, dtype, fold)
    if out_w.numel() == 0:
        return out_w, out_b.zero_()
    p = len(rows)
    for m, w in enumerate(weights):
        vectors = (
            (conv_biases[m], gammas[m], betas[m], means[m], variances[m]) if fold else (None,) * 5
        )
        e = eps[m] if fold else 0.0
        key = ("fwd", layout_key(w), *map(layout_key, vectors), p, len(cols), fold, e, dtype,
               interpreting())  # fmt: skip
        launch = kept_launch(key, functools.partial(_launch, w, vectors, out_w[:p], e, fold, dtype))
        bias = out_b[m * p : (m + 1) * p] if fold else None
        launch(w, rows, cols, *vectors, out_w[m * p : (m + 1) * p], bias)
    return out_w, out_b


def _launch(w: Tensor, vectors: tuple, out_w: Tensor, eps: float, fold: bool, dtype):
    """The forward launch for one member's layouts (`out_w`: its slice of the output)."""
    from fastres.kernels.padded_weight import padded_weight_kernel

    from .launcher import DirectLaunch

    for t in vectors:
        conv2d_fused.check_channel_vector(t, "a per-channel BatchNorm / bias tensor", len(w), w)
    conv_bias, gamma, beta, _, _ = vectors
    c_out, c_in, kh, kw = out_w.shape
    k = c_in * kh * kw
    interpret = interpreting()
    block_k, block_c = fold_tiles(c_out, k, interpret)
    return DirectLaunch(
        padded_weight_kernel, (-(-c_out // block_c),), 10,
        (eps, c_out, c_in, k, kw, *w.stride(), *out_w.stride()),
        dict(
            FOLD=int(fold), HAS_CONV_BIAS=conv_bias is not None, HAS_GAMMA=gamma is not None,
            HAS_BETA=beta is not None, ACC=triton_accumulator(dtype),
            EMULATE_RTNE=int(interpret), BLOCK_K=block_k, BLOCK_C=block_c,
        ),
    )  # fmt: skip


_padded_weight_op = torch.library.custom_op("fastres::padded_weight", mutates_args=())(
    _padded_weight_body
)


@_padded_weight_op.register_fake
def _(weights, rows, cols, conv_biases, gammas, betas, means, variances, eps, dtype):
    return _outputs(weights, rows, cols, dtype, bool(means))


def _padded_weight_backward_body(
    grad_weight: Tensor,
    grad_bias: Tensor,
    weights: list[Tensor],
    inv_rows: Tensor,
    inv_cols: Tensor,
    conv_biases: list[Tensor | None],
    gammas: list[Tensor | None],
    means: list[Tensor],
    variances: list[Tensor],
    eps: list[float],
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    fold = bool(means)
    grads = _backward_outputs(weights, conv_biases, gammas, fold)
    if fold:  # the kernel reads it at unit stride; autograd may hand an expanded one
        grad_bias = grad_bias.contiguous()
    if weights[0].numel() == 0:
        return grads[0], *([g.zero_() for g in group] for group in grads[1:])
    p = grad_weight.shape[0] // len(weights)
    for m, w in enumerate(weights):
        vectors = (conv_biases[m], gammas[m], means[m], variances[m]) if fold else (None,) * 4
        g_w = grad_weight[m * p : (m + 1) * p]
        g_b = grad_bias[m * p : (m + 1) * p] if fold else None
        outs = [group[m] for group in grads] if fold else [grads[0][m], None, None, None]
        e = eps[m] if fold else 0.0
        key = ("bwd", layout_key(g_w), layout_key(w), *map(layout_key, vectors),
               layout_key(outs[0]), fold, e, interpreting())  # fmt: skip
        launch = kept_launch(
            key, functools.partial(_backward_launch, w, vectors, g_w, outs[0], e, fold)
        )
        outs = [o if o is not None and o.numel() else None for o in outs]
        launch(g_w, g_b, inv_rows, inv_cols, w, *vectors, *outs)
    return grads


def _backward_launch(w: Tensor, vectors: tuple, g_w: Tensor, grad_w: Tensor, eps: float, fold):
    """The backward launch for one member's layouts."""
    from fastres.kernels.padded_weight import padded_weight_backward_kernel

    from .launcher import DirectLaunch

    conv_bias, gamma, _, _ = vectors
    c_out, c_in, kh, kw = w.shape
    k = c_in * kh * kw
    block_k, block_c = fold_tiles(c_out, k, interpreting())
    return DirectLaunch(
        padded_weight_backward_kernel, (-(-c_out // block_c),), 13,
        (eps, c_out, c_in, k, kw, *w.stride(), *g_w.stride(), *grad_w.stride()),
        dict(
            FOLD=int(fold), HAS_CONV_BIAS=conv_bias is not None, HAS_GAMMA=gamma is not None,
            ACC=triton_accumulator(w.dtype), BLOCK_K=block_k, BLOCK_C=block_c,
        ),
    )  # fmt: skip


def _backward_outputs(weights, conv_biases, gammas, fold: bool):
    """Per member: the gradient buffers of the weight, conv bias, BN weight and BN bias (empty
    where absent; each its own tensor: a custom op's outputs must not alias)."""

    def like(t: Tensor | None, present: bool) -> Tensor:
        return torch.empty_like(t) if present and t is not None else weights[0].new_empty(0)

    c_out = weights[0].shape[0]
    grad_w = [torch.empty_like(w) for w in weights]
    grad_conv_bias = [like(b, fold) for b in conv_biases] if fold else []
    grad_gamma = [like(g, fold) for g in gammas] if fold else []
    grad_beta = (
        [weights[0].new_empty(c_out, dtype=accumulator_dtype(weights[0].dtype)) for _ in weights]
        if fold
        else []
    )
    return grad_w, grad_conv_bias, grad_gamma, grad_beta


_padded_weight_backward_op = torch.library.custom_op(
    "fastres::padded_weight_backward", mutates_args=()
)(_padded_weight_backward_body)
_padded_weight_backward_op.register_fake(
    lambda grad_weight, grad_bias, weights, inv_rows, inv_cols, conv_biases, gammas, *_: (
        _backward_outputs(weights, conv_biases, gammas, bool(_[0]))
    )
)


class PaddedGroup(NamedTuple):
    """Conv weights of one shape laid out by one pair of maps (`padded_weight`'s arguments):
    one `fastres::padded_weight` call of a `padded_weights` node."""

    weights: list[Tensor]
    rows: ChannelMap
    cols: ChannelMap
    folds: list[Fold] | None = None


class _Layout(NamedTuple):
    """A group as `_PaddedWeight` carries it: its maps, member count and eps per member (empty
    without a fold); its tensors come flat, the weights first, then with a fold the conv
    biases, BN weights, BN biases, running means and running variances (a member each)."""

    rows: ChannelMap
    cols: ChannelMap
    members: int
    eps: list[float]

    def tensor_count(self) -> int:
        return self.members * (6 if self.eps else 1)

    def split(self, tensors) -> list[list]:
        """(weights, conv biases, BN weights, BN biases, means, variances) of its tensors."""
        m = self.members
        if not self.eps:
            return [list(tensors), [], [], [], [], []]
        return [list(tensors[i * m : (i + 1) * m]) for i in range(6)]


class _PaddedWeight(torch.autograd.Function):
    """The autograd of `fastres::padded_weight` for one or more groups (`_Layout`) at once: one
    node, each group one op call forward and one `fastres::padded_weight_backward` backward
    (see `bn_fold._BNFold` for the direct body calls). Returns (weight, bias) per group."""

    @staticmethod
    def forward(ctx, dtype, layouts, *tensors):
        outputs, saved, offset, beta_dtypes = [], [], 0, []
        for layout in layouts:
            count = layout.tensor_count()
            weights, conv_biases, gammas, betas, means, variances = layout.split(
                tensors[offset : offset + count]
            )
            offset += count
            inputs = (weights, layout.rows.index, layout.cols.index, conv_biases, gammas, betas,
                      means, variances, layout.eps, dtype)  # fmt: skip
            outputs += call_op(torch.ops.fastres.padded_weight, _padded_weight_body, inputs)
            saved += [*weights, *conv_biases, *gammas, *means, *variances]
            beta_dtypes.append([None if b is None else b.dtype for b in betas])
        ctx.save_for_backward(*saved)
        ctx.layouts, ctx.beta_dtypes = layouts, beta_dtypes
        ctx.weight_shapes = [(w.shape, w.dtype) for w in outputs[0::2]]
        ctx.set_materialize_grads(False)  # the empty bias without a fold gets no gradient
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        saved, need = ctx.saved_tensors, ctx.needs_input_grad[2:]
        result, saved_at, need_at = [], 0, 0
        for i, layout in enumerate(ctx.layouts):
            count = layout.members * (5 if layout.eps else 1)
            group_need = need[need_at : need_at + layout.tensor_count()]
            result += _group_backward(
                layout, saved[saved_at : saved_at + count], grads[2 * i], grads[2 * i + 1],
                ctx.weight_shapes[i], ctx.beta_dtypes[i], group_need,
            )  # fmt: skip
            saved_at += count
            need_at += layout.tensor_count()
        return None, None, *result


def _group_backward(
    layout: _Layout, saved, grad_weight, grad_bias, weight_shape, beta_dtypes, need
) -> list[Tensor | None]:
    """One group's input gradients (`_Layout` order): one `fastres::padded_weight_backward`."""
    m, fold = layout.members, bool(layout.eps)
    if grad_weight is None and (not fold or grad_bias is None):
        return [None] * len(need)
    shape, dtype = weight_shape
    if grad_weight is None:
        grad_weight = saved[0].new_zeros(shape, dtype=dtype)
    if fold and grad_bias is None:
        grad_bias = saved[0].new_zeros(shape[0], dtype=accumulator_dtype(dtype))
    weights = list(saved[:m])
    groups = [list(saved[m * (i + 1) : m * (i + 2)]) for i in range(4)]
    conv_biases, gammas, means, variances = groups if fold else ([],) * 4
    inputs = (grad_weight, grad_bias if fold else None, weights, layout.rows.inverse,
              layout.cols.inverse, conv_biases, gammas, means, variances, layout.eps)  # fmt: skip
    grad_w, grad_cb, grad_g, grad_b = call_op(
        torch.ops.fastres.padded_weight_backward, _padded_weight_backward_body, inputs
    )
    grads = [g if need[i] else None for i, g in enumerate(grad_w)]
    if fold:
        for group, offset in ((grad_cb, 1), (grad_g, 2)):
            grads += [g if need[m * offset + i] else None for i, g in enumerate(group)]
        grads += [
            cast(g, dtype) if need[m * 3 + i] else None
            for i, (g, dtype) in enumerate(zip(grad_b, beta_dtypes))
        ]
        grads += [None] * (2 * m)
    return grads


def padded_weights(
    groups: list[PaddedGroup], dtype: torch.dtype
) -> list[tuple[Tensor, Tensor | None]]:
    """`padded_weight` of several groups as one autograd node: (weight, bias) per group."""
    layouts, tensors = [], []
    for group in groups:
        eps: list[float] = []
        tensors += group.weights
        if group.folds:
            for i in range(5):
                tensors += [f[i] for f in group.folds]
            eps = [float(f[5]) for f in group.folds]
        layouts.append(_Layout(group.rows, group.cols, len(group.weights), eps))
    outputs = apply_function(_PaddedWeight, dtype, tuple(layouts), *tensors)
    return [
        (outputs[2 * i], outputs[2 * i + 1] if group.folds else None)
        for i, group in enumerate(groups)
    ]


def padded_weight(
    weights: list[Tensor],
    rows: ChannelMap,
    cols: ChannelMap,
    dtype: torch.dtype,
    folds: list[Fold] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Conv weights in padded channel slots, arranged for the fused convolution, in one launch
    per member (see the module docstring).

    Args:
        weights: conv weights [C_out, C_in, KH, KW] of one shape, any strides.
        rows, cols: the padded layout of the output and the input channels.
        dtype: the dtype of the result (the kernels'): float32, float16, bfloat16 (float64 under
            the interpreter).
        folds: per weight, the eval-mode BatchNorm to fold in (`Fold`), or None.

    Returns:
        The weight [len(weights) * len(rows.index), len(cols.index), KH, KW] in `dtype`,
        `arrange_weight`'s layout; with folds, the folded bias [len(weights) *
        len(rows.index)] in `accumulator_dtype(dtype)`, else None. Differentiable in the
        weights, the conv biases and the BN weights and biases (eager mode).
    """
    return padded_weights([PaddedGroup(weights, rows, cols, folds)], dtype)[0]
