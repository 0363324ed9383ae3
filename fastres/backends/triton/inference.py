"""The triton backend's eval-mode units: conv + folded BatchNorm (+ residual) (+ ReLU) in one
kernel, the avg_down shortcut with its pool in the conv's input load.

Each BatchNorm on running statistics is folded into its convolution (`fastres.backends.folding`),
cached per conv until it is stale (`fastres.backends.fold_cache`), never written back; when
gradients are wanted the fold is recomputed each forward, so they reach the conv weight and the
BN weight / bias: in eager mode the fold and the convolution are one autograd node
(`fastres.ops.bn_fold.folded_conv2d`: a launch each, one fold launch backward), under
torch.compile or torch.func `folding.fold_arranged`'s PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...ops.bn_fold import folded_conv2d
from ...ops.conv2d_fused import arrange_weight, conv2d_fused, eager_autograd, runs_dtype
from ...ops.precision import accumulator_dtype
from ..fold_cache import fold_key, new_cache
from ..folding import fold, fold_arranged
from ..plan import Shortcut

# conv module -> (key of the tensors it was folded from, (arranged weight, bias)).
_FOLD_CACHE = new_cache()


def compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the kernels run in (autocast's when enabled), or None if they cannot."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if runs_dtype(dtype) else None


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A conv + BatchNorm pair the fused path computes: BN in eval mode with running stats."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and isinstance(conv.padding, tuple)
        and isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and not bn.training
        and bn.running_mean is not None
    )


def block_foldable(pairs: list[tuple[nn.Module, nn.Module | None]]) -> bool:
    """Whether every norm of a block's (conv, norm) pairs (`training.plan_pairs`: every norm
    of the block) is a BatchNorm on running statistics; a pair without a norm (a pool) is
    skipped. Not a walk over the block's modules, and the buffer from the module's own dict,
    not through nn.Module's attribute lookup: this runs every forward."""
    return all(
        norm is None
        or (
            not norm.training
            and isinstance(norm, nn.modules.batchnorm._BatchNorm)
            and norm._buffers.get("running_mean") is not None
        )
        for _, norm in pairs
    )


def _fold(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The conv weight with the BN folded in ([C_out, C_in, KH, KW], arranged for the kernel,
    in `dtype`) and the folded bias ([C_out] fp32, fp64 for fp64)."""
    weight, bias = fold(conv, bn, accumulator_dtype(dtype))
    return arrange_weight(weight, dtype), bias


def folded(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`_fold`, cached while it is not stale (`fold_cache`) and no gradient is wanted."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and wants_grad(conv, bn)):
        return fold_arranged(conv, bn, dtype)
    key = (fold_key(conv, bn), dtype, torch.is_inference_mode_enabled())
    cached = _FOLD_CACHE.get(conv)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        folded = _fold(conv, bn, dtype)
    _FOLD_CACHE[conv] = (key, folded)
    return folded


def wants_grad(conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether a gradient may reach a parameter the fold is made of (read only where grad
    mode is on: nn.Module's attribute lookups cost more than the rest of a cached fold)."""
    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    return any(p is not None and p.requires_grad for p in params)


def forget_folded(modules: list[nn.Module]) -> None:
    """Drops the folded weights cached for these convolutions."""
    for conv in modules:
        _FOLD_CACHE.pop(conv, None)


def conv_bn(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor,
    *,
    relu: bool,
    residual: Tensor | None = None,
    input_pool: int = 1,
) -> Tensor:
    """relu?(bn(conv(pool?(x))) + residual?) in one kernel; with gradients in eager mode the
    fold and the convolution are one autograd node (`folded_conv2d`)."""
    if eager_autograd() and wants_grad(conv, bn):
        return folded_conv2d(
            x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.eps, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            residual=residual, input_pool=input_pool, relu=relu,
        )  # fmt: skip
    weight, bias = folded(conv, bn, x.dtype)
    return conv2d_fused(
        x,
        weight,
        bias,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        residual=residual,
        input_pool=input_pool,
        relu=relu,
    )


def fusable_pool(pool: nn.Module) -> int | None:
    """The k of an avg_down AvgPool2d(k, stride=k, ceil_mode=True), else None.

    Without padding, count_include_pad makes no difference, so it is not checked.
    """
    if not isinstance(pool, nn.AvgPool2d) or pool.divisor_override is not None:
        return None
    sizes = [
        (v, v) if isinstance(v, int) else tuple(v)
        for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding)
    ]
    (k, k_w), stride, padding = sizes
    if k != k_w or stride != (k, k) or padding != (0, 0):
        return None
    # The kernel pools with ceil_mode; floor mode differs unless k == 1.
    return k if pool.ceil_mode or k == 1 else None


def downsample_shortcut(shortcut: Shortcut, x: Tensor) -> Tensor:
    """The downsample branch: [AvgPool2d] -> conv1x1 -> BN, the pool fused into the conv."""
    pools, (conv, bn, _) = shortcut
    input_pool = 1
    if len(pools) == 1 and fusable_pool(pools[0]) is not None:
        input_pool = fusable_pool(pools[0])
    else:
        for pool in pools:
            x = pool(x)
    return conv_bn(conv, bn, x, relu=False, input_pool=input_pool)


def nhwc_empty(like: Tensor, channels: int, h: int, w: int) -> Tensor:
    """An uninitialised [N, channels, h, w] channels_last tensor in like's dtype and device.

    Its pixel stride is rounded up to 16 channels: Res2Net widths (26, 52, ...) are not
    multiples of 8, and Triton specializes on strides divisible by 16, which lets it prove
    16-byte alignment of every pixel and vectorize (the padding is never read or written).
    """
    padded = -(-channels // 16) * 16
    buf = torch.empty(
        (like.shape[0], padded, h, w),
        dtype=like.dtype,
        device=like.device,
        memory_format=torch.channels_last,
    )
    return buf[:, :channels]
