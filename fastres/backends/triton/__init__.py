"""The 'triton' backend: every convolution of the model through the fused Triton kernel.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the Triton interpreter, for tests).
For a block whose BatchNorms are in eval mode (`model.eval()`, norm_eval, frozen stages):

- each BatchNorm is folded into its convolution (w' = w * gamma / sqrt(var + eps),
  b' = beta - mean * gamma / sqrt(var + eps)), cached per conv until a parameter or buffer
  changes, never written back; when gradients are wanted the fold is recomputed with autograd
  ops each forward, so they reach the conv weight and the BN weight / bias (`inference.py`);
- conv + folded BN + ReLU is one kernel; the block's tail (last BN + shortcut + ReLU) is fused
  into its last conv; the avg_down pool is fused into the shortcut conv;
- Bottle2neck (`res2net.py`): no split, no concatenation, no hierarchical
  add tensor. Without autograd each 3x3 conv reads its chunk in place and writes its slice of
  the buffer conv3 reads; the 'normal' block's add happens in the conv's input load; a 'stage'
  block's chunk convs are one grouped launch; the last chunk is written there by conv1 itself
  or pooled there by a small Triton kernel. Every Res2Net path stores each chunk in an aligned,
  padded slot of channels (`_chunk_slot`).

For a block whose BatchNorms are in training mode (batch statistics), the fused training path
(`training.py`): raw conv outputs with their statistics from the
kernel's epilogue, each BN + ReLU applied in the next conv's input load, the tail in one pass.

The stem max-pool stays in PyTorch. Activations come out channels_last in the compute dtype
(the input's, or the autocast dtype). Falls back to the oracle (`forward_reference` /
`stem_reference`) for GroupNorm, BNs in mixed modes within a block, and float64 on CUDA (the
interpreter runs float64 through the kernels, for tests).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from ...ops.conv2d_fused import conv2d_fused, interpreting
from ..base import Backend
from ..plan import Implementation, Shortcut, Unit, run_block, run_units
from .inference import (
    block_foldable,
    compute_dtype,
    conv_bn,
    downsample_shortcut,
    foldable,
    forget_folded,
)
from .res2net import PaddedConcat, forget_launch_weights, split_conv_concat
from .training import TrainUnits, plan_pairs, train_chain, trainable

# Looked up once, without importing triton (slow, and the interpreter switch must be set first).
_TRITON_MISSING = importlib.util.find_spec("triton") is None


class TritonBackend(Backend):
    name = "triton"

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        if _TRITON_MISSING:
            return "triton is not installed"
        if device_type is None:
            if torch.cuda.is_available() or interpreting():
                return None
            return "no CUDA GPU, and CPU tensors run through Triton only under TRITON_INTERPRET=1"
        if device_type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA GPU"
        if device_type == "cpu":
            if interpreting():
                return None
            return "CPU tensors run through Triton only under TRITON_INTERPRET=1 (the interpreter)"
        return f"Triton kernels do not run on {device_type} tensors"

    def run_stem(self, model: nn.Module, x: Tensor) -> Tensor:
        units = model.stem_units()
        pairs = [(u.conv, u.norm) for u in units]
        dtype = compute_dtype(x)
        if dtype is not None and all(foldable(conv, bn) for conv, bn in pairs):
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
            return model.maxpool(run_units(_EVAL, units, x))
        if dtype is not None and trainable(pairs, x):
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
            out = train_chain(units, x, shortcut=None, identity=False)
            return model.maxpool(run_units(_TRAIN, units, x) if out is None else out)
        return model.stem_reference(x)

    def forget(self, modules: list[nn.Module]) -> None:
        forget_folded(modules)
        forget_launch_weights(modules)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        plan = block.plan()
        dtype = compute_dtype(x)
        if dtype is None:  # float64 on CUDA
            return block.forward_reference(x)
        pairs = plan_pairs(plan)
        # Eval first, the common case: a block is never both (a BN is in training mode or not).
        if block_foldable(pairs):
            return run_block(_EVAL, plan, x.to(dtype))
        if trainable(pairs, x):
            x = x.to(dtype)
            if plan.res2net is None:
                out = train_chain(plan.units, x, plan.shortcut, identity=plan.shortcut is None)
                if out is not None:
                    return out
            return run_block(_TRAIN, plan, x)
        # GroupNorm, float64, BNs in mixed modes: the oracle runs them.
        return block.forward_reference(x)


class _EvalUnits(Implementation[Tensor, PaddedConcat]):
    """The eval-mode unit operations: conv + folded BN (+ residual) (+ ReLU), one kernel each;
    a Bottle2neck's middle without split or concat copies (`res2net.py`). Inputs come in the
    compute dtype: this backend converts a block's input once, and every unit's output is in
    its input's dtype."""

    def forget(self, modules: list[nn.Module]) -> None:
        forget_folded(modules)

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        return conv_bn(unit.conv, unit.norm, x, relu=unit.relu)

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> PaddedConcat:
        return split_conv_concat(block, x)

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        identity = x if shortcut is None else downsample_shortcut(shortcut, x)
        return conv_bn(unit.conv, unit.norm, h, relu=True, residual=identity)

    def res2net_tail(
        self, unit: Unit, h: PaddedConcat, x: Tensor, shortcut: Shortcut | None
    ) -> Tensor:
        identity = x if shortcut is None else downsample_shortcut(shortcut, x)
        return conv2d_fused(h.cat, h.weight, h.bias, relu=True, residual=identity)


class _ConvertingEvalUnits(_EvalUnits):
    """`_EvalUnits` for 'auto' (`fastres.backends.select`), where a unit's input may come from
    another implementation: each input is taken to the compute dtype first."""

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        return super().unit(unit, x.to(compute_dtype(x)))

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        return super().tail(unit, h.to(compute_dtype(h)), x.to(compute_dtype(x)), shortcut)


_EVAL, _TRAIN = _EvalUnits(), TrainUnits()
BACKEND = TritonBackend()
EVAL_UNITS = _ConvertingEvalUnits()


def runs_units(device: torch.device, site) -> bool:
    """Whether the eval-mode units compute a unit site (`fastres.backends.select`)."""
    if BACKEND.unavailable_reason(device.type) is not None or compute_dtype(site.h) is None:
        return False
    return all(foldable(conv, bn) for conv, bn in site.pairs())
