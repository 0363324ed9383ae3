"""When a cached fold is stale: the one rule behind every fused backend's folded-weight cache.

The fused backends fold each eval-mode BatchNorm into its convolution and keep the result per
convolution (native: oneDNN-prepacked, and cuDNN's form; triton: arranged for the kernel, and a
Res2Net block's launch weights built from those). An entry is used only while `fold_key` is
what it was when the entry was made:

- the storage and version counter of each tensor folded (conv weight and bias, BN weight,
  bias, running statistics): an in-place write through PyTorch ops bumps the version (a
  foreach or for-loop optimizer step, `torch.no_grad()` updates, `load_state_dict`, the fused
  backends' own running-statistics updates), a new tensor has a new storage;
- the version of `num_batches_tracked`: nn.BatchNorm2d's own training forward (the 'torch'
  backend, or a block where 'auto' chose the oracle) writes the running statistics inside
  its kernel without bumping their versions, but counts the batch with an in-place add;
- the generation, one counter for the process, which `invalidate()` advances: after every
  step of a `torch.optim` optimizer (a global step hook: fused steps, `fused=True`, write
  without bumping versions), when a fastres model switches between train() and eval(), on
  its `load_state_dict` and `.to()` / dtype / device changes, and on `model.refresh()`.
  Process-wide on purpose: a step hook cannot tell cheaply which model an optimizer updates,
  and then writes made right after a step (an EMA copy updated through `.data`) are seen too.

Inside a CUDA graph capture no entry is used (and none made there is used after it): a cached
fold would enter the graph as a constant, and each replay would compute with the weights of
the last eager call, however the parameters changed since. Folded inside the capture, the fold
is part of the graph and each replay folds the parameters' values of its moment.

Not seen: a write that bypasses the version counter (`p.data.add_(...)`, `p.data = t`, a
kernel writing a tensor's memory) with no optimizer step and no train() / eval() switch
after it. Call `model.refresh()` after such a write.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..ops import tuning

_generation = 0

# Every fold cache, so that `refresh` reaches them all.
_CACHES: list[weakref.WeakKeyDictionary] = []


def new_cache() -> weakref.WeakKeyDictionary:
    """A fold cache: module -> what a backend keeps for it (with the `fold_key` it was made
    under), weak so that copies and deleted models leave no state; `refresh` drops entries."""
    cache = weakref.WeakKeyDictionary()
    _CACHES.append(cache)
    return cache


def invalidate() -> None:
    """Makes every cached fold of the process stale: the next forward of each unit folds
    again."""
    global _generation
    _generation += 1


def refresh(modules) -> None:
    """Invalidates every cached fold and drops those kept for `modules` (their memory)."""
    invalidate()
    for module in modules:
        for cache in _CACHES:
            cache.pop(module, None)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    invalidate()


register_optimizer_step_post_hook(_after_optimizer_step)


def fold_key(conv: nn.Module, bn: nn.Module) -> tuple:
    """What a fold of `bn` into `conv` depends on (see the module docstring), cheap to build:
    it is built for every unit of every forward. Inside a capture, a key that matches no
    other."""
    try:
        # The tensors from the modules' own dicts: nn.Module's attribute lookup costs more
        # than the rest of the key (bench/results/README.md, "Measurements behind comments").
        params, bn_params, buffers = conv._parameters, bn._parameters, bn._buffers
        tensors = (params["weight"], params["bias"], bn_params["weight"], bn_params["bias"],
                   buffers["running_mean"], buffers["running_var"],
                   buffers["num_batches_tracked"])  # fmt: skip
    except KeyError:  # a tensor computed on access (a parametrization)
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                   bn.num_batches_tracked)  # fmt: skip
    key = [object() if tuning.capturing(tensors[0].device) else _generation, bn.eps]
    for t in tensors:
        key += (None, None) if t is None else (t.data_ptr(), t._version)
    return tuple(key)
