"""The 'triton' backend: every convolution of the model through the fused Triton kernel.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the Triton interpreter, for tests).
For a block whose BatchNorms are in eval mode (`model.eval()`, norm_eval, frozen stages):

- each BatchNorm is folded into its convolution (w' = w * gamma / sqrt(var + eps),
  b' = beta - mean * gamma / sqrt(var + eps)), cached per conv until a parameter or buffer
  changes, never written back; when gradients are wanted the fold is recomputed with autograd
  ops each forward, so they reach the conv weight and the BN weight / bias;
- conv + folded BN + ReLU is one kernel; the block's tail (last BN + shortcut + ReLU) is fused
  into its last conv; the avg_down pool is fused into the shortcut conv;
- Bottle2neck convolutions read their chunks in place from conv1's output and, without autograd,
  write straight into the concatenation buffer (the dedicated Res2Net fusion is a later step).

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

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# conv module -> (key of the tensors it was folded from, (arranged weight, bias)).
_FOLD_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
        out = _conv_bn(block.conv1, block.norm1, x, relu=True)
        if isinstance(block, Bottle2neck):
            out = _res2net_middle(block, out)
        else:
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


def _res2net_middle(block: nn.Module, out: Tensor) -> Tensor:
    """The split -> 3x3 convs -> concat of a Bottle2neck, reading conv1's output in place.

    Without autograd each conv writes its channel slice of the concatenation buffer directly;
    with autograd the outputs are concatenated by torch.cat (the out= op has no gradient).
    """
    width, scales = block.width, block.scales
    chunks = out.split(width, 1)
    differentiable = torch.is_grad_enabled() and (
        out.requires_grad or any(p.requires_grad for p in block.parameters())
    )
    last = chunks[scales - 1]
    if block.pools_last_chunk:
        last = block.pool(last)
    outs: list[Tensor] = []
    cat = None
    if not differentiable:
        n, _, h, w = last.shape
        cat = torch.empty(
            (n, width * scales, h, w), dtype=out.dtype, device=out.device,
            memory_format=torch.channels_last,
        )  # fmt: skip
    sp = None
    for i in range(scales - 1):
        inp = chunks[i] if i == 0 or block.stage_type == "stage" else sp + chunks[i]
        dest = None if cat is None else cat[:, i * width : (i + 1) * width]
        sp = _conv_bn(block.convs[i], block.bns[i], inp, relu=True, out=dest)
        outs.append(sp)
    if cat is None:
        return torch.cat([*outs, last], 1).contiguous(memory_format=torch.channels_last)
    cat[:, (scales - 1) * width :].copy_(last)
    return cat
