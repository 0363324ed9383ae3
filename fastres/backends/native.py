"""The 'native' backend: PyTorch convolution + the fused BatchNorm ops of fastres._C.

Every conv -> BatchNorm [-> + shortcut] [-> ReLU] unit of the stem and of the blocks runs as
PyTorch's own convolution (oneDNN on CPU, cuDNN on CUDA) followed by one fused element-wise op:

- BatchNorm in eval mode (eval(), norm_eval, frozen stages): the BN is an affine map. Without
  autograd it is folded into the convolution (weights cached per module until they are stale,
  `fold_cache`, never written back); with autograd (BN-frozen layers in training) the
  per-channel scale and shift are computed with torch ops so that gradients reach the conv and
  BN parameters, and `fastres::bn_apply` applies them.
- BatchNorm in training mode: `fastres::bn_stats`, then `bn_finalize` / `bn_apply` forward and
  `bn_backward_reduce` / `bn_backward_elemt` backward as one autograd-registered op per unit
  (`fastres::bn_train_act`); the running statistics are updated outside the ops, as
  nn.BatchNorm2d updates them. SyncBatchNorm all-gathers the statistics before the op and
  all-reduces the backward's per-channel sums inside it.
- A downsample shortcut's BN is applied in the same pass as the block's last BN (the two-BN
  form of `bn_apply`).

On CPU, the stem and every block run inside a `cpu_cache.scope`: their large buffers come from
blocks that earlier forwards freed, which are still mapped (no first-touch page faults).

Blocks with norms this backend does not fuse (GroupNorm, BN without affine parameters) and
degenerate inputs (an empty batch, one value per channel in training) run the oracle.

For the 'auto' selection (`select.py`) this module offers four unit implementations, each with
a predicate saying where it runs (`runs_*`): `ONEDNN_UNITS` (what this backend runs), `UNITS`
(never prepacked: PyTorch's convolution + `bn_apply`), `FAST_BN_UNITS` (`UNITS` on the
bandwidth-bound CUDA BN kernels, `fastres.ops.batchnorm.kernel_variant` 1; with
`FAST_BN_BACKEND`, the same for whole blocks) and `CUDNN_UNITS` (cuDNN's fused
`cudnn_convolution_relu` / `cudnn_convolution_add_relu` with the BN folded in; CUDA inference).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .. import cpu_cache, extension
from ..ops import batchnorm as bn_ops
from ..ops.precision import accumulator_dtype
from .base import Backend
from .fold_cache import fold_key, new_cache
from .folding import fold, uses_batch_stats
from .plan import Implementation, Shortcut, Unit, run_block, run_units


def _fusable(bn: nn.Module) -> bool:
    """Whether this backend runs `bn` itself (else the block runs the oracle)."""
    if not getattr(bn, "affine", False):
        return False
    # SyncBN in training mode all-gathers its batch statistics (see `_stats_updating_running`).
    return type(bn) in (nn.BatchNorm2d, nn.SyncBatchNorm)


def _batch_normalized(bn: nn.Module, y: Tensor, group: str) -> tuple[bn_ops.Normalized, int]:
    """bn on y's batch (every process's for SyncBN) and the count; updates bn's running stats."""
    mean, m2 = bn_ops.bn_stats(y.detach())  # constants to autograd: see `bn_norm_act`
    mean, m2, count = bn_ops.gather_stats(y, mean, m2, group)
    return bn_ops.batch_normalized(bn, mean, m2, count), count


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _bn_act(
    bn: nn.Module,
    y: Tensor,
    relu: bool,
    residual: Tensor | None = None,
    shortcut: tuple[nn.Module, Tensor] | None = None,
) -> Tensor:
    """act(bn(y) + residual) or act(bn(y) + bn_d(y_d)) with shortcut = (bn_d, y_d) [N, C, H, W]."""
    if shortcut is not None:
        bn_d, y_d = shortcut
        if uses_batch_stats(bn) != uses_batch_stats(bn_d) or (
            bn_ops.sync_group_name(bn) != bn_ops.sync_group_name(bn_d)
        ):
            # Mixed modes (BNs set by hand): the shortcut's BN on its own pass.
            return _bn_act(bn, y, relu, residual=_bn_act(bn_d, y_d, relu=False))
        y, y_d = _common_dtype(y, y_d)
    elif residual is not None:
        y, residual = _common_dtype(y, residual)
    if uses_batch_stats(bn):
        group = bn_ops.sync_group_name(bn)
        norm, count = _batch_normalized(bn, y, group)
        if shortcut is not None:
            norm_d, count_d = _batch_normalized(shortcut[0], y_d, group)
            assert count_d == count, "a block's two BNs normalize the same batch"
            shortcut = (y_d, norm_d)
        return bn_ops.bn_norm_act(y, norm, count, residual, shortcut, relu, group)
    # Running statistics with autograd (BN-frozen training) or under torch.compile.
    if shortcut is not None:
        shortcut = (y_d, bn_ops.running_normalized(shortcut[0]))
    return bn_ops.bn_norm_act(y, bn_ops.running_normalized(bn), 0, residual, shortcut, relu)


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return conv._conv_forward(x, conv.weight, conv.bias)


# oneDNN's fused convolution (prepacked weights, bias / add post-ops), as
# torch.compile uses it on CPU; absent from builds without oneDNN.
_MKLDNN_CONV = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_convolution_pointwise"
)


class _Folded(NamedTuple):
    key: tuple
    weight: Tensor  # BN-scaled conv weight, oneDNN-prepacked for the input shape
    bias: Tensor  # [C_out]: BN shift (+ scaled conv bias)


# conv module -> its folded weights.
_FOLDED = new_cache()


def _prepackable(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> bool:
    """Whether this unit may run folded into a prepacked oneDNN convolution.

    Only for inference: no autograd, no tracing (the cache keys on storage and versions),
    fp32 CPU tensors without autocast, BN on running statistics, zero padding.
    """
    if not (_MKLDNN_CONV and x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    if uses_batch_stats(bn) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False
    if conv.weight.dtype != torch.float32:
        return False
    return _without_autograd(conv, bn, x)


def _without_autograd(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> bool:
    """Whether no gradient flows through this unit: grad mode off, or nothing requires grad."""
    if not torch.is_grad_enabled():
        return True
    # The parameters by name: Module.parameters() walks the module tree, which costs more per
    # unit than a forward can spare (bench/results/README.md, "Measurements behind comments").
    params = (x, conv.weight, conv.bias, bn.weight, bn.bias)
    return not any(p is not None and p.requires_grad for p in params)


def _folded(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> _Folded:
    """The conv weight with `bn` folded in, cached until it is stale (`fold_cache`)."""
    key = (fold_key(conv, bn), tuple(x.shape))
    cached = _FOLDED.get(conv)
    if cached is not None and cached.key == key:
        return cached
    # Weights live as long as the model: when it goes, they go back to the C library, not the cache.
    with torch.no_grad(), cpu_cache.paused():
        weight, bias = fold(conv, bn, torch.float32)
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            weight.contiguous(), list(conv.padding), list(conv.stride), list(conv.dilation),
            conv.groups, list(x.shape),
        )  # fmt: skip
    folded = _Folded(key, weight, bias.contiguous())
    _FOLDED[conv] = folded
    return folded


def _fused_conv(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor,
    relu: bool = True,
    residual: Tensor | None = None,
    residual_is_scratch: bool = False,
) -> Tensor:
    """act(conv_folded(x) [+ residual]): one oneDNN call and the ReLU (inference only, see
    _prepackable).

    residual_is_scratch: the residual is a temporary of this backend (a shortcut conv's
    output) that oneDNN may overwrite with the result, which saves a fresh output buffer
    (its page faults cost more than the copy-free add on CPU).
    """
    if x.stride(1) == 1 and not x.is_contiguous(memory_format=torch.channels_last):
        # A channel slice of a channels_last tensor (a Res2Net chunk): oneDNN convolves it
        # through its strides slower than a copy takes (bench/results/README.md,
        # "Measurements behind comments").
        x = x.contiguous(memory_format=torch.channels_last)
    f = _folded(conv, bn, x)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if residual is None:
        y = torch.ops.mkldnn._convolution_pointwise(x, f.weight, f.bias, *geometry, "none", [], "")
    else:
        fmt = bn_ops.memory_format_of(x)
        if residual_is_scratch and residual.is_contiguous(memory_format=fmt):
            y = torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, f.weight, f.bias, *geometry, "add", 1.0, None, [], "",
            )  # fmt: skip
        else:
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.contiguous(memory_format=fmt), f.weight, f.bias, *geometry,
                "add", 1.0, None, [], "",
            )  # fmt: skip
    # The ReLU runs after oneDNN, not as its post-op: oneDNN's ReLU maps NaN to 0, which
    # would hide a diverged model; torch's keeps NaN, as PyTorch's own model does.
    return y.relu_() if relu else y


def _conv_bn_act(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor,
    relu: bool = True,
    residual: Tensor | None = None,
    shortcut: tuple[nn.Conv2d, nn.Module, Tensor] | None = None,
    prepacked: bool = True,
) -> Tensor:
    """act(bn(conv(x)) [+ residual | + bn_d(conv_d(x_d))]), shortcut = (conv_d, bn_d, x_d).

    prepacked: fold eval-mode BNs into prepacked oneDNN convolutions where `_prepackable` allows.
    """
    if prepacked and _prepackable(conv, bn, x) and (shortcut is None or _prepackable(*shortcut)):
        if shortcut is not None:
            residual = _fused_conv(*shortcut, relu=False)
        if residual is None or residual.dtype == x.dtype:
            return _fused_conv(
                conv, bn, x, relu, residual, residual_is_scratch=shortcut is not None
            )
    if _foldable(conv, bn, x) and (shortcut is None or _foldable(*shortcut)):
        y = _folded_conv(conv, bn, x)
        if shortcut is not None:
            residual = _folded_conv(*shortcut)
        return _residual_act(y, residual, relu)
    if shortcut is not None:
        conv_d, bn_d, x_d = shortcut
        return _bn_act(bn, _conv(conv, x), relu, residual, (bn_d, _conv(conv_d, x_d)))
    return _bn_act(bn, _conv(conv, x), relu, residual)


def _nonempty(x: Tensor) -> bool:
    """Empty batches run the oracle, which returns empty outputs of the right shapes."""
    return x.numel() > 0


class NativeBackend(Backend):
    name = "native"

    def unavailable_reason(self, device_type: str | None = None) -> str | None:
        if extension.EXTENSION_ERROR is not None:
            return extension.EXTENSION_ERROR
        if device_type == "cuda" and not extension.cuda_kernels_built():
            return (
                "fastres._C was built without its CUDA kernels (CPU-only torch or no nvcc at "
                "build time; rebuild with FASTRES_CUDA=1)"
            )
        if device_type not in (None, "cpu", "cuda"):
            return f"fastres._C has no kernels for {device_type} tensors"
        return None

    def run_stem(self, model: nn.Module, x: Tensor) -> Tensor:
        units = model.stem_units()
        if not (all(_fusable(u.norm) for u in units) and _nonempty(x)):
            return model.stem_reference(x)
        cpu_cache.close_stale_backward_scope()
        with cpu_cache.scope(x.device):
            x = model.maxpool(run_units(_UNITS, units, x))
        cpu_cache.scope_backward(x)
        return x

    def forget(self, modules: list[nn.Module]) -> None:
        _UNITS.forget(modules)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        plan = block.plan()
        if not (all(map(_fusable, plan.norms())) and _nonempty(x)):
            return block.forward_reference(x)
        with cpu_cache.scope(x.device):
            out = run_block(_UNITS, plan, x)
        cpu_cache.scope_backward(out)
        return out


class _Units(Implementation[Tensor, Tensor]):
    """The native unit operations: PyTorch's convolution + one fused BatchNorm pass each
    (`_conv_bn_act`); `prepacked`: inference units as prepacked oneDNN convolutions."""

    def __init__(self, prepacked: bool = True):
        self.prepacked = prepacked

    def forget(self, modules: list[nn.Module]) -> None:
        for conv in modules:
            _FOLDED.pop(conv, None)
            _PLAIN_FOLDED.pop(conv, None)

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        return _conv_bn_act(unit.conv, unit.norm, x, unit.relu, prepacked=self.prepacked)

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        if shortcut is None:
            return _conv_bn_act(unit.conv, unit.norm, h, True, x, prepacked=self.prepacked)
        for pool in shortcut.pools:  # avg_down's AvgPool2d
            x = pool(x)
        downsample = (shortcut.unit.conv, shortcut.unit.norm, x)
        return _conv_bn_act(
            unit.conv, unit.norm, h, True, shortcut=downsample, prepacked=self.prepacked
        )

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> Tensor:
        out = self.unit(conv1, x)
        # Chunks stay views of conv1's output.
        chunks = torch.split(out, block.width, 1)
        # Without autograd, and where the chunk convolutions keep the spatial size, conv1's
        # output becomes the concatenation: each chunk's result overwrites the chunk once it has
        # been read, and the last chunk is already in place (no torch.cat copy).
        in_place = block.conv2_stride == 1 and not (
            block.pools_last_chunk or torch.is_grad_enabled()
        )
        outs = []

        def store(i: int, sp: Tensor) -> None:
            if in_place:
                chunks[i].copy_(sp)
            else:
                outs.append(sp)

        sp = _conv_bn_act(block.convs[0], block.bns[0], chunks[0])
        for i in range(1, block.scales - 1):
            sp_in = chunks[i] if block.stage_type == "stage" else sp + chunks[i]
            store(i - 1, sp)
            sp = _conv_bn_act(block.convs[i], block.bns[i], sp_in)
        store(block.scales - 2, sp)
        if in_place:
            return out
        last = chunks[block.scales - 1]
        outs.append(block.pool(last) if block.pools_last_chunk else last)
        return torch.cat(outs, 1)


class _FastBnUnits(_Units):
    """`_Units` whose BatchNorm ops run the bandwidth-bound CUDA kernels (variant 1,
    csrc/cuda/batchnorm_fast_kernels.cu): an 'auto' candidate beside `UNITS` until measured on
    a GPU (`runs_fast_bn`), so that it must agree with the oracle before it may win."""

    def __init__(self):
        super().__init__(prepacked=False)

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        with bn_ops.kernel_variant(1):
            return super().unit(unit, x)

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        with bn_ops.kernel_variant(1):
            return super().tail(unit, h, x, shortcut)

    def res2net(self, block: nn.Module, conv1: Unit, x: Tensor) -> Tensor:
        with bn_ops.kernel_variant(1):
            return super().res2net(block, conv1, x)


class _FastBnBackend(NativeBackend):
    """The native backend with the BatchNorm ops on kernel variant 1 (see `_FastBnUnits`):
    the 'auto' candidate of whole blocks and stems (training, Res2Net) on CUDA
    (`runs_fast_bn_blocks`)."""

    def run_stem(self, model: nn.Module, x: Tensor) -> Tensor:
        with bn_ops.kernel_variant(1):
            return super().run_stem(model, x)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        with bn_ops.kernel_variant(1):
            return super().run_block(block, x)


class _CudnnUnits(Implementation[Tensor, Tensor]):
    """cuDNN's own fused convolutions with the BN folded into weight and bias:
    `cudnn_convolution_relu`, and `cudnn_convolution_add_relu` for a tail (inference on CUDA,
    see `runs_cudnn_fused`)."""

    def forget(self, modules: list[nn.Module]) -> None:
        for conv in modules:
            _PLAIN_FOLDED.pop(conv, None)

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        weight, bias = _plain_folded(unit.conv, unit.norm, _compute_dtype(x), torch.channels_last)
        x = x.to(weight.dtype)
        if unit.relu:
            return torch.cudnn_convolution_relu(x, weight, bias, *_geometry(unit.conv))
        return torch.nn.functional.conv2d(x, weight, bias, *_geometry(unit.conv))

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        if shortcut is not None:
            for pool in shortcut.pools:
                x = pool(x)
            x = self.unit(shortcut.unit, x)
        weight, bias = _plain_folded(unit.conv, unit.norm, _compute_dtype(h))
        h = h.to(weight.dtype)
        z = x.to(weight.dtype).contiguous(memory_format=bn_ops.memory_format_of(h))
        return torch.cudnn_convolution_add_relu(h, weight, z, 1.0, bias, *_geometry(unit.conv))


def _geometry(conv: nn.Conv2d) -> tuple:
    return conv.stride, conv.padding, conv.dilation, conv.groups


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype x's convolution computes in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# conv module -> (key, (folded weight, bias) in the compute dtype), for the folded units.
_PLAIN_FOLDED = new_cache()


def _plain_folded(
    conv: nn.Conv2d,
    bn: nn.Module,
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.channels_last,
) -> tuple[Tensor, Tensor]:
    """conv's weight with `bn` folded in (`memory_format`; channels_last: cuDNN's fused
    calls), and the bias, in `dtype`."""
    key = (fold_key(conv, bn), dtype, memory_format)
    cached = _PLAIN_FOLDED.get(conv)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        weight, bias = fold(conv, bn, accumulator_dtype(dtype))
        folded = (weight.to(dtype).contiguous(memory_format=memory_format), bias.to(dtype))
    _PLAIN_FOLDED[conv] = (key, folded)
    return folded


def _foldable(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> bool:
    """Whether this unit may run as one convolution with `bn` folded into its weight and bias
    (`_folded_conv`): inference (no autograd), no tracing (the cache keys on storage and
    versions), BN on running statistics, floating-point compute dtype."""
    if uses_batch_stats(bn) or torch.compiler.is_compiling():
        return False
    return _compute_dtype(x).is_floating_point and _without_autograd(conv, bn, x)


def _folded_conv(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> Tensor:
    """bn(conv(x)) as one convolution with the folded weight and bias, in the compute dtype
    (under autocast, the weights are already in its dtype: no cast per forward)."""
    weight, bias = _plain_folded(conv, bn, _compute_dtype(x), bn_ops.memory_format_of(x))
    return conv._conv_forward(x, weight, bias)


def _residual_act(y: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """act(y [+ residual]) in y's memory (y is this backend's temporary): one pass."""
    if residual is None:
        return y.relu_() if relu else y
    if residual.dtype != y.dtype:
        y, residual = _common_dtype(y, residual)
    if relu:
        return bn_ops.add_relu_(y, residual)
    return y.add_(residual)


BACKEND = NativeBackend()
UNITS, ONEDNN_UNITS, CUDNN_UNITS = _Units(prepacked=False), _Units(), _CudnnUnits()
FAST_BN_UNITS, FAST_BN_BACKEND = _FastBnUnits(), _FastBnBackend()
_UNITS = ONEDNN_UNITS  # what the native backend runs: prepacked wherever it may


def runs_units(device: torch.device, site) -> bool:
    """Whether `_Units` computes a unit site (`fastres.backends.select`) itself."""
    if BACKEND.unavailable_reason(device.type) is not None or not _nonempty(site.h):
        return False
    return all(_fusable(bn) for _, bn in site.pairs())


def runs_fast_bn(device: torch.device, site) -> bool:
    """`FAST_BN_UNITS`: where `_Units` runs, on CUDA (elsewhere the variant changes nothing)."""
    return device.type == "cuda" and runs_units(device, site)


def runs_fast_bn_blocks(device: torch.device, site) -> bool:
    """`FAST_BN_BACKEND`: where the native backend runs, on CUDA."""
    return device.type == "cuda" and FAST_BN_BACKEND.unavailable_reason(device.type) is None


def runs_onednn(device: torch.device, site) -> bool:
    """Whether the prepacked oneDNN form applies to every convolution of a unit site."""
    if not runs_units(device, site):
        return False
    if site.x is not None and site.shortcut is None and site.x.dtype != site.h.dtype:
        return False
    inputs = [site.h, site.h if site.x is None else site.x]
    return all(_prepackable(conv, bn, x) for (conv, bn), x in zip(site.pairs(), inputs))


def runs_cudnn_fused(device: torch.device, site) -> bool:
    """cuDNN's fused convolutions: inference only (no autograd), eval-mode BatchNorm, plain
    convolutions, and no torch.compile; a unit without ReLU only as a tail's shortcut."""
    if device.type != "cuda" or not _nonempty(site.h) or torch.compiler.is_compiling():
        return False
    if _compute_dtype(site.h) not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if not site.tail and not site.unit.relu:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (site.h, site.x) if t is not None):
        return False
    for conv, bn in site.pairs():
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            return False
        if isinstance(conv.padding, str) or not _fusable(bn) or uses_batch_stats(bn):
            return False
        params = (conv.weight, conv.bias, bn.weight, bn.bias)
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return False
    return True
