"""The triton backend's Bottle2neck: split -> 3x3 convs -> concat without the split, concat or
hierarchical-add tensors, in eval / BN-frozen mode (`split_conv_concat`) and in training
(`train_res2net_middle`), each chunk in an aligned slot of channels (`_chunk_slot`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ...ops import batchnorm as bn_ops
from ...ops.conv2d_bn_train import (
    NO_INPUT_BN,
    OutputBN,
    TrainArgs,
    conv2d_bn_train,
    conv2d_bn_train_body,
    finalizing_body,
    output_bn_fits,
)
from ...ops.conv2d_fused import (
    apply_function,
    arrange_weight,
    channel_sum,
    conv2d_fused,
    dispatch_free,
    eager_autograd,
)
from ...ops.padded_weight import ChannelMap, PaddedGroup, padded_weights
from ...ops.precision import cast
from ...ops.res2net_pool import res2net_pool
from ..fold_cache import new_cache
from .inference import folded, nhwc_empty, wants_grad


class PaddedConcat(NamedTuple):
    """A fused Bottle2neck middle's result, conv3's input: the concatenation [N, scales * slot,
    H, W] channels_last with each chunk in a padded slot of `_chunk_slot(width)` channels
    (possibly a channel slice of a larger buffer), and conv3's weight for that layout (folded,
    with its folded bias, in eval mode; unfolded, bias None, in training), arranged for the
    kernels."""

    cat: Tensor
    weight: Tensor
    bias: Tensor | None = None


# Bottle2neck -> (rotated, the folded pieces it was built from, its launch weights): stale when
# a piece is (`folded` then returns a new one).
_RES2NET_CACHE = new_cache()


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
    return t.index_select(0, _slot_map(chunks, width, t.device).index)


@functools.cache
def _slot_map(
    chunks: int, width: int, device: torch.device, rotate: bool = False, zeros: bool = False
) -> ChannelMap:
    """The layout of `chunks` chunks of `width` channels in slots (made once per device):
    `_pad_outputs`' (pad entries copy their chunk's first channel), or with `zeros` an input
    layout (pad entries -1: zero columns, `_pad_inputs`); `rotate`: the last chunk first (see
    `split_conv_concat`)."""
    slot = _chunk_slot(width)
    order = [chunks - 1, *range(chunks - 1)] if rotate else list(range(chunks))
    index, inverse = [], [0] * (chunks * width)
    for position, chunk in enumerate(order):
        for j in range(slot):
            if j < width:
                inverse[chunk * width + j] = position * slot + j
            index.append(chunk * width + j if j < width else (-1 if zeros else chunk * width))
    index, inverse = (torch.tensor(t, dtype=torch.int32, device=device) for t in (index, inverse))
    return ChannelMap(index, inverse)


@functools.cache
def _identity_map(channels: int, device: torch.device) -> ChannelMap:
    """Unpadded channels."""
    index = torch.arange(channels, dtype=torch.int32, device=device)
    return ChannelMap(index, index)


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


def _res2net_launch_weights(block: nn.Module, dtype: torch.dtype, rotate: bool, stacked: bool):
    """The folded, chunk-padded weights of a Bottle2neck's fused path, cached per block.

    Returns (w1, b1, convs, w3, b3): conv1's output chunks padded to slots (the last chunk
    first when `rotate`, see `split_conv_concat`); convs one stacked (weight
    [(scales-1)*slot, slot, 3, 3], bias) pair where `stacked` (a 'stage' block's grouped
    launch needs it), else a list of ([slot, slot, 3, 3], [slot]) pairs; conv3's input chunks
    padded to slots. Differentiable (and not cached) where a folded piece wants gradients: then
    in eager mode each weight is one launch each way, the block's one autograd node
    (`_padded_launch_weights`).
    """
    scales = block.scales
    if eager_autograd() and any(
        wants_grad(conv, bn)
        for conv, bn in [(block.conv1, block.norm1), (block.conv3, block.norm3),
                         *zip(block.convs, block.bns)]
    ):  # fmt: skip
        return _padded_launch_weights(block, dtype, fold=True, rotate=rotate, stacked=stacked)
    pieces = [folded(block.conv1, block.norm1, dtype), folded(block.conv3, block.norm3, dtype)]
    pieces += [folded(conv, bn, dtype) for conv, bn in zip(block.convs, block.bns)]
    cacheable = not torch.compiler.is_compiling() and not any(
        t.requires_grad for piece in pieces for t in piece
    )
    cached = _RES2NET_CACHE.get(block) if cacheable else None
    if (
        cached is not None
        and cached[0] == (rotate, stacked)
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
    if stacked:
        convs = (arrange_weight(torch.cat([w for w, _ in convs])), torch.cat([b for _, b in convs]))
    else:
        convs = [(arrange_weight(w), b) for w, b in convs]
    launch = (w1, b1, convs, w3, b3)
    if cacheable:
        _RES2NET_CACHE[block] = ((rotate, stacked), pieces, launch)
    return launch


def _padded_launch_weights(
    block: nn.Module, dtype: torch.dtype, *, fold: bool, stacked: bool, rotate: bool = False
):
    """`_res2net_launch_weights`' result (with `fold`; without: the raw weights, biases None)
    built with gradients in eager mode, as one autograd node (`padded_weights`): each weight
    (the chunk convs stacked where `stacked`) padded, arranged and cast by one launch, its BN
    folded in (one launch back)."""
    scales, width, device = block.scales, block.width, block.conv1.weight.device

    def group(convs, bns, rows: ChannelMap, cols: ChannelMap) -> PaddedGroup:
        folds = None
        if fold:
            folds = [
                (conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
                for conv, bn in zip(convs, bns)
            ]
        return PaddedGroup([conv.weight for conv in convs], rows, cols, folds)

    conv1, conv3 = block.conv1, block.conv3
    groups = [
        group([conv1], [block.norm1], _slot_map(scales, width, device, rotate),
              _identity_map(conv1.in_channels, device)),
        group([conv3], [block.norm3], _identity_map(conv3.out_channels, device),
              _slot_map(scales, width, device, zeros=True)),
    ]  # fmt: skip
    maps = (_slot_map(1, width, device), _slot_map(1, width, device, zeros=True))
    if stacked:
        groups.append(group(list(block.convs), list(block.bns), *maps))
    else:
        groups += [group([conv], [bn], *maps) for conv, bn in zip(block.convs, block.bns)]
    (w1, b1), (w3, b3), *convs = padded_weights(groups, dtype)
    return w1, b1, convs[0] if stacked else convs, w3, b3


def forget_launch_weights(modules: list[nn.Module]) -> None:
    """Drops the launch weights cached for these Bottle2neck blocks."""
    for block in modules:
        _RES2NET_CACHE.pop(block, None)


def split_conv_concat(block: nn.Module, x: Tensor) -> PaddedConcat:
    """conv1 -> split -> 3x3 convs -> concat of a Bottle2neck: the input of its conv3.

    Args:
        x: [N, inplanes, H, W], the block input.

    Returns:
        The concatenation (OH x OW) and conv3's folded weight and bias for its layout.

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
    disjoint channel ranges. With autograd (BN-frozen training) in eager mode the same launches
    run as one autograd node (`_FrozenMiddle`); under torch.compile or torch.func, or with a
    pool the Triton pool does not compute, the functional, differentiable ops
    (`_res2net_autograd`): the chunks are still read in place and the add is still in the input
    load, but the conv outputs and the last chunk are concatenated by torch.cat.
    """
    in_place = not block.pools_last_chunk
    pool = _last_chunk_pool(block) if block.pools_last_chunk else None
    if torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in block.parameters())
    ):
        if eager_autograd() and (in_place or pool is not None):
            return _frozen_middle(block, x, in_place, pool)
        return _res2net_autograd(block, x)
    stacked = block.stage_type == "stage"
    w1, b1, convs, w3, b3 = _res2net_launch_weights(block, x.dtype, in_place, stacked)
    cat, _ = _launch_middle(block, x, w1, b1, convs, in_place, pool)
    return PaddedConcat(cat, w3, b3)


def _launch_middle(
    block: nn.Module,
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    convs,
    in_place: bool,
    pool: tuple[int, int, int] | None,
) -> tuple[Tensor, Tensor]:
    """`split_conv_concat`'s launches, with its launch weights (`_res2net_launch_weights`,
    rotated when `in_place`: the last chunk is not pooled); `pool`: `_last_chunk_pool`, None
    for `block.pool` in PyTorch. Returns the concatenation and conv1's output (its chunks in
    w1's order)."""
    slot, scales = _chunk_slot(block.width), block.scales
    conv1, conv = block.conv1, block.convs[0]
    h1 = (x.shape[2] - 1) // conv1.stride[0] + 1
    w1_out = (x.shape[3] - 1) // conv1.stride[1] + 1
    oh, ow = (
        (size + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
        // conv.stride[i]
        + 1
        for i, size in enumerate((h1, w1_out))
    )
    split = (scales - 1) * slot
    if in_place:
        buf = nhwc_empty(x, (2 * scales - 1) * slot, h1, w1_out)
        out1 = buf[:, split : split + split + slot]
        conv2d_fused(x, w1, b1, stride=conv1.stride, relu=True, out=out1)
        cat, chunks = buf[:, : scales * slot], buf[:, scales * slot : scales * slot + split]
    else:
        out1 = nhwc_empty(x, scales * slot, h1, w1_out)
        conv2d_fused(x, w1, b1, stride=conv1.stride, relu=True, out=out1)
        cat, chunks = nhwc_empty(x, scales * slot, oh, ow), out1[:, :split]
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
        return cat, out1
    previous = None
    for i, (weight, bias) in enumerate(convs):
        dest = cat[:, i * slot : (i + 1) * slot]
        chunk = chunks[:, i * slot : (i + 1) * slot]
        conv2d_fused(chunk, weight, bias, input_add=previous, out=dest, **geometry)
        previous = dest
    return cat, out1


def _frozen_middle(
    block: nn.Module, x: Tensor, in_place: bool, pool: tuple[int, int, int] | None
) -> PaddedConcat:
    """The differentiable Bottle2neck middle in eager mode: `_launch_middle` as one autograd
    node (`_FrozenMiddle`), the chunk weights stacked (one padded-weight group)."""
    w1, b1, (w, b), w3, b3 = _res2net_launch_weights(block, x.dtype, in_place, stacked=True)
    cat = apply_function(_FrozenMiddle, block, in_place, pool, x, w1, b1, w, b)
    return PaddedConcat(cat, w3, b3)


class _FrozenMiddle(torch.autograd.Function):
    """conv1 and the chunk convs of a Bottle2neck with folded BNs (`_launch_middle`: no split,
    concatenation or add copies) as one autograd node; inputs (block, in_place, pool, x, w1,
    b1, w, b), w and b the chunk convs' stacked (launched as one grouped conv in a 'stage'
    block, as slices in a 'normal' one). The backward is the composition's
    (`_res2net_autograd`, the fused convolution's backward per conv) written out: each ReLU's
    gradient from its saved output, PyTorch's convolution_backward per conv, the hierarchical
    add's gradient carried to the previous chunk, the last chunk's pool's through
    avg_pool2d_backward, one concatenation of the chunks' gradients for conv1."""

    @staticmethod
    def forward(ctx, block, in_place, pool, x, w1, b1, w, b):
        convs = (w, b)
        if block.stage_type != "stage":
            convs = list(zip(w.chunk(block.scales - 1), b.chunk(block.scales - 1)))
        cat, out1 = _launch_middle(block, x, w1, b1, convs, in_place, pool)
        ctx.block, ctx.in_place, ctx.pool = block, in_place, pool
        ctx.save_for_backward(x, w1, out1, cat, w)
        ctx.bias_dtypes = (b1.dtype, b.dtype)
        return cat

    @staticmethod
    def backward(ctx, grad_cat):
        block, needs = ctx.block, ctx.needs_input_grad
        need_x, need_w1, need_b1, need_w, need_b = needs[3:]
        x, w1, out1, cat, w = ctx.saved_tensors
        slot, scales = _chunk_slot(block.width), block.scales
        split = (scales - 1) * slot
        grad_cat = cast(grad_cat, cat.dtype)
        conv = block.convs[0]
        geometry = (conv.stride, conv.padding, conv.dilation, False, [0, 0])
        chunks = out1[:, slot:] if ctx.in_place else out1[:, :split]
        if block.stage_type == "stage":
            grad_z = torch.ops.aten.threshold_backward(grad_cat[:, :split], cat[:, :split], 0)
            grad_chunks, grad_w, _ = torch.ops.aten.convolution_backward(
                grad_z, chunks, w, None, *geometry, scales - 1, [True, need_w, False]
            )
            grad_ins, grad_b = [grad_chunks], channel_sum(grad_z) if need_b else None
        else:
            weights = w.chunk(scales - 1)
            grad_ins, grad_ws, grad_bs, carried = [], [], [], None
            for i in reversed(range(scales - 1)):
                part = slice(i * slot, (i + 1) * slot)
                grad = grad_cat[:, part] if carried is None else grad_cat[:, part] + carried
                grad_z = torch.ops.aten.threshold_backward(grad, cat[:, part], 0)
                conv_in = chunks[:, part]
                if i > 0:  # the hierarchical add: chunk i + the previous chunk conv's output
                    conv_in = conv_in + cat[:, (i - 1) * slot : i * slot]
                carried, grad_w, _ = torch.ops.aten.convolution_backward(
                    grad_z, conv_in, weights[i], None, *geometry, 1, [True, need_w, False]
                )
                grad_ins.append(carried)
                grad_ws.append(grad_w)
                grad_bs.append(channel_sum(grad_z) if need_b else None)
            grad_ins.reverse()  # gathered last chunk first
            grad_w = torch.cat(grad_ws[::-1]) if need_w else None
            grad_b = torch.cat(grad_bs[::-1]) if need_b else None
        grad_last = grad_cat[:, split:]
        if not ctx.in_place:
            kernel, stride, padding = ctx.pool
            grad_last = torch.ops.aten.avg_pool2d_backward(
                grad_last, out1[:, split:], [kernel] * 2, [stride] * 2, [padding] * 2, False,
                True, None,
            )  # fmt: skip
        # conv1's output gradient, its chunks in w1's order: one concatenation.
        parts = [grad_last, *grad_ins] if ctx.in_place else [*grad_ins, grad_last]
        grad_z = torch.ops.aten.threshold_backward(torch.cat(parts, 1), out1, 0)
        conv1 = block.conv1
        grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
            grad_z, x, w1, None, conv1.stride, conv1.padding, conv1.dilation, False, [0, 0], 1,
            [need_x, need_w1, False],
        )  # fmt: skip
        b1_dtype, b_dtype = ctx.bias_dtypes
        grad_b1 = cast(channel_sum(grad_z), b1_dtype) if need_b1 else None
        grad_b = cast(grad_b, b_dtype) if need_b else None
        return None, None, None, grad_x, grad_w1, grad_b1, grad_w, grad_b


def _res2net_autograd(block: nn.Module, x: Tensor) -> PaddedConcat:
    """The differentiable Bottle2neck middle (see `split_conv_concat`)."""
    slot, scales = _chunk_slot(block.width), block.scales
    grouped = block.stage_type == "stage"
    w1, b1, convs, w3, b3 = _res2net_launch_weights(block, x.dtype, False, grouped)
    out = conv2d_fused(x, w1, b1, stride=block.conv1.stride, relu=True)
    conv = block.convs[0]
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, relu=True)
    # One split, not a slice per chunk: its backward is one concatenation.
    *chunks, last = out.split([(scales - 1) * slot, slot] if grouped else slot, 1)
    if grouped:
        weight, bias = convs
        outs = [conv2d_fused(chunks[0], weight, bias, groups=scales - 1, **geometry)]
    else:
        outs, previous = [], None
        for chunk, (weight, bias) in zip(chunks, convs):
            previous = conv2d_fused(chunk, weight, bias, input_add=previous, **geometry)
            outs.append(previous)
    if block.pools_last_chunk:
        last = block.pool(last)
    cat = torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
    return PaddedConcat(cat, w3, b3)


def train_res2net_middle(block: nn.Module, x: Tensor) -> PaddedConcat:
    """split -> 3x3 convs -> concat of a training-mode Bottle2neck: the input of its conv3.

    Returns the concatenation and conv3's (unfolded) weight for its layout. conv1's and every chunk
    conv's activation are written out (the chunks and the hierarchical add feed several
    consumers); chunks are read in place as channel slices, the add happens in the next conv's
    input load, and a 'stage' block's chunk convs are one grouped launch whose BNs apply in one
    pass.
    """
    width, scales, slot = block.width, block.scales, _chunk_slot(block.width)
    conv = block.convs[0]
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    bns = list(block.bns)
    grouped = block.stage_type == "stage" and len({bn.eps for bn in bns}) == 1
    if _one_node_middle(block, x):
        # The chunk convs' weights stacked: one padded-weight group, sliced per chunk.
        w1, _, (w, _), w3, _ = _padded_launch_weights(block, x.dtype, fold=False, stacked=True)
        norms = (block.norm1, *bns)
        params = (*(bn.weight for bn in norms), *(bn.bias for bn in norms))
        cat = apply_function(_TrainMiddle, block, grouped, x, w1, w, *params)
        return PaddedConcat(cat, w3)
    w1, convs, w3 = _train_weights(block, x.dtype, grouped)
    params = _slot_params(block, grouped)
    y, mean, m2 = conv2d_bn_train(x, w1, stride=block.conv1.stride)
    out = _bn_relu(y, _padded_batch_norm([block.norm1], y, mean, m2, scales, width, params[0]))
    split = (scales - 1) * slot
    # One split, not a slice per chunk: its backward is one concatenation.
    *chunks, last = out.split([split, slot] if grouped else slot, 1)
    if grouped:
        y, mean, m2 = conv2d_bn_train(chunks[0], convs, groups=scales - 1, **geometry)
        normalized = _padded_batch_norm(bns, y, mean, m2, scales - 1, width, params[1])
        outs = [_bn_relu(y, normalized)]
    else:
        outs, previous = [], None
        for chunk, weight, bn, bn_params in zip(chunks, convs, bns, params[1:]):
            add = previous if block.stage_type == "normal" else None
            y, mean, m2 = conv2d_bn_train(chunk, weight, input_add=add, **geometry)
            previous = _bn_relu(y, _padded_batch_norm([bn], y, mean, m2, 1, width, bn_params))
            outs.append(previous)
    if block.pools_last_chunk:
        last = block.pool(last)
    cat = torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
    return PaddedConcat(cat, w3)


def _one_node_middle(block: nn.Module, x: Tensor) -> bool:
    """Whether `_TrainMiddle` runs the block's training middle: eager mode with nothing that
    sees the dispatch, padded slots, no SyncBN across processes, an AvgPool2d (or no pool) on
    the last chunk."""
    norms = (block.norm1, *block.bns)
    return (
        eager_autograd()
        and _chunk_slot(block.width) != block.width
        and dispatch_free((x, *(t for bn in norms for t in (bn.weight, bn.bias))))
        and not any(bn_ops.sync_group_name(bn) for bn in norms)
        and (not block.pools_last_chunk or type(block.pool) is nn.AvgPool2d)
    )


class _TrainMiddle(torch.autograd.Function):
    """`train_res2net_middle`'s launches and ops (conv1, its BNs + ReLU written out, the chunk
    convs with the hierarchical add in their input load, their BNs + ReLU, the last chunk's
    pool, the concatenation) as one autograd node. Inputs: (block, grouped, x, w1, the chunk
    convs' weights stacked (one grouped launch where `grouped`, else a slice each), then the
    BNs' weights (norm1's, then the chunk BNs'), then their biases).

    A BN of one chunk group (norm1, a 'normal' block's chunk BN) is finalized in its conv's
    merge launch through the padded slots (`finalizing_body`); the chunk BNs of a grouped
    launch by `_padded_batch_norm` on their padded parameters. The backward is the
    composition's written out: `bn_backward` of each BN group with batch statistics (the ReLU
    in it), PyTorch's convolution_backward per conv, the add's gradient carried to the
    previous chunk, the pool's through avg_pool2d_backward, one concatenation of the chunks'
    gradients for conv1, and the padded parameters' gradients read at each real channel's
    primary copy (as `_SlotParams`)."""

    @staticmethod
    def forward(ctx, block, grouped, x, w1, w, *params):
        width, scales, slot = block.width, block.scales, _chunk_slot(block.width)
        weights = [w] if grouped else w.chunk(scales - 1)
        norms = (block.norm1, *block.bns)
        # The BN groups: norm1 over `scales` chunks, then the chunk BNs (one group of
        # scales - 1 chunks where grouped).
        groups = [([block.norm1], scales)]
        groups += [(list(block.bns), scales - 1)] if grouped else [([bn], 1) for bn in block.bns]
        conv = block.convs[0]
        variant = bn_ops.current_variant()
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
        padded = None

        def normalized(group, conv, inputs, weight, conv_groups, input_add):
            """ReLU(BN(conv(inputs))) with batch statistics over the group's padded slots:
            (the output, what its backward needs, the values per channel)."""
            nonlocal padded
            bns, chunks = group
            args = TrainArgs(
                inputs, weight, list(conv.stride), list(conv.padding), list(conv.dilation),
                conv_groups, allow_tf32, 1, input_add, *NO_INPUT_BN,
            )  # fmt: skip
            output_bn = OutputBN.of(bns[0]) if len(bns) == 1 else None
            if output_bn is not None and output_bn_fits(output_bn, chunks * width, inputs):
                y, mean, _, scale, shift, invstd = finalizing_body(
                    output_bn, args, slots=(slot, width)
                )
                count = y.numel() // y.shape[1]
            else:
                if padded is None:  # every BN's parameters in its padded slots
                    table = torch.cat(params).view(2, -1)
                    rows = _slot_map(2 * scales - 1, width, table.device)
                    padded = table.index_select(1, rows.index)
                first = slot * (0 if bns[0] is block.norm1 else scales + norms.index(bns[0]) - 1)
                part = padded[:, first : first + chunks * slot]
                group_params = (part[0], part[1])
                y, mean, m2 = conv2d_bn_train_body(*args)
                norm, count, _ = _padded_batch_norm(bns, y, mean, m2, chunks, width, group_params)
                mean, scale, shift, invstd = norm.mean, norm.scale, norm.shift, norm.invstd
            with torch._C._AutoDispatchBelowAutograd():
                out = torch.ops.fastres.bn_apply(y, scale, shift, None, None, None, True, variant)
            return out, (y, mean, scale, shift, invstd), count

        h1, norm1, count1 = normalized(groups[0], block.conv1, x, w1, 1, None)
        split = (scales - 1) * slot
        chunk_norms, outs, counts, previous = [], [], [], None
        if grouped:
            out, norm, count = normalized(groups[1], conv, h1[:, :split], w, scales - 1, None)
            outs, chunk_norms, counts = [out], [norm], [count]
        else:
            for i, (weight, group) in enumerate(zip(weights, groups[1:])):
                add = previous if block.stage_type == "normal" else None
                chunk = h1[:, i * slot : (i + 1) * slot]
                previous, norm, count = normalized(group, conv, chunk, weight, 1, add)
                outs.append(previous)
                chunk_norms.append(norm)
                counts.append(count)
        last = h1[:, split:]
        if block.pools_last_chunk:
            last = block.pool(last)
        cat = torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
        ctx.block, ctx.grouped, ctx.variant = block, grouped, variant
        ctx.counts, ctx.param_dtypes = [count1, *counts], [p.dtype for p in params]
        ctx.param_sizes = [p.numel() for p in params]
        ctx.save_for_backward(x, w1, h1, *norm1, w, *outs, *(t for n in chunk_norms for t in n))
        return cat

    @staticmethod
    def backward(ctx, grad_cat):
        block, grouped, variant = ctx.block, ctx.grouped, ctx.variant
        scales, slot = block.scales, _chunk_slot(block.width)
        n_convs = 1 if grouped else scales - 1
        saved = ctx.saved_tensors
        x, w1, h1, norm1, w = saved[0], saved[1], saved[2], saved[3:8], saved[8]
        weights = [w] if grouped else w.chunk(n_convs)
        outs = saved[9 : 9 + n_convs]
        chunk_norms = [
            saved[9 + n_convs + 5 * i : 9 + n_convs + 5 * (i + 1)] for i in range(n_convs)
        ]
        needs = ctx.needs_input_grad
        need_x, need_w1, need_w, need_params = needs[2], needs[3], needs[4], needs[5:]
        # Each BN group's padded (weight, bias) gradients: norm1's, then the chunk BNs'.
        grad_params = [None] * (2 + 2 * n_convs)
        count1, *counts = ctx.counts
        grad_cat = cast(grad_cat, h1.dtype)
        conv = block.convs[0]
        geometry = (conv.stride, conv.padding, conv.dilation, False, [0, 0])
        split = (scales - 1) * slot

        def bn_relu_backward(grad, norm, count, at):
            """grad through ReLU(BN(y)) with batch statistics: y's, the params' (at `at`)."""
            y, mean, scale, shift, invstd = norm
            grad_y, _, grad_w, grad_b, _, _ = torch.ops.fastres.bn_backward(
                grad, y, scale, shift, None, None, None, True, mean, invstd, None, None, count,
                False, variant,
            )  # fmt: skip
            grad_params[at : at + 2] = grad_w, grad_b
            return grad_y

        grad_weights = [None] * n_convs
        if grouped:
            grad_y = bn_relu_backward(grad_cat[:, :split], chunk_norms[0], counts[0], 2)
            grad_chunks, grad_weights[0], _ = torch.ops.aten.convolution_backward(
                grad_y, h1[:, :split], weights[0], None, *geometry, scales - 1,
                [True, need_w, False],
            )  # fmt: skip
            grad_ins = [grad_chunks]
        else:
            grad_ins, carried = [], None
            for i in reversed(range(scales - 1)):
                part = slice(i * slot, (i + 1) * slot)
                grad = grad_cat[:, part] if carried is None else grad_cat[:, part] + carried
                grad_y = bn_relu_backward(grad, chunk_norms[i], counts[i], 2 + 2 * i)
                conv_in = h1[:, part]
                add = block.stage_type == "normal" and i > 0
                if add:  # the hierarchical add: chunk i + the previous chunk conv's output
                    conv_in = conv_in + outs[i - 1]
                grad_in, grad_weights[i], _ = torch.ops.aten.convolution_backward(
                    grad_y, conv_in, weights[i], None, *geometry, 1, [True, need_w, False]
                )
                carried = grad_in if add else None
                grad_ins.append(grad_in)
            grad_ins.reverse()
        grad_last = grad_cat[:, split:]
        if block.pools_last_chunk:
            pool = block.pool
            kernel = nn.modules.utils._pair(pool.kernel_size)
            stride = nn.modules.utils._pair(pool.stride or pool.kernel_size)
            grad_last = torch.ops.aten.avg_pool2d_backward(
                grad_last, h1[:, split:], kernel, stride, nn.modules.utils._pair(pool.padding),
                pool.ceil_mode, pool.count_include_pad, pool.divisor_override,
            )  # fmt: skip
        grad_h1 = torch.cat([*grad_ins, grad_last], 1)
        grad_y1 = bn_relu_backward(grad_h1, norm1, count1, 0)
        c1 = block.conv1
        grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
            grad_y1, x, w1, None, c1.stride, c1.padding, c1.dilation, False, [0, 0], 1,
            [need_x, need_w1, False],
        )  # fmt: skip
        rows = _slot_map(2 * scales - 1, block.width, x.device)
        real = _real_gradients(rows, grad_params[0::2], grad_params[1::2], ctx.param_sizes)
        grad_params = [
            cast(g, dtype) if need else None
            for g, need, dtype in zip(real, need_params, ctx.param_dtypes)
        ]
        grad_w = None
        if need_w:
            grad_w = grad_weights[0] if grouped else torch.cat(grad_weights)
        return None, None, grad_x, grad_w1, grad_w, *grad_params


def _train_weights(block: nn.Module, dtype: torch.dtype, grouped: bool):
    """(conv1's, the chunk convs' (stacked when `grouped`, else a list), conv3's) raw weights
    in their padded layouts, arranged for the kernels in `dtype`."""
    if eager_autograd():
        w1, _, convs, w3, _ = _padded_launch_weights(block, dtype, fold=False, stacked=grouped)
        return w1, convs[0] if grouped else [w for w, _ in convs], w3
    scales = block.scales
    w1 = arrange_weight(_pad_outputs(block.conv1.weight, scales), dtype)
    convs = [arrange_weight(_pad_inputs(_pad_outputs(c.weight, 1), 1), dtype) for c in block.convs]
    if grouped:
        convs = arrange_weight(torch.cat(convs), dtype)
    return w1, convs, arrange_weight(_pad_inputs(block.conv3.weight, scales), dtype)


def _slot_params(block: nn.Module, grouped: bool) -> list[tuple[Tensor, Tensor] | None]:
    """The affine parameters (weight, bias) of each BN group of a training-mode middle (norm1,
    then the chunk BNs: one group when `grouped`, else one each) in their padded slots, built
    together: one concatenation and gather each way for the whole block (`_SlotParams`). Nones
    where nothing is padded or under torch.compile / torch.func (`_padded_norm` pads then)."""
    scales, width, slot = block.scales, block.width, _chunk_slot(block.width)
    groups = 1 + (1 if grouped else scales - 1)
    if slot == width or not eager_autograd():
        return [None] * groups
    bns = [block.norm1, *block.bns]
    rows = _slot_map(2 * scales - 1, width, block.norm1.weight.device)
    sizes = [scales * slot] + ([(scales - 1) * slot] if grouped else [slot] * (scales - 1))
    params = (*(bn.weight for bn in bns), *(bn.bias for bn in bns))
    padded = apply_function(_SlotParams, rows, sizes, *params)
    return list(zip(padded[0::2], padded[1::2], strict=True))


class _SlotParams(torch.autograd.Function):
    """BN weights and biases of consecutive channel ranges (all weights, then all biases) in
    padded slots (`rows`), returned as (weight, bias) per range of `sizes` padded channels: one
    concatenation and gather each way. Backward reads each real entry's gradient at its
    primary copy: a pad channel's gradient is zero (it only meets zero weight columns), as in
    `padded_weight`."""

    @staticmethod
    def forward(ctx, rows: ChannelMap, sizes: list[int], *params: Tensor):
        ctx.rows, ctx.sizes = rows, [p.numel() for p in params]
        table = torch.cat(params).view(2, -1).index_select(1, rows.index)
        weights, biases = table[0].split(sizes), table[1].split(sizes)
        return tuple(t for pair in zip(weights, biases) for t in pair)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return None, None, *_real_gradients(ctx.rows, grads[0::2], grads[1::2], ctx.sizes)


def _real_gradients(rows: ChannelMap, weight_grads, bias_grads, sizes: list[int]) -> list:
    """The gradients of BN weights and biases laid out in padded slots by `rows`, each real
    entry's read at its primary copy (a pad's is zero: it only meets zero weight columns), as
    the real tensors: every weight's (`sizes` entries each), then every bias's."""
    table = torch.cat([*weight_grads, *bias_grads]).view(2, -1)
    return list(table.index_select(1, rows.inverse).view(-1).split(sizes))


def _bn_relu(y: Tensor, normalized: tuple[bn_ops.Normalized, int, str]) -> Tensor:
    """ReLU(BN(y)) of a `_padded_batch_norm`, as one differentiable `bn_norm_act`."""
    norm, count, group = normalized
    return bn_ops.bn_norm_act(y, norm, count, group=group)


def _padded_batch_norm(
    bns: list[nn.Module],
    y: Tensor,
    mean: Tensor,
    m2: Tensor,
    chunks: int,
    width: int,
    params: tuple[Tensor, Tensor] | None,
) -> tuple[bn_ops.Normalized, int, str]:
    """The BNs of a raw conv output y of `chunks` padded chunk slots, the i-th chunk
    normalized by bns[i * len(bns) // chunks], with batch statistics: each BN finalized once
    from the real channels' statistics, its running statistics updated in the same op; each
    pad channel gets its chunk's first channel's coefficients and affine parameters, so it
    stays a copy of that channel (see `_chunk_slot`). Returns the padded `Normalized`, the
    values per channel and the SyncBN group.

    params: the BNs' padded affine parameters (`_slot_params`): the padded coefficients are then
    one finalize of the padded statistics (a pad channel's are its chunk's first channel's);
    None: the finalized BNs are padded field by field (`_padded_norm`).
    """
    group = bn_ops.sync_group_name(bns[0])
    mean, m2, count = bn_ops.gather_stats(y, mean, m2, group)
    # Each BN's real statistics: a slice of the padded ones where it normalizes one chunk.
    per_bn = chunks // len(bns)
    if per_bn > 1:
        mean_of, m2_of = _unpad_outputs(mean, chunks, width), _unpad_outputs(m2, chunks, width)
        step, part = per_bn * width, per_bn * width
    else:
        mean_of, m2_of, step, part = mean, m2, _chunk_slot(width), width
    norms = [
        bn_ops.batch_normalized(
            bn, mean_of[i * step : i * step + part], m2_of[i * step : i * step + part], count
        )
        for i, bn in enumerate(bns)
    ]
    if params is None:
        return _padded_norm(norms, chunks, width), count, group
    weight, bias = params
    with torch.no_grad():
        scale, shift, invstd = bn_ops.bn_finalize(mean, m2, count, weight, bias, bns[0].eps)
    return bn_ops.Normalized(weight, bias, mean, scale, shift, invstd), count, group


def _padded_norm(norms: list[bn_ops.Normalized], chunks: int, width: int) -> bn_ops.Normalized:
    """The BNs of consecutive channel ranges as one `Normalized` over `chunks` padded slots of
    `width` real channels (`_pad_outputs` of every field): the affine parameters (which get
    gradients) in one concatenation and gather, the coefficients (constants) in another."""
    if len(norms) == 1 and _chunk_slot(width) == width:
        return norms[0]

    def padded(fields: tuple[str, ...]) -> list[Tensor]:
        table = torch.cat([getattr(n, f) for f in fields for n in norms]).view(len(fields), -1)
        if _chunk_slot(width) != width:
            table = table.index_select(1, _slot_map(chunks, width, table.device).index)
        return list(table.unbind(0))

    weight, bias = padded(("weight", "bias"))
    with torch.no_grad():
        mean, scale, shift, invstd = padded(("mean", "scale", "shift", "invstd"))
    return bn_ops.Normalized(weight, bias, mean, scale, shift, invstd)
