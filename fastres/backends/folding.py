"""An eval-mode BatchNorm (running statistics) as a per-channel affine map, and folded into the
convolution before it: the one formula both fused backends use (each caches its folded weights
in its own form: oneDNN-prepacked for native, arranged for the Triton kernel)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
