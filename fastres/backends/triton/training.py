"""The triton backend's training path (BatchNorm in training mode: batch statistics).

Each convolution returns its raw output and that output's batch statistics from the kernel's
epilogue; the next convolution applies the BatchNorm (those statistics) + ReLU in its input
load, so within a block only raw convolution outputs are stored; the block's tail applies the
last BN with the shortcut (identity, or the downsample conv's output with its own BN) and the
ReLU in one pass (`bn_norm_act`). Each BatchNorm is finalized once, from the statistics
(all-gathered first for SyncBN), by the op that also updates its running statistics as
nn.BatchNorm2d does (`batchnorm.batch_normalized`); its consumers take the scale and shift.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from ... import extension
from ...ops import batchnorm as bn_ops
from ...ops.conv2d_bn_train import InputBN, OutputBN, conv2d_bn_train
from ...ops.conv2d_fused import arrange_weight
from ..plan import BlockPlan, Implementation, Shortcut, Unit
from .inference import fusable_pool
from .res2net import PaddedConcat, train_res2net_middle


def plan_pairs(plan: BlockPlan) -> list[tuple[nn.Module, nn.Module | None]]:
    """Every (conv, norm) pair of a block's plan, the shortcut's included; a shortcut pool the
    kernel cannot fuse comes as (pool, None)."""
    pairs = [(u.conv, u.norm) for u in plan.units]
    if plan.res2net is not None:
        pairs += list(zip(plan.res2net.convs, plan.res2net.bns))
    if plan.shortcut is not None:
        pools, unit = plan.shortcut
        pairs.append((unit.conv, unit.norm))
        if pools and (len(pools) > 1 or fusable_pool(pools[0]) is None):
            pairs.append((pools[0], None))
    return pairs


def trainable(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> bool:
    """Whether the fused training path runs these units: every BN in training mode (batch
    statistics; BatchNorm2d, or SyncBatchNorm), affine, after a plain bias-free convolution,
    the extension built, and a non-empty batch (an empty one runs the oracle, which returns
    empty outputs)."""
    if extension.EXTENSION_ERROR is not None or x.numel() == 0:
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


class Unnormalized(NamedTuple):
    """A convolution's raw output and the training-mode BN that normalizes it, finalized: what
    the training units hand each other (the next unit applies the BN + ReLU in its input
    load)."""

    y: Tensor
    stats: tuple[Tensor, Tensor, int]  # (mean, m2, count) over every process's batch
    norm: bn_ops.Normalized
    eps: float
    group: str

    @classmethod
    def of(cls, bn: nn.Module, y: Tensor, mean: Tensor, m2: Tensor) -> Unnormalized:
        """y with its BN finalized from this process's batch statistics (mean, m2): gathered
        over the SyncBN group, the running statistics updated in the same op."""
        group = bn_ops.sync_group_name(bn)
        mean, m2, count = bn_ops.gather_stats(y, mean, m2, group)
        return cls(
            y, (mean, m2, count), bn_ops.batch_normalized(bn, mean, m2, count), bn.eps, group
        )

    def input_bn(self) -> InputBN:
        (mean, m2, count), norm = self.stats, self.norm
        return InputBN(
            mean, m2, count, norm.weight, norm.bias, self.eps, self.group, norm.scale, norm.shift,
            norm.invstd,
        )  # fmt: skip

    def apply(
        self,
        relu: bool = True,
        residual: Tensor | None = None,
        shortcut: Unnormalized | None = None,
    ) -> Tensor:
        """act(bn(y) [+ residual | + shortcut's bn(y)]), written out."""
        count = self.stats[2]
        if shortcut is not None:
            if shortcut.stats[2] != count:
                raise ValueError(
                    f"the two BNs normalize {count} and {shortcut.stats[2]} values per channel"
                )
            shortcut = (shortcut.y, shortcut.norm)
        return bn_ops.bn_norm_act(self.y, self.norm, count, residual, shortcut, relu, self.group)


def _train_conv(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor,
    input_bn: InputBN | None = None,
    *,
    weight: Tensor | None = None,
    input_pool: int = 1,
    input_add: Tensor | None = None,
) -> Unnormalized:
    """conv(x) with its batch statistics and bn finalized from them (in the statistics' merge
    launch, `OutputBN`, but for SyncBN and the cumulative average); x normalized (+ ReLU) in
    the input load by `input_bn` when given.

    weight: conv.weight in another channel layout (Res2Net's padded chunks), else None.
    """
    weight = conv.weight if weight is None else weight
    output_bn = OutputBN.of(bn)
    y, mean, m2, *coefficients = conv2d_bn_train(
        x, arrange_weight(weight, x.dtype), stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, input_bn=input_bn, input_pool=input_pool, input_add=input_add,
        output_bn=output_bn,
    )  # fmt: skip
    if output_bn is None:
        return Unnormalized.of(bn, y, mean, m2)
    norm = bn_ops.Normalized(output_bn.weight, output_bn.bias, mean, *coefficients)
    return Unnormalized(y, (mean, m2, y.numel() // y.shape[1]), norm, output_bn.eps, "")


class TrainUnits(Implementation[Unnormalized, PaddedConcat]):
    """The training-mode unit operations: a unit's result is its raw convolution output
    (`Unnormalized`), whose BatchNorm + ReLU the next unit applies in its input load."""

    def first(self, unit: Unit, x: Tensor) -> Unnormalized:
        return _train_conv(unit.conv, unit.norm, x)

    def unit(self, unit: Unit, h: Unnormalized) -> Unnormalized:
        return _train_conv(unit.conv, unit.norm, h.y, h.input_bn())

    def output(self, h: Unnormalized) -> Tensor:
        return h.apply()

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> PaddedConcat:
        return train_res2net_middle(block, x)

    def tail(self, unit: Unit, h: Unnormalized, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        return self._add_shortcut(self.unit(unit, h), x, shortcut)

    def res2net_tail(
        self, unit: Unit, h: PaddedConcat, x: Tensor, shortcut: Shortcut | None
    ) -> Tensor:
        raw = _train_conv(unit.conv, unit.norm, h.cat, weight=h.weight)
        return self._add_shortcut(raw, x, shortcut)

    @staticmethod
    def _add_shortcut(raw: Unnormalized, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        """ReLU(raw's BN + the shortcut of x), one pass."""
        if shortcut is None:
            return raw.apply(residual=x)
        pools, (conv, bn, _) = shortcut
        downsample = _train_conv(conv, bn, x, input_pool=fusable_pool(pools[0]) if pools else 1)
        return raw.apply(shortcut=downsample)
