"""How a block's convolutions, norms, shortcut and ReLUs connect, declared once, and the one
executor that walks it with an implementation's unit operations.

A block's `plan()` (`BlockPlan`) lists its units (conv -> norm [-> ReLU]) in order; the last
unit is the tail: conv -> norm -> + shortcut -> ReLU, the shortcut being the identity or the
downsample (`Shortcut`: avg_down's pools, then a conv -> norm unit). A Bottle2neck's plan has
two units, conv1 and conv3, and between them its split -> 3x3 convs -> concat (`res2net`, the
block itself, which owns the chunk convs, their norms and the last-chunk pool). The model's stem
is a list of units before the max-pool (`run_stem`).

An implementation (`Implementation[H, M]`) computes units; it declares what its units hand each
other (H: a tensor, or the triton training path's raw convolution output whose BatchNorm the next
unit applies in its input load) and what a Bottle2neck's middle hands conv3 (M). A block's or
stem's first unit takes the input tensor (`first`). The oracle is this executor with
`Reference`, so every backend shares the oracle's wiring.

A model keeps each block's plan (and its stem's units) from one forward to the next
(`kept_plan`) and builds it again only after the module structure changed: any submodule,
parameter or buffer registered anywhere in the process (assignment, `add_module`,
`register_buffer`, `SyncBatchNorm.convert_sync_batchnorm`, a replaced submodule inside a
container), any submodule deleted from a block, or `model.refresh()`. Not seen without
`refresh()`: a submodule deleted from inside a container of a block (`del block.downsample[0]`).
Kept plans are this process's alone: copies and pickles of a model do not carry them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)


class Unit(NamedTuple):
    """conv -> norm [-> ReLU]; in a block's tail the ReLU comes after the shortcut's add."""

    conv: nn.Conv2d
    norm: nn.Module
    relu: bool = True


class Shortcut(NamedTuple):
    """The downsample branch: pools (avg_down's AvgPool2d, or none), then conv -> norm."""

    pools: tuple[nn.Module, ...]
    unit: Unit


class BlockPlan(NamedTuple):
    units: tuple[Unit, ...]
    shortcut: Shortcut | None  # None: the identity
    # A Bottle2neck, whose middle runs between the two units; weakly, so that a block keeping
    # its own plan is no reference cycle (which would keep a deleted model's memory until the
    # garbage collector's next full pass).
    res2net_ref: weakref.ref | None = None

    @property
    def res2net(self) -> nn.Module | None:
        """The Bottle2neck whose middle runs between the two units, or None."""
        return None if self.res2net_ref is None else self.res2net_ref()

    def norms(self) -> list[nn.Module]:
        """Every norm the block runs: its units', its shortcut unit's and its Bottle2neck
        middle's."""
        units = self.units if self.shortcut is None else (*self.units, self.shortcut.unit)
        middle = self.res2net
        return [u.norm for u in units] + ([] if middle is None else list(middle.bns))


def shortcut_of(downsample: nn.Sequential | None) -> Shortcut | None:
    """The `Shortcut` of a block's downsample module ([pools...,] conv, norm), or None."""
    if downsample is None:
        return None
    *pools, conv, norm = downsample
    return Shortcut(tuple(pools), Unit(conv, norm, relu=False))


# Bumped by every module, parameter and buffer registration of the process (and by
# `structure_changed`): a kept plan made under another value is built again.
_structure = 0


def structure_changed(*args) -> None:
    """Makes every kept plan of the process stale (a registration hook, hence the arguments)."""
    global _structure
    _structure += 1


for _register in (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
    register_module_buffer_registration_hook,
):
    _register(structure_changed)

KEPT_PLAN = "_fastres_plan"  # the module attribute `kept_plan` keeps a plan in
P = TypeVar("P")


def kept_plan(module: nn.Module, build: Callable[[], P]) -> P:
    """`build()`, kept in `module` until the module structure changes (module docstring).

    Not through nn.Module's attribute machinery, which costs more than a plan lookup may.
    """
    kept = module.__dict__.get(KEPT_PLAN)
    if kept is not None and kept[0] == _structure:
        return kept[1]
    generation = _structure  # before building: a change while it builds leaves it stale
    plan = build()
    module.__dict__[KEPT_PLAN] = (generation, plan)
    return plan


H = TypeVar("H")  # what an implementation's units hand each other
M = TypeVar("M")  # what its Bottle2neck middle hands conv3


class Implementation(Generic[H, M]):
    """The unit operations an executor needs (see the module docstring for H and M)."""

    def first(self, unit: Unit, x: Tensor) -> H:
        """`unit` on a block's (or the stem's) input tensor; `unit` itself where H is Tensor."""
        return self.unit(unit, x)

    def unit(self, unit: Unit, h: H) -> H:
        """act(norm(conv(h)))."""
        raise NotImplementedError

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> M:
        """conv1's unit, then the Bottle2neck's split -> 3x3 convs -> concat: conv3's input."""
        raise NotImplementedError

    def tail(self, unit: Unit, h: H, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        """ReLU(norm(conv(h)) + shortcut(x)), shortcut(x) = x for the identity."""
        raise NotImplementedError

    def res2net_tail(self, unit: Unit, h: M, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        """`tail` of a Bottle2neck, whose h is what `res2net` returned."""
        return self.tail(unit, h, x, shortcut)

    def output(self, h: H) -> Tensor:
        """The activation tensor of a unit's result (the stem's last unit, before its pool)."""
        return h

    def forget(self, modules: list[nn.Module]) -> None:
        """Drops what this implementation keeps for these modules (folded weights): it lost
        their site to another one (`fastres.backends.select`)."""


def run_block(impl: Implementation, plan: BlockPlan, x: Tensor) -> Tensor:
    """A block's forward with `impl`'s unit operations."""
    *head, last = plan.units
    if plan.res2net is not None:
        (conv1,) = head
        middle = impl.res2net(plan.res2net, conv1, x)
        return impl.res2net_tail(last, middle, x, plan.shortcut)
    first, *rest = head
    h = impl.first(first, x)
    for unit in rest:
        h = impl.unit(unit, h)
    return impl.tail(last, h, x, plan.shortcut)


def run_units(impl: Implementation, units: Sequence[Unit], x: Tensor) -> Tensor:
    """Units one after the other (the stem before its max-pool)."""
    first, *rest = units
    h = impl.first(first, x)
    for unit in rest:
        h = impl.unit(unit, h)
    return impl.output(h)


class Reference(Implementation[Tensor, Tensor]):
    """The oracle: PyTorch's modules, as OpenMMLab's blocks call them, with their in-place ReLUs
    (the eager and torch.compile peers of the benchmarks run this, so it keeps their memory)."""

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        y = unit.norm(unit.conv(x))
        return F.relu(y, inplace=True) if unit.relu else y

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> Tensor:
        out = self.unit(conv1, x)
        chunks = torch.split(out, block.width, 1)
        sp = F.relu(block.bns[0](block.convs[0](chunks[0].contiguous())), inplace=True)
        outs = [sp]
        for i in range(1, block.scales - 1):
            sp = chunks[i] if block.stage_type == "stage" else sp + chunks[i]
            sp = F.relu(block.bns[i](block.convs[i](sp.contiguous())), inplace=True)
            outs.append(sp)
        last = chunks[block.scales - 1]
        outs.append(block.pool(last) if block.pools_last_chunk else last)
        return torch.cat(outs, 1)

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        identity = x
        if shortcut is not None:
            for pool in shortcut.pools:
                identity = pool(identity)
            identity = self.unit(shortcut.unit, identity)
        return F.relu(unit.norm(unit.conv(h)) + identity, inplace=True)


REFERENCE = Reference()
