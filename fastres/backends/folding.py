"""An eval-mode BatchNorm (running statistics) as a per-channel affine map, and folded into the
convolution before it: the one formula both fused backends use (each caches its folded weights
in its own form: oneDNN-prepacked for native, arranged for the Triton kernel; `fold_arranged`
folds for the Triton kernel with gradients, the BN frozen in training)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.bn_fold import bn_fold
from ..ops.conv2d_fused import arrange_weight, eager_autograd
from ..ops.precision import accumulator_dtype


def uses_batch_stats(norm: nn.Module) -> bool:
    """Whether `norm` is a BatchNorm that normalizes with its batch's statistics (training
    mode, or no running statistics): one that cannot be folded."""
    return isinstance(norm, nn.modules.batchnorm._NormBase) and (
        norm.training or norm.running_mean is None
    )


def bn_scale_shift(bn: nn.Module, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale, shift) [C] in `acc` with bn(y) = y * scale + shift; differentiable in the BN's
    weight and bias (absent without affine parameters)."""
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.to(acc) * scale
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = bn.bias.to(acc) + shift
    return scale, shift


def fold(conv: nn.Conv2d, bn: nn.Module, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """bn(conv(x)) = conv'(x) + bias: conv' weight [C_out, C_in, KH, KW] and bias [C_out], in
    `acc`; differentiable in the conv and BN parameters."""
    scale, shift = bn_scale_shift(bn, acc)
    weight = conv.weight.to(acc) * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else shift + conv.bias.to(acc) * scale
    return weight, bias


def fold_arranged(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`fold` for the Triton kernel: the weight arranged (`arrange_weight`) in `dtype`, the bias
    in its accumulator dtype; differentiable in the conv and BN parameters.

    In eager mode with autograd, one launch forward and one backward (`fastres.ops.bn_fold`);
    under torch.compile or torch.func, `fold`'s PyTorch ops.
    """
    if eager_autograd():
        return bn_fold(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            dtype,
        )  # fmt: skip
    weight, bias = fold(conv, bn, accumulator_dtype(dtype))
    return arrange_weight(weight, dtype), bias
