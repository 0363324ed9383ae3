"""The triton backend's training path (BatchNorm in training mode: batch statistics).

Each convolution returns its raw output and that output's batch statistics from the kernel's
epilogue; the next convolution applies the BatchNorm (those statistics) + ReLU in its input
load, so within a block only raw convolution outputs are stored; the block's tail applies the
last BN with the shortcut (identity, or the downsample conv's output with its own BN) and the
ReLU in one pass (`bn_train_act`). Running statistics are updated here, from the statistics
(all-gathered first for SyncBN), as nn.BatchNorm2d updates them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...ops import batchnorm as bn_ops
from ...ops.conv2d_bn_train import InputBN, conv2d_bn_train
from ...ops.conv2d_fused import arrange_weight
from .inference import fusable_pool
from .res2net import train_res2net_middle


def conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Every (conv, norm) pair of a block, the downsample's included."""
    if block.kind == "basic":
        pairs = [(block.conv1, block.norm1), (block.conv2, block.norm2)]
    elif block.kind == "bottle2neck":
        pairs = [(block.conv1, block.norm1), *zip(block.convs, block.bns)]
        pairs.append((block.conv3, block.norm3))
    else:
        pairs = [(block.conv1, block.norm1), (block.conv2, block.norm2)]
        pairs.append((block.conv3, block.norm3))
    if block.downsample is not None:
        pairs.append((block.downsample[-2], block.downsample[-1]))
        if len(block.downsample) == 3 and fusable_pool(block.downsample[0]) is None:
            pairs.append((block.downsample[0], None))  # a pool the kernel cannot fuse
    return pairs


def trainable(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> bool:
    """Whether the fused training path runs these units: every BN in training mode (batch
    statistics; BatchNorm2d, or SyncBatchNorm), affine, after a plain bias-free convolution,
    the extension built, and a non-empty batch (an empty one runs the oracle, which returns
    empty outputs)."""
    if bn_ops.EXTENSION_ERROR is not None or x.numel() == 0:
        return False
    return all(
        type(conv) is nn.Conv2d
        and conv.bias is None
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm)
        and bn.affine
        and (bn.training or bn.running_mean is None)
        for conv, bn in pairs
    )


class _Raw(NamedTuple):
    """A convolution's raw output and the training-mode BN that normalizes it."""

    y: Tensor
    bn: nn.Module
    stats: tuple[Tensor, Tensor, int]  # (mean, m2, count) over every process's batch
    group: str

    def input_bn(self) -> InputBN:
        mean, m2, count = self.stats
        return InputBN(mean, m2, count, self.bn.weight, self.bn.bias, self.bn.eps, self.group)

    def apply(self, relu: bool = True, residual: Tensor | None = None, shortcut=None) -> Tensor:
        """act(bn(y) [+ residual | + shortcut's bn(y)]), written out."""
        if shortcut is not None:
            shortcut = (shortcut.y, shortcut.stats, shortcut.bn.weight, shortcut.bn.bias,
                        shortcut.bn.eps)  # fmt: skip
        return bn_ops.bn_train_act(
            self.y, self.stats, self.bn.weight, self.bn.bias, self.bn.eps, residual, shortcut,
            relu, self.group,
        )  # fmt: skip


def _global_stats(
    bns: list[nn.Module], y: Tensor, mean: Tensor, m2: Tensor
) -> tuple[tuple[Tensor, Tensor, int], str]:
    """`batch_stats` of y for `bns` (consecutive equal channel ranges), and their SyncBN group."""
    group = bn_ops.sync_group_name(bns[0])
    return bn_ops.batch_stats(bns, y, mean, m2, group), group


def _train_conv(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor | _Raw,
    *,
    weight: Tensor | None = None,
    input_pool: int = 1,
    input_add: Tensor | None = None,
) -> _Raw:
    """conv(x) with its batch statistics; x a _Raw is normalized (+ ReLU) in the input load.

    weight: conv.weight in another channel layout (Res2Net's padded chunks), else None.
    """
    input_bn = None
    if isinstance(x, _Raw):
        x, input_bn = x.y, x.input_bn()
    weight = conv.weight if weight is None else weight
    y, mean, m2 = conv2d_bn_train(
        x, arrange_weight(weight.to(x.dtype)), stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, input_bn=input_bn, input_pool=input_pool, input_add=input_add,
    )  # fmt: skip
    stats, group = _global_stats([bn], y, mean, m2)
    return _Raw(y, bn, stats, group)


def train_stem(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> Tensor:
    """The stem's conv-BN-ReLU units (before the max-pool), each BN in the next conv's load."""
    raw = x.contiguous(memory_format=torch.channels_last)
    for conv, bn in pairs:
        raw = _train_conv(conv, bn, raw)
    return raw.apply()


def _train_shortcut(block: nn.Module, x: Tensor) -> _Raw | None:
    """The downsample conv's raw output (avg_down's pool in its input load), or None."""
    if block.downsample is None:
        return None
    *pools, conv, bn = block.downsample
    return _train_conv(conv, bn, x, input_pool=fusable_pool(pools[0]) if pools else 1)


def train_block(block: nn.Module, x: Tensor) -> Tensor:
    if block.kind == "basic":
        raw = _train_conv(block.conv2, block.norm2, _train_conv(block.conv1, block.norm1, x))
    elif block.kind == "bottle2neck":
        cat, weight = train_res2net_middle(block, x)
        raw = _train_conv(block.conv3, block.norm3, cat, weight=weight)
    else:
        raw = _train_conv(block.conv1, block.norm1, x)
        raw = _train_conv(block.conv2, block.norm2, raw)
        raw = _train_conv(block.conv3, block.norm3, raw)
    shortcut = _train_shortcut(block, x)
    return raw.apply(residual=x if shortcut is None else None, shortcut=shortcut)
