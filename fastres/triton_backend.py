"""The 'triton' backend: every convolution of the model through the fused Triton kernel.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the Triton interpreter, for tests).
For a block whose BatchNorms are in eval mode (`model.eval()`, norm_eval, frozen stages):

- each BatchNorm is folded into its convolution (w' = w * gamma / sqrt(var + eps),
  b' = beta - mean * gamma / sqrt(var + eps)), cached per conv until a parameter or buffer
  changes, never written back; when gradients are wanted the fold is recomputed with autograd
  ops each forward, so they reach the conv weight and the BN weight / bias;
- conv + folded BN + ReLU is one kernel; the block's tail (last BN + shortcut + ReLU) is fused
  into its last conv; the avg_down pool is fused into the shortcut conv;
- Bottle2neck (see `_res2net_split_conv_concat`): no split, no concatenation, no hierarchical
  add tensor. Without autograd each 3x3 conv reads its chunk in place and writes its slice of
  the buffer conv3 reads; the 'normal' block's add happens in the conv's input load; a 'stage'
  block's chunk convs are one grouped launch; the last chunk is written there by conv1 itself
  or pooled there by a small Triton kernel. Every Res2Net path stores each chunk in an aligned,
  padded slot of channels (`_chunk_slot`).

For a block whose BatchNorms are in training mode (batch statistics), the fused training path
at the end of this file (`_train_block`): raw conv outputs with their statistics from the
kernel's epilogue, each BN + ReLU applied in the next conv's input load, the tail in one pass.

The stem max-pool stays in PyTorch. Activations come out channels_last in the compute dtype
(the input's, or the autocast dtype). Falls back to the oracle (`forward_reference` /
`stem_reference`) for GroupNorm, BNs in mixed modes within a block, and float64 on CUDA (the
interpreter runs float64 through the kernels, for tests).
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .backends import Backend
from .ops import batchnorm as bn_ops
from .ops.conv2d_bn_train import InputBN, conv2d_bn_train
from .ops.conv2d_fused import arrange_weight, conv2d_fused, interpreting, kernel_dtypes
from .ops.res2net_fused import res2net_pool

# conv module -> (key of the tensors it was folded from, (arranged weight, bias)).
_FOLD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Bottle2neck -> (rotated, the folded pieces it was built from, its launch weights).
_RES2NET_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
        if model.deep_stem:
            pairs = [(model.stem[i], model.stem[i + 1]) for i in (0, 3, 6)]
        else:
            pairs = [(model.conv1, model.norm1)]
        dtype = _compute_dtype(x)
        if dtype is not None and all(_foldable(conv, bn) for conv, bn in pairs):
            x = x.to(dtype).contiguous(memory_format=torch.channels_last)
            for conv, bn in pairs:
                x = _conv_bn(conv, bn, x, relu=True)
            return model.maxpool(x)
        if dtype is not None and _trainable(pairs, x):
            return model.maxpool(_train_stem(pairs, x.to(dtype)))
        return model.stem_reference(x)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        if dtype is not None and _trainable(_conv_bn_pairs(block), x):
            return _train_block(block, x.to(dtype))
        if dtype is None or not _block_foldable(block):
            # GroupNorm, float64, BNs in mixed modes: the oracle runs them.
            return block.forward_reference(x)
        x = x.to(dtype)
        identity = x if block.downsample is None else _shortcut(block.downsample, x)
        from .models.res2net import Bottle2neck
        from .models.resnet import BasicBlock

        if isinstance(block, BasicBlock):
            out = _conv_bn(block.conv1, block.norm1, x, relu=True)
            return _conv_bn(block.conv2, block.norm2, out, relu=True, residual=identity)
        if isinstance(block, Bottle2neck):
            return _res2net_forward(block, x, identity)
        out = _conv_bn(block.conv1, block.norm1, x, relu=True)
        out = _conv_bn(block.conv2, block.norm2, out, relu=True)
        return _conv_bn(block.conv3, block.norm3, out, relu=True, residual=identity)


def _conv_bn_pairs(block: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Every (conv, norm) pair of a block, the downsample's included."""
    if hasattr(block, "convs"):
        pairs = [(block.conv1, block.norm1), *zip(block.convs, block.bns)]
        pairs.append((block.conv3, block.norm3))
    elif hasattr(block, "conv3"):
        pairs = [(block.conv1, block.norm1), (block.conv2, block.norm2)]
        pairs.append((block.conv3, block.norm3))
    else:
        pairs = [(block.conv1, block.norm1), (block.conv2, block.norm2)]
    if block.downsample is not None:
        pairs.append((block.downsample[-2], block.downsample[-1]))
        if len(block.downsample) == 3 and _fusable_pool(block.downsample[0]) is None:
            pairs.append((block.downsample[0], None))  # a pool the kernel cannot fuse
    return pairs


def _trainable(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> bool:
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


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the kernels run in (autocast's when enabled), or None if they cannot."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if dtype in kernel_dtypes() else None


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A conv + BatchNorm pair the fused path computes: BN in eval mode with running stats."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.groups == 1
        and isinstance(conv.padding, tuple)
        and isinstance(bn, nn.modules.batchnorm._BatchNorm)
        and not bn.training
        and bn.running_mean is not None
    )


def _block_foldable(block: nn.Module) -> bool:
    norms = [m for m in block.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return not norms and all(not bn.training and bn.running_mean is not None for bn in bns)


def _fold(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The conv weight with the BN folded in ([C_out, C_in, KH, KW], arranged for the kernel,
    in `dtype`) and the folded bias ([C_out] fp32, fp64 for fp64)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    bias = -bn.running_mean.to(acc) * scale
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
        bias = bias * bn.weight.to(acc) + bn.bias.to(acc)
    if conv.bias is not None:
        bias = bias + conv.bias.to(acc) * scale
    weight = conv.weight.to(acc) * scale.view(-1, 1, 1, 1)
    return arrange_weight(weight.to(dtype)), bias


def _folded(conv: nn.Conv2d, bn: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """`_fold`, cached while the conv and BN tensors are unchanged and no gradient is wanted."""
    sources = [
        t for t in (conv.weight, conv.bias, *bn.parameters(), *bn.buffers()) if t is not None
    ]
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t.requires_grad for t in sources)
    ):
        return _fold(conv, bn, dtype)
    key = (
        dtype,
        torch.is_inference_mode_enabled(),
        bn.eps,
        *[(t.data_ptr(), t._version, t.dtype) for t in sources],
    )
    cached = _FOLD_CACHE.get(conv)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        folded = _fold(conv, bn, dtype)
    _FOLD_CACHE[conv] = (key, folded)
    return folded


def _conv_bn(
    conv: nn.Conv2d,
    bn: nn.Module,
    x: Tensor,
    *,
    relu: bool,
    residual: Tensor | None = None,
    input_pool: int = 1,
    out: Tensor | None = None,
) -> Tensor:
    """relu?(bn(conv(pool?(x))) + residual?) in one kernel."""
    weight, bias = _folded(conv, bn, x.dtype)
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
        out=out,
    )


def _fusable_pool(pool: nn.Module) -> int | None:
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


def _shortcut(downsample: nn.Sequential, x: Tensor) -> Tensor:
    """The downsample branch: [AvgPool2d] -> conv1x1 -> BN, the pool fused into the conv."""
    *pools, conv, bn = downsample
    input_pool = 1
    if len(pools) == 1 and _fusable_pool(pools[0]) is not None:
        input_pool = _fusable_pool(pools[0])
    else:
        for pool in pools:
            x = pool(x)
    return _conv_bn(conv, bn, x, relu=False, input_pool=input_pool)


def _nhwc_empty(like: Tensor, channels: int, h: int, w: int) -> Tensor:
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


def _last_chunk_pool(block: nn.Module) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of the block's last-chunk AvgPool2d when the Triton pool
    computes it (square, count_include_pad, no ceil_mode), else None."""
    pool = block.pool
    sizes = [
        v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None)
        for v in (pool.kernel_size, pool.stride or pool.kernel_size, pool.padding)
    ]
    if (
        None in sizes
        or pool.ceil_mode
        or not pool.count_include_pad
        or pool.divisor_override is not None
        or sizes[2] > sizes[0] // 2
    ):
        return None
    return sizes[0], sizes[1], sizes[2]


# Res2Net's chunks in the fused paths: each chunk of `width` channels is stored in a slot of
# `_chunk_slot(width)` channels. Res2Net widths (26, 52, 104) are no multiple of 8: unpadded, a
# chunk starts at a channel offset that is not 16-byte aligned and its channel count is not
# divisible by 16, so Triton can neither vectorize the loads nor pipeline them (cp.async), and
# the scalar loads spilled registers (bench/results/README.md). Padded, every chunk conv reads
# and writes aligned slots of 16k channels. A pad channel is a copy of its chunk's first channel
# (`_pad_outputs`: the producing weight row, bias and BN entries repeated) and meets zero weight
# columns in its consumers (`_pad_inputs`). Not zeros: a zero row would turn an Inf input into
# 0 * Inf = NaN where PyTorch's value stays finite (ReLU of -Inf); a copy makes a pad non-finite
# only where a real channel that enters the same sum is, so every NaN / Inf lands where it
# lands in PyTorch.


def _chunk_slot(width: int) -> int:
    """The channels one Res2Net chunk occupies in the fused paths: width rounded up to 16."""
    return -(-width // 16) * 16


def _pad_outputs(t: Tensor, chunks: int) -> Tensor:
    """t with each of its `chunks` equal parts along dim 0 (output channels: weight rows, bias,
    BN parameters, statistics) filled up to `_chunk_slot` entries with copies of the part's
    first entry. Differentiable; t itself when no padding is needed."""
    width = t.shape[0] // chunks
    if _chunk_slot(width) == width:
        return t
    return t.index_select(0, _pad_index(chunks, width, t.device))


@functools.cache
def _pad_index(chunks: int, width: int, device: torch.device) -> Tensor:
    """The source entry of each padded entry (`_pad_outputs`), made once per device."""
    pad = _chunk_slot(width) - width
    within = torch.cat([torch.arange(width), torch.zeros(pad, dtype=torch.long)])
    return (torch.arange(chunks)[:, None] * width + within).flatten().to(device)


def _pad_inputs(weight: Tensor, chunks: int) -> Tensor:
    """weight with each of its `chunks` equal parts along dim 1 (input channels) zero-padded to
    `_chunk_slot` columns. Differentiable; weight itself when no padding is needed."""
    width = weight.shape[1] // chunks
    pad = _chunk_slot(width) - width
    if pad == 0:
        return weight
    parts = weight.unflatten(1, (chunks, width))
    # F.pad lists (before, after) pairs from the last dimension backwards.
    spec = [0, 0] * (parts.dim() - 3) + [0, pad]
    return nn.functional.pad(parts, spec).flatten(1, 2)


def _unpad_outputs(t: Tensor, chunks: int, width: int) -> Tensor:
    """The real entries of a [chunks * _chunk_slot(width)] per-channel vector (undoes
    `_pad_outputs`)."""
    return t.unflatten(0, (chunks, -1))[:, :width].flatten()


def _res2net_launch_weights(block: nn.Module, dtype: torch.dtype, rotate: bool):
    """The folded, chunk-padded weights of a Bottle2neck's fused path, cached per block.

    Returns (w1, b1, convs, w3, b3): conv1's output chunks padded to slots (the last chunk
    first when `rotate`, see `_res2net_split_conv_concat`); convs one stacked (weight
    [(scales-1)*slot, slot, 3, 3], bias) pair for a 'stage' block's grouped launch, else a list
    of ([slot, slot, 3, 3], [slot]) pairs; conv3's input chunks padded to slots. Differentiable
    (and not cached) where a folded piece wants gradients.
    """
    scales = block.scales
    pieces = [_folded(block.conv1, block.norm1, dtype), _folded(block.conv3, block.norm3, dtype)]
    pieces += [_folded(conv, bn, dtype) for conv, bn in zip(block.convs, block.bns)]
    cacheable = not torch.compiler.is_compiling() and not any(
        t.requires_grad for piece in pieces for t in piece
    )
    cached = _RES2NET_CACHE.get(block) if cacheable else None
    if (
        cached is not None
        and cached[0] == rotate
        and all(a is b for a, b in zip(cached[1], pieces, strict=True))
    ):
        return cached[2]
    (w1, b1), (w3, b3), *convs = pieces
    if rotate:
        split = (scales - 1) * block.width
        w1, b1 = torch.cat([w1[split:], w1[:split]]), torch.cat([b1[split:], b1[:split]])
    w1, b1 = arrange_weight(_pad_outputs(w1, scales)), _pad_outputs(b1, scales)
    w3 = arrange_weight(_pad_inputs(w3, scales))
    convs = [(_pad_inputs(_pad_outputs(w, 1), 1), _pad_outputs(b, 1)) for w, b in convs]
    if block.stage_type == "stage":
        convs = (arrange_weight(torch.cat([w for w, _ in convs])), torch.cat([b for _, b in convs]))
    else:
        convs = [(arrange_weight(w), b) for w, b in convs]
    launch = (w1, b1, convs, w3, b3)
    if cacheable:
        _RES2NET_CACHE[block] = (rotate, pieces, launch)
    return launch


def _res2net_forward(block: nn.Module, x: Tensor, identity: Tensor) -> Tensor:
    """A Bottle2neck in eval / BN-frozen mode: `_res2net_split_conv_concat`, then conv3 with
    its BN, the shortcut and the ReLU in one kernel."""
    cat, w3, b3 = _res2net_split_conv_concat(block, x)
    return conv2d_fused(cat, w3, b3, relu=True, residual=identity)


def _res2net_split_conv_concat(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """conv1 -> split -> 3x3 convs -> concat of a Bottle2neck: the input of its conv3.

    Args:
        x: [N, inplanes, H, W], the block input.

    Returns:
        The concatenation [N, scales * slot, OH, OW] channels_last, each chunk in a padded slot
        of `_chunk_slot(width)` channels (possibly a channel slice of a larger buffer),
        and conv3's folded weight and bias for that layout.

    Without autograd (inference), nothing is copied and no tensor is formed between the convs:

    - last chunk not pooled: one buffer [sp_0 .. sp_{s-2} | chunk_{s-1} | chunk_0 .. chunk_{s-2}]:
      conv1, its output chunks rotated (the last chunk first), writes the last two parts;
      each 3x3 conv reads its chunk there and writes sp_i; conv3 reads the first `scales`
      parts, so the last chunk is where conv3 reads it without a copy, and conv3's read starts
      at the buffer's aligned channel 0;
    - last chunk pooled: conv1 writes its own buffer, the Triton pool writes the pooled chunk
      into the last slot of the concatenation buffer;
    - 'normal' block: conv i's input load adds sp_{i-1} to chunk i; 'stage' block: the scales - 1
      chunk convs are one grouped launch.

    A launch never writes memory it (or another program of it) reads: chunks and outputs are
    disjoint channel ranges. With autograd (BN-frozen training) the functional, differentiable
    ops run instead: the chunks are still read in place and the add is still in the input load,
    but the conv outputs and the last chunk are concatenated by torch.cat (one copy of the
    concatenation buffer forward, its split backward).
    """
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in block.parameters())
    )
    if differentiable:
        return _res2net_autograd(block, x)
    slot, scales = _chunk_slot(block.width), block.scales
    conv1, conv = block.conv1, block.convs[0]
    pool = _last_chunk_pool(block) if block.pools_last_chunk else None
    shared = not block.pools_last_chunk
    w1, b1, convs, w3, b3 = _res2net_launch_weights(block, x.dtype, rotate=shared)
    h1 = (x.shape[2] - 1) // conv1.stride[0] + 1
    w1_out = (x.shape[3] - 1) // conv1.stride[1] + 1
    oh, ow = (
        (size + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
        // conv.stride[i]
        + 1
        for i, size in enumerate((h1, w1_out))
    )
    split = (scales - 1) * slot
    if shared:
        buf = _nhwc_empty(x, (2 * scales - 1) * slot, h1, w1_out)
        conv2d_fused(
            x, w1, b1, stride=conv1.stride, relu=True, out=buf[:, split : split + split + slot]
        )
        cat, chunks = buf[:, : scales * slot], buf[:, scales * slot : scales * slot + split]
    else:
        out1 = _nhwc_empty(x, scales * slot, h1, w1_out)
        conv2d_fused(x, w1, b1, stride=conv1.stride, relu=True, out=out1)
        cat, chunks = _nhwc_empty(x, scales * slot, oh, ow), out1[:, :split]
        if pool is None:
            cat[:, split:].copy_(block.pool(out1[:, split:]))
        else:
            kernel, stride, padding = pool
            res2net_pool(
                out1[:, split:], cat[:, split:], kernel=kernel, stride=stride, padding=padding
            )
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, relu=True)
    if block.stage_type == "stage":
        weight, bias = convs
        conv2d_fused(chunks, weight, bias, groups=scales - 1, out=cat[:, :split], **geometry)
        return cat, w3, b3
    previous = None
    for i, (weight, bias) in enumerate(convs):
        dest = cat[:, i * slot : (i + 1) * slot]
        chunk = chunks[:, i * slot : (i + 1) * slot]
        conv2d_fused(chunk, weight, bias, input_add=previous, out=dest, **geometry)
        previous = dest
    return cat, w3, b3


def _res2net_autograd(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The differentiable Bottle2neck middle (see `_res2net_split_conv_concat`)."""
    slot, scales = _chunk_slot(block.width), block.scales
    w1, b1, convs, w3, b3 = _res2net_launch_weights(block, x.dtype, rotate=False)
    out = conv2d_fused(x, w1, b1, stride=block.conv1.stride, relu=True)
    conv = block.convs[0]
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, relu=True)
    split = (scales - 1) * slot
    if block.stage_type == "stage":
        weight, bias = convs
        outs = [conv2d_fused(out[:, :split], weight, bias, groups=scales - 1, **geometry)]
    else:
        outs, previous = [], None
        for i, (weight, bias) in enumerate(convs):
            chunk = out[:, i * slot : (i + 1) * slot]
            previous = conv2d_fused(chunk, weight, bias, input_add=previous, **geometry)
            outs.append(previous)
    last = out[:, split:]
    if block.pools_last_chunk:
        last = block.pool(last)
    cat = torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
    return cat, w3, b3


# The fused training path (BatchNorm in training mode: batch statistics).
#
# Each convolution returns its raw output and that output's batch statistics from the kernel's
# epilogue; the next convolution applies the BatchNorm (those statistics) + ReLU in its input
# load, so within a block only raw convolution outputs are stored; the block's tail applies
# the last BN with the shortcut (identity, or the downsample conv's output with its own BN) and
# the ReLU in one pass (`bn_train_act`). Running statistics are updated here, from the
# statistics (all-gathered first for SyncBN), as nn.BatchNorm2d updates them.


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


def _train_stem(pairs: list[tuple[nn.Module, nn.Module]], x: Tensor) -> Tensor:
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
    return _train_conv(conv, bn, x, input_pool=_fusable_pool(pools[0]) if pools else 1)


def _train_block(block: nn.Module, x: Tensor) -> Tensor:
    from .models.res2net import Bottle2neck
    from .models.resnet import BasicBlock

    if isinstance(block, BasicBlock):
        raw = _train_conv(block.conv2, block.norm2, _train_conv(block.conv1, block.norm1, x))
    elif isinstance(block, Bottle2neck):
        cat, weight = _train_res2net_middle(block, x)
        raw = _train_conv(block.conv3, block.norm3, cat, weight=weight)
    else:
        raw = _train_conv(block.conv1, block.norm1, x)
        raw = _train_conv(block.conv2, block.norm2, raw)
        raw = _train_conv(block.conv3, block.norm3, raw)
    shortcut = _train_shortcut(block, x)
    return raw.apply(residual=x if shortcut is None else None, shortcut=shortcut)


def _train_res2net_middle(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """split -> 3x3 convs -> concat of a training-mode Bottle2neck: the input of its conv3.

    Returns the concatenation, each chunk in a padded slot of `_chunk_slot(width)` channels,
    and conv3's weight for that layout. conv1's and every chunk conv's activation are written
    out (the chunks and the hierarchical add feed several consumers); chunks are read in place
    as channel slices, the add happens in the next conv's input load, and a 'stage' block's
    chunk convs are one grouped launch whose BNs apply in one pass.
    """
    width, scales, slot = block.width, block.scales, _chunk_slot(block.width)
    conv = block.convs[0]
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    weight = _pad_outputs(block.conv1.weight, scales)
    y, mean, m2 = conv2d_bn_train(x, arrange_weight(weight.to(x.dtype)), stride=block.conv1.stride)
    out = _train_padded_bn_relu([block.norm1], y, mean, m2, scales, width)
    split = (scales - 1) * slot
    bns = list(block.bns)
    if block.stage_type == "stage" and len({bn.eps for bn in bns}) == 1:
        weight = torch.cat([_pad_inputs(_pad_outputs(c.weight, 1), 1) for c in block.convs])
        y, mean, m2 = conv2d_bn_train(
            out[:, :split], arrange_weight(weight.to(out.dtype)), groups=scales - 1, **geometry
        )
        outs = [_train_padded_bn_relu(bns, y, mean, m2, scales - 1, width)]
    else:
        outs, previous = [], None
        for i, (conv, bn) in enumerate(zip(block.convs, bns)):
            chunk = out[:, i * slot : (i + 1) * slot]
            add = previous if block.stage_type == "normal" else None
            weight = _pad_inputs(_pad_outputs(conv.weight, 1), 1).to(out.dtype)
            y, mean, m2 = conv2d_bn_train(chunk, arrange_weight(weight), input_add=add, **geometry)
            previous = _train_padded_bn_relu([bn], y, mean, m2, 1, width)
            outs.append(previous)
    last = out[:, split:]
    if block.pools_last_chunk:
        last = block.pool(last)
    cat = torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
    return cat, _pad_inputs(block.conv3.weight, scales)


def _train_padded_bn_relu(
    bns: list[nn.Module], y: Tensor, mean: Tensor, m2: Tensor, chunks: int, width: int
) -> Tensor:
    """ReLU(BN(y)) with batch statistics for a raw conv output of `chunks` padded chunk slots,
    the i-th chunk normalized by bns[i * len(bns) // chunks]: running statistics from the real
    channels; each pad channel gets its chunk's first channel's statistics and affine
    parameters, so it stays a copy of that channel (see `_chunk_slot`)."""
    real = y.narrow(1, 0, chunks * width)  # the count and channel count batch_stats reads
    group = bn_ops.sync_group_name(bns[0])
    mean, m2, count = bn_ops.batch_stats(
        bns, real, _unpad_outputs(mean, chunks, width), _unpad_outputs(m2, chunks, width), group
    )
    affine = [torch.cat([bn.weight for bn in bns]), torch.cat([bn.bias for bn in bns])]
    stats = (_pad_outputs(mean, chunks), _pad_outputs(m2, chunks), count)
    weight, bias = (_pad_outputs(t, chunks) for t in affine)
    return bn_ops.bn_train_act(y, stats, weight, bias, bns[0].eps, group=group)
