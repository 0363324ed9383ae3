"""Launcher and `fastres::` custom ops of the fused convolution (`kernels/conv2d_fused.py`).

    out = conv2d_fused(x, w, bias, stride=2, padding=1, residual=r, relu=True)

computes `relu(conv2d(x, w) + bias + r)` in one kernel on NHWC tensors. The ops:

- `fastres::conv2d_fused` -> (out, sum, sumsq): functional, differentiable (backward through
  PyTorch's `convolution_backward`); sum / sumsq are the per-channel statistics of `out` when
  `stats` is set, else empty. Registered with a fake implementation, so torch.compile traces it.
- `fastres::conv2d_fused_out`: the same computation written into a given `out` (e.g. a channel
  slice of a concatenation buffer, as Res2Net uses); not differentiable. `out` may be a slice
  of the same buffer as the inputs as long as the memory it covers is disjoint from theirs.

Both take `groups` (a grouped convolution in one launch) and `input_add` (a second input added
to the first after its prologue: Res2Net's hierarchical add).

The launcher checks its inputs, allocates the output (channels_last), picks the launch
configuration (on CUDA timed once per shape class and GPU and kept on disk, see `tuning`;
derived from the shape under the Triton interpreter) and launches. It never touches
`torch.cuda` for CPU tensors, so it runs under TRITON_INTERPRET=1 on a machine without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tuning

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the kernels take: float64 too under the interpreter (for float64 tests)."""
    return (*_FLOAT_DTYPES, torch.float64) if interpreting() else _FLOAT_DTYPES


def stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the per-channel statistics (the accumulator's): fp64 for fp64, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false")


def check_triton_device(x: Tensor, what: str) -> None:
    """Raises unless Triton can run `what` on x: CUDA tensors, or any under the interpreter.
    (scripts/compile_report.py replaces it to compile for a GPU on a machine without one.)"""
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{what} runs on CUDA tensors, or on {x.device.type} tensors only under "
            f"TRITON_INTERPRET=1 (the Triton interpreter)"
        )


def arrange_weight(weight: Tensor) -> Tensor:
    """The weight stored as [KH, KW, C_in, C_out], returned as a [C_out, C_in, KH, KW] view.

    The kernel reads the weight through its strides; this storage order makes every B tile
    contiguous along C_out. Differentiable (a permuted copy).
    """
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _pair(v: int | Sequence[int], name: str) -> list[int]:
    pair = [v, v] if isinstance(v, int) else list(v)
    if len(pair) != 2 or any(not isinstance(i, int) for i in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def _output_size(
    x: Tensor, weight: Tensor, stride, padding, dilation, input_pool: int
) -> tuple[int, int, int, int]:
    """(PH, PW, OH, OW): the size the convolution sees after the pool, and its output size."""
    ph, pw = (math.ceil(x.shape[2] / input_pool), math.ceil(x.shape[3] / input_pool))
    kh, kw = weight.shape[2:]
    oh = (ph + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (pw + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ph, pw, oh, ow


def _check_vector(t: Tensor | None, name: str, n: int, x: Tensor) -> None:
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if not t.is_floating_point() or t.device != x.device:
        raise ValueError(f"{name} must be a floating-point tensor on {x.device}")


def _check_inputs(
    x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
    stride, padding, dilation, input_relu, input_pool, input_add=None, groups=1,
) -> tuple[int, int, int, int]:  # fmt: skip
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"expected x [N, C_in, H, W] and weight [C_out, C_in, KH, KW], got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype not in kernel_dtypes() or weight.dtype != x.dtype:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in kernel_dtypes())
        raise TypeError(
            f"x and weight must share a dtype among {allowed}; got {x.dtype} and {weight.dtype}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(
            f"groups must be a positive int dividing C_out {weight.shape[0]}, got {groups!r}"
        )
    if weight.shape[1] * groups != x.shape[1]:
        raise ValueError(
            f"weight expects {weight.shape[1]} input channels per group x {groups} groups, "
            f"x has {x.shape[1]}"
        )
    if input_add is not None:
        if input_add.shape != x.shape or input_add.dtype != x.dtype or input_add.device != x.device:
            raise ValueError(
                f"input_add must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                f"{tuple(input_add.shape)} {input_add.dtype} on {input_add.device}"
            )
        if input_pool != 1:
            raise ValueError("input_add cannot be combined with input_pool")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"bad stride {stride}, padding {padding} or dilation {dilation}")
    if not isinstance(input_pool, int) or input_pool < 1:
        raise ValueError(f"input_pool must be a positive int, got {input_pool!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    _check_vector(bias, "bias", c_out, x)
    _check_vector(residual_scale, "residual_scale", c_out, x)
    _check_vector(residual_shift, "residual_shift", c_out, x)
    _check_vector(input_scale, "input_scale", c_in, x)
    _check_vector(input_shift, "input_shift", c_in, x)
    if (residual_scale is None) != (residual_shift is None):
        raise ValueError("residual_scale and residual_shift go together")
    if (input_scale is None) != (input_shift is None):
        raise ValueError("input_scale and input_shift go together")
    if residual_scale is not None and residual is None:
        raise ValueError("residual_scale / residual_shift need a residual")
    sizes = _output_size(x, weight, stride, padding, dilation, input_pool)
    if sizes[2] < 1 or sizes[3] < 1:
        raise ValueError(
            f"input {tuple(x.shape)} is too small for a {tuple(weight.shape[2:])} kernel with "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    out_shape = (x.shape[0], c_out, sizes[2], sizes[3])
    if residual is not None and (tuple(residual.shape) != out_shape or residual.device != x.device):
        raise ValueError(
            f"residual must have the output's shape {out_shape} on {x.device}, got "
            f"{tuple(residual.shape)} on {residual.device}"
        )
    return sizes


def _dot_mode(x: Tensor, allow_tf32: bool) -> int:
    if x.dtype == torch.float64:
        return 3
    if interpreting() or (x.dtype == torch.float32 and not allow_tf32):
        return 1
    return 2 if x.dtype == torch.float32 else 0


def _launch(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    residual_scale: Tensor | None,
    residual_shift: Tensor | None,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    out: Tensor,
    stats: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_relu: bool,
    input_pool: int,
    relu: bool,
    allow_tf32: bool,
    input_add: Tensor | None = None,
    groups: int = 1,
) -> tuple[Tensor, Tensor] | None:
    """Launches the kernel that writes `out`.

    Returns, when `stats`, the per-channel mean and M2 of `out` ([C_out] in `stats_dtype`, from
    the accumulator before rounding), else None.
    """
    import triton
    import triton.language as tl

    from fastres.kernels.conv2d_configs import (
        FLAT_K_MAX_C_IN,
        candidate_configs,
        interpreter_config,
        shape_class,
    )
    from fastres.kernels.conv2d_fused import conv2d_fused_kernel

    check_triton_device(x, "the fused convolution")
    n, _, h, w = x.shape
    # Per group: the kernel's C_in / C_out are one group's channels.
    c_out, c_in, kh, kw = weight.shape
    c_out //= groups
    ph, pw, oh, ow = _output_size(x, weight, stride, padding, dilation, input_pool)
    m = n * oh * ow
    if m == 0 or c_out == 0:
        if not stats:
            return None
        zeros = torch.zeros(weight.shape[0], dtype=stats_dtype(x), device=x.device)
        return zeros, zeros.clone()
    flat_k = c_in < FLAT_K_MAX_C_IN
    res = residual if residual is not None else out
    x2 = input_add if input_add is not None else x
    tiles: dict[int, tuple[Tensor, Tensor]] = {}  # BLOCK_M -> per-tile partials
    dot_mode = _dot_mode(x, allow_tf32)
    residual_mode = 2 if residual_scale is not None else int(residual is not None)
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32

    def launch(config: dict, compile_only: bool = False) -> None:
        tiles_m = triton.cdiv(m, config["BLOCK_M"])
        tile_sum = tile_m2 = None
        if stats:
            shape = (tiles_m, weight.shape[0])
            tile_sum = torch.empty(shape, dtype=stats_dtype(x), device=x.device)
            tile_m2 = torch.empty_like(tile_sum)
            tiles[config["BLOCK_M"]] = (tile_sum, tile_m2)
        grid = (tiles_m * triton.cdiv(c_out, config["BLOCK_N"]), groups)
        if compile_only:
            kernel = functools.partial(conv2d_fused_kernel.warmup, grid=grid)
        else:
            kernel = conv2d_fused_kernel[grid]
        kernel(
            x, input_add, weight, bias, res, residual_scale, residual_shift, input_scale,
            input_shift, out, tile_sum, tile_m2,
            n, h, w, c_in, ph, pw, oh, ow, c_out,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *x2.stride(), *weight.stride(), *res.stride(), *out.stride(),
            weight.shape[0], KH=kh, KW=kw, POOL=input_pool,
            IN_AFFINE=int(input_scale is not None), IN_RELU=int(input_relu),
            IN_ADD=int(input_add is not None),
            HAS_BIAS=int(bias is not None), RESIDUAL=residual_mode, RELU=int(relu),
            STATS=int(stats), DOT_MODE=dot_mode, ACC=acc_dtype,
            EMULATE_RTNE=int(interpreting()),
            FLAT_K=int(flat_k),
            **config,
        )  # fmt: skip

    if interpreting():
        config = interpreter_config(m, kh * kw * c_in if flat_k else c_in, c_out)
    else:
        shape = "x".join(map(str, shape_class(m, c_in, c_out, kh, kw, stride[0], input_pool)))
        key = f"conv2d_fused {shape} g{groups} {str(x.dtype).removeprefix('torch.')} dot{dot_mode}"
        candidates = candidate_configs(
            m, kh * kw * c_in, c_in, c_out, flat_k, x.element_size(), input_pool,
            tuning.shared_memory_limit(x.device),
        )  # fmt: skip
        config = tuning.choose(
            x.device, key, candidates, launch, functools.partial(launch, compile_only=True)
        )
    launch(config)
    if not stats:
        return None
    return _merge_tiles(*tiles[config["BLOCK_M"]], m, config["BLOCK_M"])


def _merge_tiles(tile_sum: Tensor, tile_m2: Tensor, m: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Per-tile (sum, M2) [tiles, C] of m rows in tiles of block_m -> mean [C], M2 [C]."""
    from .batchnorm import combine_stats

    counts = torch.full((tile_sum.shape[0],), block_m, dtype=tile_sum.dtype, device=tile_sum.device)
    counts[-1] = m - (tile_sum.shape[0] - 1) * block_m
    _, mean, m2 = combine_stats(counts, tile_sum / counts.unsqueeze(1), tile_m2)
    return mean, m2


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors may address common memory (conservative: True when unsure).

    Channel slices of one NHWC buffer (equal strides, channel stride 1, every other stride a
    multiple of the pixel stride P) each cover one channel range [offset mod P, + C) of every
    pixel: disjoint ranges never overlap, which is how Res2Net's chunks and concatenation
    slices share a buffer. Otherwise the spans of memory they cover are compared.
    """
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.dim() == 4 and a.stride() == b.stride() and a.element_size() == b.element_size():
        pixel = a.stride(3)
        if a.stride(1) == 1 and pixel > 0 and a.stride(0) % pixel == 0 and a.stride(2) % pixel == 0:
            start_a, start_b = a.storage_offset() % pixel, b.storage_offset() % pixel
            if start_a + a.shape[1] <= pixel and start_b + b.shape[1] <= pixel:
                return start_a < start_b + b.shape[1] and start_b < start_a + a.shape[1]

    def span(t: Tensor) -> tuple[int, int]:
        last = sum((d - 1) * st for d, st in zip(t.shape, t.stride()))
        return t.storage_offset() * t.element_size(), (
            t.storage_offset() + last + 1
        ) * t.element_size()

    (lo_a, hi_a), (lo_b, hi_b) = span(a), span(b)
    return lo_a < hi_b and lo_b < hi_a


def _allocate_out(x: Tensor, weight: Tensor, sizes) -> Tensor:
    return torch.empty(
        (x.shape[0], weight.shape[0], sizes[2], sizes[3]),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )


def _prologue_reference(
    x: Tensor,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    input_relu: bool,
    pool: int,
    input_add: Tensor | None = None,
) -> Tensor:
    """What the kernel's prologue computes, in PyTorch (for backward)."""
    if input_scale is not None:
        shape = (1, -1, 1, 1)
        x = (x.float() * input_scale.view(shape) + input_shift.view(shape)).to(x.dtype)
    if input_relu:
        x = torch.relu(x)
    if pool > 1:
        x = F.avg_pool2d(x, pool, pool, ceil_mode=True, count_include_pad=False)
    if input_add is not None:
        x = x + input_add
    return x


@torch.library.custom_op("fastres::conv2d_fused", mutates_args=())
def _conv2d_fused_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    residual_scale: Tensor | None,
    residual_shift: Tensor | None,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_relu: bool,
    input_pool: int,
    relu: bool,
    stats: bool,
    allow_tf32: bool,
    input_add: Tensor | None,
    groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    sizes = _check_inputs(
        x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
        stride, padding, dilation, input_relu, input_pool, input_add, groups,
    )  # fmt: skip
    out = _allocate_out(x, weight, sizes)
    moments = _launch(
        x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
        out, stats, stride, padding, dilation, input_relu, input_pool, relu, allow_tf32,
        input_add, groups,
    )  # fmt: skip
    if moments is None:
        empty = x.new_empty(0, dtype=stats_dtype(x))
        return out, empty, empty.clone()
    count = out.numel() // out.shape[1]
    mean, m2 = moments
    return out, mean * count, m2 + mean * mean * count


@_conv2d_fused_op.register_fake
def _(
    x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
    stride, padding, dilation, input_relu, input_pool, relu, stats, allow_tf32,
    input_add, groups,
):  # fmt: skip
    sizes = _output_size(x, weight, stride, padding, dilation, input_pool)
    n_stats = weight.shape[0] if stats else 0
    return (
        _allocate_out(x, weight, sizes),
        x.new_empty(n_stats, dtype=stats_dtype(x)),
        x.new_empty(n_stats, dtype=stats_dtype(x)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, residual_scale, _, input_scale, input_shift = inputs[:8]
    input_relu, input_pool, relu = inputs[11:14]
    input_add, groups = inputs[16:18]
    out, sum_buf, sumsq_buf = output
    ctx.mark_non_differentiable(sum_buf, sumsq_buf)
    ctx.save_for_backward(
        x, weight, bias, residual, residual_scale, input_scale, input_shift, out, input_add
    )
    ctx.conv_args = inputs[8:11]  # stride, padding, dilation
    ctx.input_relu, ctx.input_pool, ctx.relu, ctx.groups = input_relu, input_pool, relu, groups


def _channel_sum(t: Tensor) -> Tensor:
    return t.sum((0, 2, 3), dtype=stats_dtype(t))


def _backward(ctx, grad_out: Tensor, _grad_sum, _grad_sumsq):
    saved = ctx.saved_tensors
    x, weight, bias, residual, residual_scale, input_scale, input_shift, out, input_add = saved
    needs = ctx.needs_input_grad
    grads = [None] * 18
    grad_z = grad_out.masked_fill(out <= 0, 0) if ctx.relu else grad_out
    if bias is not None and needs[2]:
        grads[2] = _channel_sum(grad_z).to(bias.dtype)
    if residual is not None:
        if residual_scale is None:
            grads[3] = grad_z.to(residual.dtype) if needs[3] else None
        else:
            rs = residual_scale.view(1, -1, 1, 1)
            grads[3] = (grad_z.float() * rs).to(residual.dtype) if needs[3] else None
            if needs[4]:
                grads[4] = _channel_sum(grad_z.float() * residual.float()).to(rs.dtype)
            if needs[5]:
                grads[5] = _channel_sum(grad_z).to(rs.dtype)
    needs_x = needs[0] or needs[6] or needs[7] or needs[16]
    if needs_x or needs[1]:
        x_in = _prologue_reference(
            x, input_scale, input_shift, ctx.input_relu, ctx.input_pool, input_add
        )
        stride, padding, dilation = ctx.conv_args
        grad_xin, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_z.to(x.dtype), x_in, weight, None, stride, padding, dilation,
            False, [0, 0], ctx.groups, [needs_x, needs[1], False],
        )  # fmt: skip
        grads[1] = grad_w
        if input_add is not None and needs[16]:
            grads[16] = grad_xin
        if needs[0] or needs[6] or needs[7]:
            grads[0], grads[6], grads[7] = _prologue_backward(
                grad_xin, x, input_scale, input_shift, ctx.input_relu, ctx.input_pool, needs
            )
    return tuple(grads)


def _prologue_backward(grad, x, input_scale, input_shift, input_relu, pool, needs):
    """Gradients of x, input_scale, input_shift through `_prologue_reference`."""
    shape = (1, -1, 1, 1)
    u = x
    if input_scale is not None:
        u = (x.float() * input_scale.view(shape) + input_shift.view(shape)).to(x.dtype)
    if pool > 1:
        v = torch.relu(u) if input_relu else u
        grad = torch.ops.aten.avg_pool2d_backward(
            grad, v, [pool, pool], [pool, pool], [0, 0], True, False, None
        )
    if input_relu:
        grad = grad.masked_fill(u <= 0, 0)
    if input_scale is None:
        return grad, None, None
    grad_x = (grad.float() * input_scale.view(shape)).to(x.dtype) if needs[0] else None
    grad_scale = _channel_sum(grad.float() * x.float()).to(input_scale.dtype) if needs[6] else None
    grad_shift = _channel_sum(grad).to(input_shift.dtype) if needs[7] else None
    return grad_x, grad_scale, grad_shift


torch.library.register_autograd("fastres::conv2d_fused", _backward, setup_context=_setup_context)


@torch.library.custom_op("fastres::conv2d_fused_out", mutates_args=("out",))
def _conv2d_fused_out_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    residual_scale: Tensor | None,
    residual_shift: Tensor | None,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    input_relu: bool,
    input_pool: int,
    relu: bool,
    allow_tf32: bool,
    out: Tensor,
    input_add: Tensor | None,
    groups: int,
) -> None:
    sizes = _check_inputs(
        x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
        stride, padding, dilation, input_relu, input_pool, input_add, groups,
    )  # fmt: skip
    expected = (x.shape[0], weight.shape[0], sizes[2], sizes[3])
    if tuple(out.shape) != expected or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {expected} {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    # Programs of one launch read their inputs while others write out: no common memory.
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("input_add", input_add)):
        if t is not None and _may_overlap(t, out):
            raise ValueError(f"out must not share memory with {name}")
    _launch(
        x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
        out, False, stride, padding, dilation, input_relu, input_pool, relu, allow_tf32,
        input_add, groups,
    )  # fmt: skip


@_conv2d_fused_out_op.register_fake
def _(
    x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
    stride, padding, dilation, input_relu, input_pool, relu, allow_tf32, out,
    input_add, groups,
) -> None:  # fmt: skip
    return None


def conv2d_fused(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    residual: Tensor | None = None,
    residual_scale: Tensor | None = None,
    residual_shift: Tensor | None = None,
    input_scale: Tensor | None = None,
    input_shift: Tensor | None = None,
    input_relu: bool = False,
    input_pool: int = 1,
    input_add: Tensor | None = None,
    groups: int = 1,
    relu: bool = False,
    stats: bool = False,
    allow_tf32: bool | None = None,
    out: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Convolution with its neighbours fused in (see `kernels/conv2d_fused.py`).

    Computes, per output element,
    `relu(conv2d(pool(relu(x * input_scale + input_shift)) + input_add, weight, groups) + bias
    + residual * residual_scale + residual_shift)`, every part optional.

    Args:
        x: [N, C_in, H, W], float32 / float16 / bfloat16, any strides (channels_last or a
            channel slice of a larger channels_last buffer is read in place).
        weight: [C_out, C_in / groups, KH, KW], x's dtype, any strides (`arrange_weight` gives
            the fastest).
        bias: [C_out] or None, any float dtype (added in fp32).
        stride, padding, dilation: of the convolution, an int or an (h, w) pair.
        residual: [N, C_out, OH, OW] added before the ReLU, or None.
        residual_scale, residual_shift: [C_out], applied to the residual first (a shortcut's
            BatchNorm), or None.
        input_scale, input_shift: [C_in], applied to every input element first (the previous
            layer's BatchNorm), or None; zero padding stays zero.
        input_relu: ReLU on the input elements (after input_scale / input_shift).
        input_pool: k > 1 average-pools the input k x k with stride k (ceil_mode,
            count_include_pad=False) before the convolution.
        input_add: [N, C_in, H, W] in x's dtype, any strides, added to the input after its
            prologue (input_pool must be 1), or None; the sum is rounded to x's dtype.
        groups: a grouped convolution (nn.Conv2d's groups): group g convolves input channels
            [g*C_in/groups, ...) into output channels [g*C_out/groups, ...), one launch.
        relu: ReLU on the output.
        stats: also return the per-channel sum and sum of squares of the output ([C_out] fp32).
        allow_tf32: float32 products in TF32; None follows torch.backends.cudnn.allow_tf32
            (PyTorch's own rule for convolutions). Ignored for fp16 / bf16 and on CPU.
        out: write into this [N, C_out, OH, OW] tensor (e.g. a channel slice of a larger
            buffer; the memory it covers must be disjoint from the inputs') instead of a new
            one. Not differentiable, no stats.

    Returns:
        out [N, C_out, OH, OW] in x's dtype (channels_last when allocated here), or
        (out, sum, sumsq) when `stats`.
    """
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    args = (
        x, weight, bias, residual, residual_scale, residual_shift, input_scale, input_shift,
        _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation"),
        bool(input_relu), int(input_pool), bool(relu),
    )  # fmt: skip
    if out is not None:
        if stats:
            raise ValueError("stats are not available with out=")
        torch.ops.fastres.conv2d_fused_out(*args, allow_tf32, out, input_add, int(groups))
        return out
    result, sum_buf, sumsq_buf = torch.ops.fastres.conv2d_fused(
        *args, bool(stats), allow_tf32, input_add, int(groups)
    )
    return (result, sum_buf, sumsq_buf) if stats else result
