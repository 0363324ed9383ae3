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

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ... import extension
from ...ops import batchnorm as bn_ops
from ...ops.conv2d_bn_train import (
    NO_INPUT_BN,
    InputBN,
    OutputBN,
    TrainArgs,
    conv2d_bn_train,
    finalizing_body,
    train_backward,
)
from ...ops.conv2d_fused import apply_function, arrange_weight, dispatch_free, eager_autograd
from ...ops.precision import cast
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
        out = train_chain([unit], h.cat, shortcut, shortcut is None, block_input=x, weight=h.weight)
        if out is not None:
            return out
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


# -- A block (or the stem) as one autograd node ----------------------------------------------


class _Step(NamedTuple):
    """One convolution of a `_Chain`: its module (geometry), its BN (finalized in the merge
    launch), its fused input pool."""

    conv: nn.Conv2d
    output_bn: OutputBN
    input_pool: int = 1


class _Chain(NamedTuple):
    """What `_TrainChain` runs: convolutions one after the other, each normalizing the
    previous one's output + ReLU in its input load; then ReLU(the last one's BN [+ the block
    input (`identity`) | + `shortcut`'s BN of its convolution of the block input]) in one
    pass."""

    steps: tuple[_Step, ...]
    shortcut: _Step | None
    identity: bool


# The tensors a chain saves of each convolution's TrainArgs.
_SAVED_FIELDS = ("x", "weight", "in_mean", "in_m2", "in_weight", "in_bias", "in_scale",
                 "in_shift", "in_invstd")  # fmt: skip
_NO_NEEDS = TrainArgs(*[False] * len(TrainArgs._fields))


def train_chain(
    units: Sequence[Unit],
    x: Tensor,
    shortcut: Shortcut | None,
    identity: bool,
    *,
    block_input: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor | None:
    """A training-mode block's units (the last one its tail) or the stem's, as one autograd
    node (`_TrainChain`) rather than a node per convolution and one for the tail: the same
    launches and ops, without the per-node host cost. None where it does not run them: without
    gradients, under torch.compile / torch.func / anything that sees the dispatch (the ops then
    run one by one, so that it sees them), for SyncBN across processes and the cumulative
    average (`OutputBN.of`).

    Args:
        x: the first unit's input.
        shortcut: the block's downsample branch of block_input (its pool fusable, as
            `trainable` checks).
        identity: the block adds block_input (no downsample); neither: the stem.
        block_input: the block's input, where it is not x (a Bottle2neck's tail: x is the
            middle's concatenation).
        weight: the first unit's convolution weight, arranged, where it is not its module's
            (the Bottle2neck's padded conv3 weight).
    """
    if not eager_autograd():
        return None
    steps = []
    for unit in units if shortcut is None else (*units, shortcut.unit):
        output_bn = OutputBN.of(unit.norm)
        if output_bn is None:
            return None
        steps.append(_Step(unit.conv, output_bn))
    shortcut_step = None
    if shortcut is not None:
        pools = shortcut.pools
        shortcut_step = steps.pop()._replace(input_pool=fusable_pool(pools[0]) if pools else 1)
    chain = _Chain(tuple(steps), shortcut_step, identity)
    all_steps = steps if shortcut_step is None else (*steps, shortcut_step)
    params = [t for step in all_steps for t in step.output_bn[:2]]
    module_weights = [step.conv.weight for step in all_steps]
    if not dispatch_free((x, block_input, weight, *module_weights, *params)):
        return None
    weights = [arrange_weight(w, x.dtype) for w in module_weights[weight is not None :]]
    if weight is not None:
        weights.insert(0, weight)
    return apply_function(_TrainChain, chain, x, block_input, *weights, *params)


def _conv_args(step: _Step, x: Tensor, weight: Tensor, allow_tf32: bool, input_bn) -> TrainArgs:
    conv = step.conv
    return TrainArgs(
        x, weight, list(conv.stride), list(conv.padding), list(conv.dilation), 1, allow_tf32,
        step.input_pool, None, *input_bn,
    )  # fmt: skip


class _TrainChain(torch.autograd.Function):
    """`train_chain`'s node. Inputs: the `_Chain`, x, the block input (None: x), each
    convolution's arranged weight, each one's BN (weight, bias), the shortcut's last.
    Forward: the training convolution's body per convolution (`finalizing_body`), then
    `bn_apply`, as `TrainUnits` runs them; backward: the tail's `bn_backward`, then each
    convolution's (`train_backward`, which gives its input BN's parameter gradients) from the
    last to the first."""

    @staticmethod
    def forward(ctx, chain: _Chain, x: Tensor, block_input: Tensor | None, *tensors: Tensor):
        all_steps = chain.steps if chain.shortcut is None else (*chain.steps, chain.shortcut)
        weights = tensors[: len(all_steps)]
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
        convs, h, input_bn = [], x, NO_INPUT_BN
        for step, weight in zip(chain.steps, weights):
            args = _conv_args(step, h, weight, allow_tf32, input_bn)
            h, mean, m2, scale, shift, invstd = finalizing_body(step.output_bn, args, True)
            bn = step.output_bn
            count = h.numel() // h.shape[1]
            input_bn = (mean, m2, count, bn.weight, bn.bias, bn.eps, "", scale, shift, invstd)
            convs.append(args)
        residual = mean_r = scale_r = shift_r = invstd_r = None
        ctx.separate_input = block_input is not None
        block_input = x if block_input is None else block_input
        if chain.shortcut is not None:
            args = _conv_args(chain.shortcut, block_input, weights[-1], allow_tf32, NO_INPUT_BN)
            residual, mean_r, _, scale_r, shift_r, invstd_r = finalizing_body(
                chain.shortcut.output_bn, args
            )
            convs.append(args)
        elif chain.identity:
            residual = block_input
        variant = bn_ops.current_variant()
        # Below bn_apply's own (Python) autograd layer, which would only cost host time here.
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.fastres.bn_apply(
                h, scale, shift, residual, scale_r, shift_r, True, variant
            )
        ctx.chain, ctx.variant, ctx.count = chain, variant, count
        ctx.param_dtypes = [t.dtype for t in tensors[len(all_steps) :]]
        ctx.convs = [args._replace(**dict.fromkeys(_SAVED_FIELDS)) for args in convs]
        ctx.save_for_backward(
            *(getattr(args, name) for args in convs for name in _SAVED_FIELDS),
            h, mean, scale, shift, invstd, residual, mean_r, scale_r, shift_r, invstd_r,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        chain, needs = ctx.chain, ctx.needs_input_grad
        saved, k = ctx.saved_tensors, len(_SAVED_FIELDS)
        convs = [
            args._replace(**dict(zip(_SAVED_FIELDS, saved[i * k : (i + 1) * k])))
            for i, args in enumerate(ctx.convs)
        ]
        y, mean, scale, shift, invstd, r, mean_r, scale_r, shift_r, invstd_r = saved[-10:]
        # x's and the block input's gradients (one where the block input is x).
        need_x, need_input = needs[1], needs[2] if ctx.separate_input else needs[1]
        need_weights = needs[3 : 3 + len(convs)]
        need_params = needs[3 + len(convs) :]
        shortcut = chain.shortcut is not None
        want_r = r is not None and (need_input or (shortcut and need_weights[-1]))
        grad_y, grad_r, *tail_params = torch.ops.fastres.bn_backward(
            cast(grad_out, y.dtype), y, scale, shift, r, scale_r, shift_r, True, mean, invstd,
            mean_r, invstd_r, ctx.count, want_r, ctx.variant,
        )  # fmt: skip
        grad_weights = [None] * len(convs)
        grad_params = [None] * len(need_params)
        units = len(chain.steps)
        grad_params[2 * units - 2 : 2 * units] = tail_params[:2]
        grad_input = grad_x = None
        if shortcut:
            grad_params[-2:] = tail_params[2:]
            if want_r:
                needs_d = _NO_NEEDS._replace(x=need_input, weight=need_weights[-1])
                grads = TrainArgs(*train_backward(convs[-1], needs_d, grad_r))
                grad_input, grad_weights[-1] = grads.x, grads.weight
        elif want_r:
            grad_input = grad_r
        if not ctx.separate_input:
            grad_x, grad_input = grad_input, None
        for i in reversed(range(units)):
            # Whether anything before convolution i wants a gradient: x, a weight, a BN.
            upstream = need_x or any(need_weights[:i]) or any(need_params[: 2 * i])
            if not (upstream or need_weights[i]):
                break
            need_in = i > 0 and (need_params[2 * i - 2] or need_params[2 * i - 1])
            needs_i = _NO_NEEDS._replace(
                x=upstream, weight=need_weights[i], in_weight=need_in, in_bias=need_in
            )
            grads = TrainArgs(*train_backward(convs[i], needs_i, grad_y))
            grad_weights[i], grad_y = grads.weight, grads.x
            if i > 0:
                grad_params[2 * i - 2 : 2 * i] = grads.in_weight, grads.in_bias
            elif grad_y is not None:
                grad_x = grad_y if grad_x is None else grad_x + grad_y
        grad_params = [
            cast(g, dtype) if need and g is not None else None
            for g, need, dtype in zip(grad_params, need_params, ctx.param_dtypes)
        ]
        return None, grad_x, grad_input, *grad_weights, *grad_params
