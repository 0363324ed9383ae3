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
  or pooled there by a small Triton kernel.

The stem max-pool stays in PyTorch. Activations come out channels_last in the compute dtype
(the input's, or the autocast dtype). Falls back to the oracle (`forward_reference` /
`stem_reference`) for what the fused path does not cover yet: BatchNorm in training mode (batch
statistics), GroupNorm, float64.
"""

from __future__ import annotations

import importlib.util
import weakref

import torch
from torch import Tensor, nn

from .backends import Backend
from .ops.conv2d_fused import arrange_weight, conv2d_fused, interpreting
from .ops.res2net_fused import res2net_pool

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# conv module -> (key of the tensors it was folded from, (arranged weight, bias)).
_FOLD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Bottle2neck -> (layout, the folded pieces it was built from, its launch weights).
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
        if dtype is None or not all(_foldable(conv, bn) for conv, bn in pairs):
            return model.stem_reference(x)
        x = x.to(dtype).contiguous(memory_format=torch.channels_last)
        for conv, bn in pairs:
            x = _conv_bn(conv, bn, x, relu=True)
        return model.maxpool(x)

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        if dtype is None or not _block_foldable(block):
            # BatchNorm in training mode (batch statistics) and GroupNorm are later issues:
            # the oracle runs them.
            return block.forward_reference(x)
        x = x.to(dtype)
        identity = x if block.downsample is None else _shortcut(block.downsample, x)
        from .models.res2net import Bottle2neck
        from .models.resnet import BasicBlock

        if isinstance(block, BasicBlock):
            out = _conv_bn(block.conv1, block.norm1, x, relu=True)
            return _conv_bn(block.conv2, block.norm2, out, relu=True, residual=identity)
        if isinstance(block, Bottle2neck):
            out = _res2net_split_conv_concat(block, x)
        else:
            out = _conv_bn(block.conv1, block.norm1, x, relu=True)
            out = _conv_bn(block.conv2, block.norm2, out, relu=True)
        return _conv_bn(block.conv3, block.norm3, out, relu=True, residual=identity)


def _compute_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype the kernels run in (autocast's when enabled), or None if they cannot."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    return dtype if dtype in _FUSED_DTYPES else None


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
    in `dtype`) and the folded bias ([C_out] fp32)."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    bias = -bn.running_mean.float() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.float()
        bias = bias * bn.weight.float() + bn.bias.float()
    if conv.bias is not None:
        bias = bias + conv.bias.float() * scale
    weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
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


def _res2net_launch_weights(block: nn.Module, dtype: torch.dtype, shared: bool):
    """The folded weights the no-copy Bottle2neck path launches with, cached per block.

    Returns (conv1 weight, conv1 bias, convs): conv1's output channels rotated so that the
    last chunk comes first when `shared` (see `_res2net_split_conv_concat`); convs is one
    stacked (weight [(scales-1)*width, width, 3, 3], bias) pair for a 'stage' block's grouped
    launch, else a list of (weight, bias) per conv.
    """
    pieces = [_folded(block.conv1, block.norm1, dtype)]
    pieces += [_folded(conv, bn, dtype) for conv, bn in zip(block.convs, block.bns)]
    cacheable = not torch.compiler.is_compiling() and not any(
        t.requires_grad for piece in pieces for t in piece
    )
    cached = _RES2NET_CACHE.get(block) if cacheable else None
    if (
        cached is not None
        and cached[0] == shared
        and all(a is b for a, b in zip(cached[1], pieces, strict=True))
    ):
        return cached[2]
    (w1, b1), *convs = pieces
    if shared:
        split = (block.scales - 1) * block.width
        w1 = arrange_weight(torch.cat([w1[split:], w1[:split]]))
        b1 = torch.cat([b1[split:], b1[:split]])
    if block.stage_type == "stage":
        convs = (arrange_weight(torch.cat([w for w, _ in convs])), torch.cat([b for _, b in convs]))
    launch = (w1, b1, convs)
    if cacheable:
        _RES2NET_CACHE[block] = (shared, pieces, launch)
    return launch


def _res2net_split_conv_concat(block: nn.Module, x: Tensor) -> Tensor:
    """conv1 -> split -> 3x3 convs -> concat of a Bottle2neck: the input of its conv3.

    Args:
        x: [N, inplanes, H, W], the block input.

    Returns:
        [N, width * scales, OH, OW], channels_last (possibly a channel slice of a larger buffer).

    Without autograd (inference), nothing is copied and no tensor is formed between the convs:

    - last chunk not pooled: one buffer [sp_0 .. sp_{s-2} | chunk_{s-1} | chunk_0 .. chunk_{s-2}]:
      conv1, its output channels rotated (the last chunk first), writes the last two parts;
      each 3x3 conv reads its chunk there and writes sp_i; conv3 reads the first `scales`
      parts, so the last chunk is where conv3 reads it without a copy, and conv3's read starts
      at the buffer's aligned channel 0;
    - last chunk pooled: conv1 writes its own buffer, the Triton pool writes the pooled chunk
      into the last slice of the concatenation buffer;
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
    width, scales = block.width, block.scales
    conv1, conv = block.conv1, block.convs[0]
    pool = _last_chunk_pool(block) if block.pools_last_chunk else None
    shared = not block.pools_last_chunk
    w1, b1, convs = _res2net_launch_weights(block, x.dtype, shared)
    h1 = (x.shape[2] - 1) // conv1.stride[0] + 1
    w1_out = (x.shape[3] - 1) // conv1.stride[1] + 1
    oh, ow = (
        (size + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1)
        // conv.stride[i]
        + 1
        for i, size in enumerate((h1, w1_out))
    )
    split = (scales - 1) * width
    if shared:
        buf = _nhwc_empty(x, (2 * scales - 1) * width, h1, w1_out)
        conv2d_fused(
            x, w1, b1, stride=conv1.stride, relu=True, out=buf[:, split : split + split + width]
        )
        cat, chunks = buf[:, : scales * width], buf[:, scales * width : scales * width + split]
    else:
        out1 = _nhwc_empty(x, scales * width, h1, w1_out)
        conv2d_fused(x, w1, b1, stride=conv1.stride, relu=True, out=out1)
        cat, chunks = _nhwc_empty(x, scales * width, oh, ow), out1[:, :split]
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
        return cat
    previous = None
    for i, (weight, bias) in enumerate(convs):
        dest = cat[:, i * width : (i + 1) * width]
        chunk = chunks[:, i * width : (i + 1) * width]
        conv2d_fused(chunk, weight, bias, input_add=previous, out=dest, **geometry)
        previous = dest
    return cat


def _res2net_autograd(block: nn.Module, x: Tensor) -> Tensor:
    """The differentiable Bottle2neck middle (see `_res2net_split_conv_concat`)."""
    width, scales = block.width, block.scales
    out = _conv_bn(block.conv1, block.norm1, x, relu=True)
    conv = block.convs[0]
    geometry = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, relu=True)
    folded = [_folded(c, bn, out.dtype) for c, bn in zip(block.convs, block.bns)]
    split = (scales - 1) * width
    if block.stage_type == "stage":
        weight = arrange_weight(torch.cat([w for w, _ in folded]))
        bias = torch.cat([b for _, b in folded])
        outs = [conv2d_fused(out[:, :split], weight, bias, groups=scales - 1, **geometry)]
    else:
        outs, previous = [], None
        for i, (weight, bias) in enumerate(folded):
            chunk = out[:, i * width : (i + 1) * width]
            previous = conv2d_fused(chunk, weight, bias, input_add=previous, **geometry)
            outs.append(previous)
    last = out[:, split:]
    if block.pools_last_chunk:
        last = block.pool(last)
    return torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
