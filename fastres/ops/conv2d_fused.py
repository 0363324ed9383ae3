"""Launcher and `fastres::` custom ops of the fused convolution (`kernels/conv2d_fused.py`).

    out = conv2d_fused(x, w, bias, stride=2, padding=1, residual=r, relu=True)

computes `relu(conv2d(x, w) + bias + r)` in one kernel on NHWC tensors. The ops:

- `fastres::conv2d_fused` -> (out, mean, m2): functional, differentiable (backward through
  PyTorch's `convolution_backward`); mean / m2 are the per-channel statistics of `out` when
  `stats` is set, else empty. Registered with a fake implementation, so torch.compile traces it.
- `fastres::conv2d_fused_out`: the same computation written into a given `out` (e.g. a channel
  slice of a concatenation buffer, as Res2Net uses); not differentiable. `out` may be a slice
  of the same buffer as the inputs as long as the memory it covers is disjoint from theirs.

Both take `groups` (a grouped convolution in one launch) and `input_add` (a second input added
to the first after its prologue: Res2Net's hierarchical add).

The launcher checks its inputs, allocates the output (channels_last), picks the launch
configuration (on CUDA timed once per shape class and GPU and kept on disk, see `tuning`;
derived from the shape under the Triton interpreter) and launches. What does not change from
call to call for one key (the shapes, strides, dtypes and devices of every argument and its
flags) is worked out once and kept (`prepare`): the inputs' verdict, the output size, the grid,
the configuration, the kernel's arguments and, on CUDA, the compiled kernel, launched without
Triton's per-call binding (`launcher.DirectLaunch`). In eager mode with nothing that sees an
op's dispatch (`dispatch_free`) the ops' Python bodies are called directly: the custom op's
dispatch layers cost more Python than the launch. With gradients the ops run under a plain
autograd.Function (`_Conv2dFused`): the custom op's own autograd wrapper costs more per call.
It never touches `torch.cuda` for CPU tensors, so it runs under TRITON_INTERPRET=1 on a machine
without a GPU.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tuning
from .precision import accumulator_dtype, cast, triton_accumulator

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the kernels take: float64 too under the interpreter (for float64 tests)."""
    return (*_FLOAT_DTYPES, torch.float64) if interpreting() else _FLOAT_DTYPES


def runs_dtype(dtype: torch.dtype) -> bool:
    """Whether the kernels take `dtype` (`kernel_dtypes`; the environment is read only for a
    dtype outside the usual three)."""
    return dtype in _FLOAT_DTYPES or dtype in kernel_dtypes()


# Whether Triton kernels run through the interpreter: TRITON_INTERPRET as this module is
# imported. Triton reads it once too, when it decorates the kernels: set it before importing
# fastres (tests replace this value to check the errors given without the interpreter).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false")


def interpreting() -> bool:
    """True when Triton kernels run through the interpreter (`INTERPRET`)."""
    return INTERPRET


def check_triton_device(x: Tensor, what: str) -> None:
    """Raises unless Triton can run `what` on x: CUDA tensors, or any under the interpreter.
    (scripts/compile_report.py replaces it to compile for a GPU on a machine without one.)"""
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{what} runs on CUDA tensors, or on {x.device.type} tensors only under "
            f"TRITON_INTERPRET=1 (the Triton interpreter)"
        )


def arrange_weight(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The weight [C_out, C_in, KH, KW] laid out for the kernel (`arranged_strides`), in `dtype`
    if given: the weight itself where it is so already. Differentiable (at most one op: a cast
    and/or a copy)."""
    dtype = dtype or weight.dtype
    if not flat_k(weight.shape[1]):
        return weight.to(dtype, memory_format=torch.channels_last)
    arranged = weight.permute(2, 3, 1, 0).to(dtype, memory_format=torch.contiguous_format)
    return arranged.permute(3, 2, 0, 1)


def arranged_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialized weight of `shape` [C_out, C_in, KH, KW] in `arrange_weight`'s layout."""
    c_out, c_in, kh, kw = shape
    if not flat_k(c_in):
        return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    strides = (1, c_out, kw * c_in * c_out, c_in * c_out)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


def flat_k(c_in: int) -> bool:
    """Whether the kernel walks K = KH * KW * C_in flat (`kernels/conv2d_fused.py`, FLAT_K) for
    C_in input channels (per group), which also decides the weight's layout (`arrange_weight`):

    - tap-major K (C_in >= FLAT_K_MAX_C_IN): channels_last ([C_out, KH, KW, C_in] storage). A B
      tile is contiguous along K (K-major, as Hopper's TF32 wgmma wants it), and it is the layout
      of eager's autocast cast of a channels_last parameter, which `convolution_backward`
      (oneDNN, cuDNN) takes without a copy.
    - flat K (the stem's 3 channels): [KH, KW, C_in, C_out] storage, B tiles contiguous along
      C_out. K-major rows of KH * KW * C_in values are not 16-byte aligned there: Triton 3.6
      then neither pipelines the bf16 B loads nor keeps the 7x7 stem free of spills.
    """
    from fastres.kernels.conv2d_configs import FLAT_K_MAX_C_IN

    return c_in < FLAT_K_MAX_C_IN


def as_pair(v: int | Sequence[int], name: str) -> list[int]:
    """An int or (h, w) pair argument as [h, w]."""
    pair = [v, v] if isinstance(v, int) else list(v)
    if len(pair) != 2 or not (isinstance(pair[0], int) and isinstance(pair[1], int)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def check_channel_vector(t: Tensor | None, name: str, n: int, x: Tensor) -> None:
    """Raises unless t is None or a contiguous floating-point [n] vector on x's device (the
    kernels read per-channel vectors at unit stride)."""
    if t is None:
        return
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if n > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}")
    if not t.is_floating_point() or t.device != x.device:
        raise ValueError(f"{name} must be a floating-point tensor on {x.device}")


class ConvArgs(NamedTuple):
    """What one launch of the fused convolution computes (`conv2d_fused` documents each).

    Also the custom ops' leading arguments, in this order: `fastres::conv2d_fused` takes these
    and `stats`, `fastres::conv2d_fused_out` these and `out`; their autograd and fake
    implementations bind their inputs to it by name.
    """

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    allow_tf32: bool
    residual: Tensor | None = None
    residual_scale: Tensor | None = None
    residual_shift: Tensor | None = None
    input_scale: Tensor | None = None
    input_shift: Tensor | None = None
    input_relu: bool = False
    input_pool: int = 1
    input_add: Tensor | None = None
    relu: bool = False

    @classmethod
    def bind(cls, params: dict) -> ConvArgs:
        """The fields of a custom op's parameters (its `locals()` on entry)."""
        return cls._make(map(params.__getitem__, cls._fields))

    @classmethod
    def of_op_inputs(cls, inputs: Sequence) -> ConvArgs:
        """The leading op inputs that are ConvArgs (autograd's `inputs`)."""
        return cls(*inputs[: len(cls._fields)])

    def output_size(self) -> tuple[int, int, int, int]:
        """(PH, PW, OH, OW): the size the convolution sees after the pool, and its output size."""
        ph = math.ceil(self.x.shape[2] / self.input_pool)
        pw = math.ceil(self.x.shape[3] / self.input_pool)
        kh, kw = self.weight.shape[2:]
        stride, padding, dilation = self.stride, self.padding, self.dilation
        oh = (ph + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        ow = (pw + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return ph, pw, oh, ow

    def output_shape(self, size: tuple[int, int, int, int] | None = None) -> tuple[int, ...]:
        """[N, C_out, OH, OW]; `size` is `output_size()` where already known."""
        _, _, oh, ow = size or self.output_size()
        return self.x.shape[0], self.weight.shape[0], oh, ow

    def allocate_output(self, size: tuple[int, int, int, int] | None = None) -> Tensor:
        """A new channels_last output tensor; `size` is `output_size()` where already known."""
        x = self.x
        shape = self.output_shape(size)
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)

    def empty_stats(self, stats: bool) -> tuple[Tensor, Tensor]:
        """Per-channel statistics buffers: [C_out] when `stats`, else empty."""
        n = self.weight.shape[0] if stats else 0
        return tuple(self.x.new_empty(n, dtype=accumulator_dtype(self.x.dtype)) for _ in range(2))

    def dot_precision(self, interpret: bool) -> str:
        """The kernel's DOT_PRECISION (kernels/conv2d_fused.py); `interpret`: `interpreting()`."""
        if self.x.dtype == torch.float64:
            return "fp64"
        if interpret or (self.x.dtype == torch.float32 and not self.allow_tf32):
            return "ieee"
        return "tf32" if self.x.dtype == torch.float32 else "native"


def save_args(ctx, args: NamedTuple, *extra: Tensor) -> None:
    """Saves a custom op's arguments for backward: its tensors (and `extra`) through
    `ctx.save_for_backward`, the rest on ctx. `saved_args` gives them back."""
    names = [name for name, value in zip(args._fields, args) if isinstance(value, Tensor)]
    ctx.save_for_backward(*(getattr(args, name) for name in names), *extra)
    ctx.args, ctx.tensor_fields = args._replace(**dict.fromkeys(names)), names


def saved_args(ctx) -> tuple[NamedTuple, tuple[Tensor, ...]]:
    """(args, extra) as `save_args(ctx, args, *extra)` saved them."""
    tensors, n = ctx.saved_tensors, len(ctx.tensor_fields)
    return ctx.args._replace(**dict(zip(ctx.tensor_fields, tensors[:n]))), tensors[n:]


def check_inputs(args: ConvArgs) -> tuple[int, int, int, int]:
    """Raises a ValueError / TypeError that says what was expected unless args can launch;
    returns `args.output_size()` (PH, PW, OH, OW), for `allocate_output` and the prepared launch."""
    x, weight, groups = args.x, args.weight, args.groups
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"expected x [N, C_in, H, W] and weight [C_out, C_in, KH, KW], got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.dtype != x.dtype or not runs_dtype(x.dtype):
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
    input_add = args.input_add
    if input_add is not None:
        if input_add.shape != x.shape or input_add.dtype != x.dtype or input_add.device != x.device:
            raise ValueError(
                f"input_add must match x ({tuple(x.shape)} {x.dtype} on {x.device}), got "
                f"{tuple(input_add.shape)} {input_add.dtype} on {input_add.device}"
            )
        if args.input_pool != 1:
            raise ValueError("input_add cannot be combined with input_pool")
    stride, padding, dilation = args.stride, args.padding, args.dilation
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"bad stride {stride}, padding {padding} or dilation {dilation}")
    if not isinstance(args.input_pool, int) or args.input_pool < 1:
        raise ValueError(f"input_pool must be a positive int, got {args.input_pool!r}")
    c_in, c_out = x.shape[1], weight.shape[0]
    check_channel_vector(args.bias, "bias", c_out, x)
    check_channel_vector(args.residual_scale, "residual_scale", c_out, x)
    check_channel_vector(args.residual_shift, "residual_shift", c_out, x)
    check_channel_vector(args.input_scale, "input_scale", c_in, x)
    check_channel_vector(args.input_shift, "input_shift", c_in, x)
    if (args.residual_scale is None) != (args.residual_shift is None):
        raise ValueError("residual_scale and residual_shift go together")
    if (args.input_scale is None) != (args.input_shift is None):
        raise ValueError("input_scale and input_shift go together")
    if args.residual_scale is not None and args.residual is None:
        raise ValueError("residual_scale / residual_shift need a residual")
    size = args.output_size()
    if size[2] < 1 or size[3] < 1:
        raise ValueError(
            f"input {tuple(x.shape)} is too small for a {tuple(weight.shape[2:])} kernel with "
            f"stride {stride}, padding {padding}, dilation {dilation}"
        )
    residual, out_shape = args.residual, args.output_shape(size)
    if residual is not None and (tuple(residual.shape) != out_shape or residual.device != x.device):
        raise ValueError(
            f"residual must have the output's shape {out_shape} on {x.device}, got "
            f"{tuple(residual.shape)} on {residual.device}"
        )
    return size


class PreparedConv:
    """What every launch of one key (`prepare`) shares: nothing of it depends on the tensors'
    data or addresses, so it is worked out at the key's first call and kept.

    Attributes:
        out_shape: [N, C_out, OH, OW].
        stats: whether launches also give the per-channel statistics.
        acc: the accumulator's torch dtype (the statistics' dtype).
        conv: the convolution's launch, None when there is nothing to compute (no output pixel
            or channel).
        tiles: the per-tile statistics' shape [tiles, C_out] (when `stats`).
        merge: their merge's launch (when `stats`).
        merge_args: the merge's integer arguments (tiles, C_out, rows, rows per tile).
    """

    __slots__ = ("out_shape", "stats", "acc", "conv", "tiles", "merge", "merge_args")

    def __init__(self, out_shape, stats, acc, conv=None, tiles=None, merge_args=None):
        self.out_shape, self.stats, self.acc = out_shape, stats, acc
        self.conv, self.tiles, self.merge_args = conv, tiles, merge_args
        self.merge = None if merge_args is None else _merge_launch(*merge_args, acc)

    def allocate_output(self, x: Tensor) -> Tensor:
        """A new channels_last output tensor."""
        return torch.empty(
            self.out_shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last
        )

    def launch(self, args: ConvArgs, out: Tensor) -> tuple[Tensor, Tensor] | None:
        """Launches the kernel that writes `out` (args of this key).

        Returns, when `stats`, the per-channel mean and M2 of `out` ([C_out] in the
        accumulator's dtype, taken before rounding), else None.
        """
        if self.conv is None:
            if not self.stats:
                return None
            zeros = torch.zeros(self.out_shape[1], dtype=self.acc, device=args.x.device)
            return zeros, zeros.clone()
        tiles = self.launch_tiles(args, out)
        if not self.stats:
            return None
        # Apart: a custom op's outputs may not alias one another.
        mean = torch.empty(self.out_shape[1], dtype=self.acc, device=args.x.device)
        m2 = torch.empty(self.out_shape[1], dtype=self.acc, device=args.x.device)
        self.merge(*tiles, mean, m2)
        return mean, m2

    def launch_tiles(self, args: ConvArgs, out: Tensor) -> tuple[Tensor, Tensor] | None:
        """Launches the convolution (there is something to compute: `conv`); returns its
        per-tile (sum, M2) [tiles, C_out] when `stats`, unmerged."""
        tile_sum = tile_m2 = None
        if self.stats:
            tile_sum = torch.empty(self.tiles, dtype=self.acc, device=args.x.device)
            tile_m2 = torch.empty(self.tiles, dtype=self.acc, device=args.x.device)
        self.conv(*_pointers(args, out, tile_sum, tile_m2))
        return None if tile_sum is None else (tile_sum, tile_m2)

    def channels(self, x: Tensor, n: int) -> Tensor:
        """n new per-output-channel vectors [n, C_out] in the accumulator's dtype (one
        allocation; not for a custom op's outputs, which may not alias)."""
        return torch.empty((n, self.out_shape[1]), dtype=self.acc, device=x.device)


def _pointers(args: ConvArgs, out: Tensor, tile_sum, tile_m2) -> tuple:
    """The kernel's pointer arguments, in its signature's order."""
    residual = args.residual if args.residual is not None else out
    return (
        args.x, args.input_add, args.weight, args.bias, residual, args.residual_scale,
        args.residual_shift, args.input_scale, args.input_shift, out, tile_sum, tile_m2,
    )  # fmt: skip


def layout_key(t: Tensor | None) -> tuple | None:
    """What a kept launch reads of a tensor argument but its data and address: shape, strides,
    dtype, device (None for None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _key(args: ConvArgs, stats: bool, out: Tensor | None) -> tuple:
    """Everything `check_inputs` and a launch read from args but the tensors' data and
    addresses (the pointers' alignment is the kept launch's own key: `launcher.DirectLaunch`).
    The types of groups and input_pool too: `check_inputs` checks them."""
    x, weight = args.x, args.weight
    return (
        x.shape, x.stride(), x.dtype, x.device, weight.shape, weight.stride(), weight.dtype,
        weight.device, layout_key(args.bias), tuple(args.stride), tuple(args.padding),
        tuple(args.dilation), type(args.groups), args.groups, args.allow_tf32,
        layout_key(args.residual), layout_key(args.residual_scale), layout_key(args.residual_shift),
        layout_key(args.input_scale), layout_key(args.input_shift), args.input_relu,
        type(args.input_pool), args.input_pool, layout_key(args.input_add), args.relu, stats,
        layout_key(out),
    )  # fmt: skip


# _key -> PreparedConv. Cleared when full: a process that sees ever new shapes (detection with
# free image sizes) re-prepares rather than grows.
_PREPARED: dict[tuple, PreparedConv] = {}
_PREPARED_MAX = 4096


def prepare(args: ConvArgs, stats: bool, out: Tensor | None = None) -> PreparedConv:
    """The launch of args: checked (raises as `check_inputs` does, and, with `out`, unless out
    is the output's [N, C_out, OH, OW] in x's dtype on x's device) at its key's first call,
    kept for its later calls.

    Args:
        stats: launches also give the per-channel statistics.
        out: the tensor launches will write, or None: one from `PreparedConv.allocate_output`.
    """
    key = _key(args, stats, out)
    prepared = _PREPARED.get(key)
    if prepared is not None:
        # Not part of the kept verdict: scripts/compile_report.py replaces it for a while.
        check_triton_device(args.x, "the fused convolution")
        return prepared
    prepared = _prepare(args, stats, out)
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    _PREPARED[key] = prepared
    return prepared


def _prepare(args: ConvArgs, stats: bool, out: Tensor | None) -> PreparedConv:
    """`prepare` at a key's first call: checks, and works out the launch."""
    from fastres.kernels.conv2d_configs import interpreter_config

    size = check_inputs(args)
    x, weight, groups = args.x, args.weight, args.groups
    out_shape = args.output_shape(size)
    if out is not None and (
        tuple(out.shape) != out_shape or out.dtype != x.dtype or out.device != x.device
    ):
        raise ValueError(
            f"out must be {out_shape} {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    check_triton_device(x, "the fused convolution")
    acc = accumulator_dtype(x.dtype)
    # Per group: the kernel's C_in / C_out are one group's channels.
    c_out, c_in, kh, kw = weight.shape
    c_out //= groups
    m = x.shape[0] * size[2] * size[3]
    if m == 0 or c_out == 0:
        return PreparedConv(out_shape, stats, acc)
    # The output launches will write has the strides of this one (same shape, channels_last).
    target = out if out is not None else args.allocate_output(size)
    flat = flat_k(c_in)
    dot_precision = args.dot_precision(INTERPRET)

    def conv_launch(config: dict):
        return _conv_launch(args, size, target, stats, flat, dot_precision, config)

    def launch_config(config: dict, compile_only: bool = False) -> None:
        """Launches (or only compiles) a candidate configuration on args (tuning)."""
        conv = conv_launch(config)
        tile_sum = tile_m2 = None
        if stats:
            tile_sum = torch.empty(_tiles(m, config, weight), dtype=acc, device=x.device)
            tile_m2 = torch.empty_like(tile_sum)
        pointers = _pointers(args, target, tile_sum, tile_m2)
        if compile_only:
            conv.warmup(*pointers)
        else:
            conv.through_jit(*pointers)

    if INTERPRET:
        config = interpreter_config(m, kh * kw * c_in if flat else c_in, c_out)
    else:
        config = _chosen_config(args, m, c_in, c_out, flat, dot_precision, launch_config)
    if not stats:
        return PreparedConv(out_shape, stats, acc, conv_launch(config))
    tiles = _tiles(m, config, weight)
    merge_args = (*tiles, m, config["BLOCK_M"])
    return PreparedConv(out_shape, stats, acc, conv_launch(config), tiles, merge_args)


def _tiles(m: int, config: dict, weight: Tensor) -> tuple[int, int]:
    """The per-tile statistics' shape: [BLOCK_M-row tiles, C_out]."""
    return -(-m // config["BLOCK_M"]), weight.shape[0]


def _conv_launch(
    args: ConvArgs,
    size: tuple[int, int, int, int],
    out: Tensor,
    stats: bool,
    flat_k: bool,
    dot_precision: str,
    config: dict,
):
    """The convolution's launch with a configuration: grid, integer arguments, constexprs
    (`out`: one with the strides of those launches will write)."""
    from fastres.kernels.conv2d_fused import conv2d_fused_kernel

    from .launcher import DirectLaunch

    x, weight, groups = args.x, args.weight, args.groups
    n, _, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    c_out //= groups
    ph, pw, oh, ow = size
    x2 = args.input_add if args.input_add is not None else x
    residual = args.residual if args.residual is not None else out
    stride, padding, dilation = args.stride, args.padding, args.dilation
    scalars = (
        n, h, w, c_in, ph, pw, oh, ow, c_out,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *x2.stride(), *weight.stride(), *residual.stride(), *out.stride(),
        weight.shape[0],
    )  # fmt: skip
    constexprs = dict(
        KH=kh, KW=kw, POOL=args.input_pool,
        IN_AFFINE=int(args.input_scale is not None), IN_RELU=int(args.input_relu),
        IN_ADD=int(args.input_add is not None), HAS_BIAS=int(args.bias is not None),
        RESIDUAL=int(args.residual is not None),
        RES_AFFINE=int(args.residual_scale is not None), RELU=int(args.relu),
        STATS=int(stats), DOT_PRECISION=dot_precision,
        ACC=triton_accumulator(x.dtype),
        EMULATE_RTNE=int(INTERPRET), FLAT_K=int(flat_k),
        **config,
    )  # fmt: skip
    tiles_m = -(-(n * oh * ow) // config["BLOCK_M"])
    grid = (tiles_m * -(-c_out // config["BLOCK_N"]), groups)
    return DirectLaunch(conv2d_fused_kernel, grid, 12, scalars, constexprs)


# (device, dtype, DOT_PRECISION, groups, M, C_in, C_out, KH, KW, stride, pool) -> the tile
# configuration `tuning.choose` gave that shape: its key, candidates and answer are made once.
_CONFIGS: dict[tuple, dict] = {}


def _chosen_config(
    args: ConvArgs, m: int, c_in: int, c_out: int, flat_k: bool, dot_precision: str, launch_config
) -> dict:
    """The launch configuration of a shape on CUDA (`tuning.choose`), kept per shape."""
    from fastres.kernels.conv2d_configs import candidate_configs, shape_class

    x, pool = args.x, args.input_pool
    kh, kw = args.weight.shape[2:]
    key = (x.device, x.dtype, dot_precision, args.groups, m, c_in, c_out, kh, kw,
           args.stride[0], pool)  # fmt: skip
    config = _CONFIGS.get(key)
    if config is not None:
        return config
    shape = "x".join(map(str, shape_class(m, c_in, c_out, kh, kw, args.stride[0], pool)))
    dtype = str(x.dtype).removeprefix("torch.")
    candidates = candidate_configs(
        m, kh * kw * c_in, c_in, c_out, flat_k, x.element_size(), pool,
        tuning.shared_memory_limit(x.device),
    )  # fmt: skip
    config = _CONFIGS[key] = tuning.choose(
        x.device,
        f"conv2d_fused {shape} g{args.groups} {dtype} dot-{dot_precision}",
        candidates,
        launch_config,
        functools.partial(launch_config, compile_only=True),
    )
    return config


def _merge_tiles(tile_sum: Tensor, tile_m2: Tensor, m: int, block_m: int) -> tuple[Tensor, Tensor]:
    """Per-tile (sum, M2) [tiles, C] of m rows in tiles of block_m -> mean [C], M2 [C], merged
    by one launch of `kernels/merge_tile_stats.py` (Chan's formula)."""
    tiles, c = tile_sum.shape
    mean, m2 = tile_sum.new_empty(c), tile_sum.new_empty(c)
    _merge_launch(tiles, c, m, block_m, tile_sum.dtype)(tile_sum, tile_m2, mean, m2)
    return mean, m2


@functools.lru_cache(maxsize=1024)
def _merge_launch(tiles: int, c: int, m: int, block_m: int, dtype: torch.dtype):
    """The merge's launch for [tiles, C] partials of `dtype`."""

    from fastres.kernels.merge_tile_stats import merge_tile_stats_kernel

    from .launcher import DirectLaunch

    grid, blocks = _merge_tiling(tiles, c)
    return DirectLaunch(
        merge_tile_stats_kernel, grid, 4, (tiles, c, m, block_m),
        dict(ACC=triton_accumulator(dtype), **blocks),
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def merge_finalize_launch(
    tiles: int,
    c: int,
    m: int,
    block_m: int,
    dtype: torch.dtype,
    eps: float,
    momentum: float | None,
    slot: int = 1,
    width: int = 1,
):
    """The launch of `merge_finalize_kernel` (the merge, its BatchNorm finalized, and with a
    `momentum` the running statistics updated) for [tiles, C] partials of `dtype`; C in padded
    slots of `slot` channels, `width` of them real (see the kernel)."""

    from fastres.kernels.merge_tile_stats import merge_finalize_kernel

    from .launcher import DirectLaunch

    grid, blocks = _merge_tiling(tiles, c)
    return DirectLaunch(
        merge_finalize_kernel, grid, 12, (tiles, c, m, block_m),
        dict(EPS=eps, MOMENTUM=momentum or 0.0, UPDATE=int(momentum is not None), SLOT=slot,
             WIDTH=width, ACC=triton_accumulator(dtype), **blocks),
    )  # fmt: skip


def _merge_tiling(tiles: int, c: int) -> tuple[tuple[int], dict]:
    """Both merge kernels' grid and (BLOCK_T, BLOCK_C) for [tiles, c] partials."""
    import triton

    block_c = min(_MERGE_BLOCK_C, max(16, triton.next_power_of_2(c)))
    block_t = min(_MERGE_BLOCK_T, max(16, triton.next_power_of_2(tiles)))
    return (triton.cdiv(c, block_c),), dict(BLOCK_T=block_t, BLOCK_C=block_c)


# The merge's tile: BLOCK_C channels x BLOCK_T tiles per step of its loops.
_MERGE_BLOCK_C, _MERGE_BLOCK_T = 128, 32


def may_overlap(a: Tensor, b: Tensor) -> bool:
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


def prologue_reference(
    x: Tensor,
    input_scale: Tensor | None = None,
    input_shift: Tensor | None = None,
    input_relu: bool = False,
    input_pool: int = 1,
    input_add: Tensor | None = None,
) -> Tensor:
    """What the kernel's prologue computes, in PyTorch (for backward)."""
    if input_scale is not None:
        shape = (1, -1, 1, 1)
        x = (x.float() * input_scale.view(shape) + input_shift.view(shape)).to(x.dtype)
    if input_relu:
        x = torch.relu(x)
    if input_pool > 1:
        x = F.avg_pool2d(x, input_pool, input_pool, ceil_mode=True, count_include_pad=False)
    if input_add is not None:
        x = x + input_add
    return x


def conv2d_fused_body(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    allow_tf32: bool,
    residual: Tensor | None,
    residual_scale: Tensor | None,
    residual_shift: Tensor | None,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    input_relu: bool,
    input_pool: int,
    input_add: Tensor | None,
    relu: bool,
    stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    args = ConvArgs.bind(locals())
    out, moments = _run(args, stats)
    if moments is None:
        return out, *args.empty_stats(False)
    return out, *moments


def _run(args: ConvArgs, stats: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The output of args, and its statistics when `stats`."""
    prepared = prepare(args, stats)
    out = prepared.allocate_output(args.x)
    return out, prepared.launch(args, out)


_conv2d_fused_op = torch.library.custom_op("fastres::conv2d_fused", mutates_args=())(
    conv2d_fused_body
)


@_conv2d_fused_op.register_fake
def _(*inputs) -> tuple[Tensor, Tensor, Tensor]:
    args, stats = ConvArgs.of_op_inputs(inputs), inputs[-1]
    return args.allocate_output(), *args.empty_stats(stats)


def _setup_context(ctx, inputs, output) -> None:
    args = ConvArgs.of_op_inputs(inputs)
    out, mean, m2 = output
    ctx.mark_non_differentiable(mean, m2)
    save_args(ctx, args, out)


def channel_sum(t: Tensor) -> Tensor:
    """The per-channel sum of t [N, C, H, W] in the accumulator's dtype (a bias gradient)."""
    return t.sum((0, 2, 3), dtype=accumulator_dtype(t.dtype))


def _backward(ctx, grad_out: Tensor, _grad_mean, _grad_m2):
    args, (out,) = saved_args(ctx)
    grads = conv_backward(args, out, ConvArgs.of_op_inputs(ctx.needs_input_grad), grad_out)
    return *grads.values(), None  # stats: not differentiable


def conv_backward(args: ConvArgs, out: Tensor, needs: ConvArgs, grad_out: Tensor) -> dict:
    """The gradients of a fused convolution's inputs (ConvArgs' fields, None where `needs` is
    false) from its output `out` and out's gradient."""
    grads = dict.fromkeys(ConvArgs._fields)
    # ReLU's gradient as eager computes it (one op: grad where out > 0, else 0).
    grad_z = torch.ops.aten.threshold_backward(grad_out, out, 0) if args.relu else grad_out
    if args.bias is not None and needs.bias:
        grads["bias"] = cast(channel_sum(grad_z), args.bias.dtype)
    residual = args.residual
    if residual is not None and args.residual_scale is None:
        grads["residual"] = cast(grad_z, residual.dtype) if needs.residual else None
    elif residual is not None:
        rs = args.residual_scale.view(1, -1, 1, 1)
        grads["residual"] = (grad_z.float() * rs).to(residual.dtype) if needs.residual else None
        if needs.residual_scale:
            grads["residual_scale"] = channel_sum(grad_z.float() * residual.float()).to(rs.dtype)
        if needs.residual_shift:
            grads["residual_shift"] = channel_sum(grad_z).to(rs.dtype)
    needs_input = needs.x or needs.input_scale or needs.input_shift or needs.input_add
    if needs_input or needs.weight:
        x_in = prologue_reference(
            args.x, args.input_scale, args.input_shift, args.input_relu, args.input_pool,
            args.input_add,
        )  # fmt: skip
        grad_input, grads["weight"], _ = torch.ops.aten.convolution_backward(
            cast(grad_z, args.x.dtype), x_in, args.weight, None, args.stride, args.padding,
            args.dilation, False, [0, 0], args.groups, [needs_input, needs.weight, False],
        )  # fmt: skip
        if args.input_add is not None and needs.input_add:
            grads["input_add"] = grad_input
        if needs.x or needs.input_scale or needs.input_shift:
            grads.update(_prologue_backward(grad_input, args, needs))
    return grads


def _prologue_backward(grad: Tensor, args: ConvArgs, needs: ConvArgs) -> dict[str, Tensor | None]:
    """Gradients of x, input_scale, input_shift through `prologue_reference`."""
    x, input_scale, input_shift, pool = args.x, args.input_scale, args.input_shift, args.input_pool
    shape = (1, -1, 1, 1)
    u = x
    if input_scale is not None:
        u = (x.float() * input_scale.view(shape) + input_shift.view(shape)).to(x.dtype)
    if pool > 1:
        v = torch.relu(u) if args.input_relu else u
        grad = torch.ops.aten.avg_pool2d_backward(
            grad, v, [pool, pool], [pool, pool], [0, 0], True, False, None
        )
    if args.input_relu:
        grad = grad.masked_fill(u <= 0, 0)
    if input_scale is None:
        return {"x": grad}
    return {
        "x": (grad.float() * input_scale.view(shape)).to(x.dtype) if needs.x else None,
        "input_scale": (
            channel_sum(grad.float() * x.float()).to(input_scale.dtype)
            if needs.input_scale
            else None
        ),
        "input_shift": channel_sum(grad).to(input_shift.dtype) if needs.input_shift else None,
    }


torch.library.register_autograd("fastres::conv2d_fused", _backward, setup_context=_setup_context)


def eager_autograd() -> bool:
    """Whether a differentiable op runs under its plain autograd.Function: gradients on, in
    eager mode (torch.compile traces the custom op; torch.func transforms need its autograd
    registration)."""
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def apply_function(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)` for a Function whose forward takes ctx: without
    autograd.Function.apply's Python layer where no torch.func transform is active. That layer
    then only unwraps the wrappers of tensors that escaped a finished transform, and costs
    about 5 us a call (bench/results/cpu-issue25-final, 2026-12-06), a launch's worth."""
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


# Argument types that dispatch nothing of their own (a tensor subclass may: FakeTensor, DTensor).
_PLAIN_TYPES = frozenset(
    {Tensor, torch.nn.Parameter, type(None), bool, int, float, str, list, tuple, torch.dtype}
)


def dispatch_free(inputs: Sequence) -> bool:
    """Whether a custom op may run as a plain call of its Python body: in eager mode, with
    nothing active that sees or changes an op's dispatch (torch.compile tracing, torch.jit
    tracing, a functorch transform, a TorchDispatchMode (but an op counter's,
    `_modes_see_through`) or TorchFunctionMode, the autograd profiler) and no tensor subclass
    among `inputs`. The custom op's dispatch layers (its
    autograd and backend wrappers, the torch.compile-disable wrapper) cost more Python than a
    launch; where anything could see them, the op dispatches as usual."""
    return (
        not (
            torch.compiler.is_compiling()
            or torch._C._get_tracing_state()
            or (torch._C._len_torch_dispatch_stack() and not _modes_see_through())
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()
            or torch._C._autograd._profiler_enabled()
        )
        and set(map(type, inputs)) <= _PLAIN_TYPES
    )


def _modes_see_through() -> bool:
    """Whether every active dispatch mode sees through fastres's custom ops (a mode class with
    `SEES_THROUGH_FASTRES = True`: it opens them or only watches the ops they run, e.g. the op
    counters of tests/test_op_count.py and scripts/host_cost.py and the host-sync guard of
    tests/test_capture.py): fastres then runs as without a mode, so that such a mode sees what
    a step runs."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return all(
        getattr(m, "SEES_THROUGH_FASTRES", False) for m in _get_current_dispatch_mode_stack()
    )


def call_op(op, body, inputs: Sequence):
    """`op(*inputs)`, a custom op whose Python body is `body`, called by its autograd (an
    autograd.Function's forward or backward): `body(*inputs)` where `dispatch_free(inputs)`,
    else the op below the Autograd key (the caller is its autograd; modes and profiles see it)."""
    if dispatch_free(inputs):
        return body(*inputs)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*inputs)


class _Conv2dFused(torch.autograd.Function):
    """The autograd of `fastres::conv2d_fused` (same backward) for eager execution with
    gradients: the custom op's own autograd wrapper (`register_autograd`) costs about 0.1 ms
    more Python per call (it binds every argument to the schema's defaults). The op itself
    runs below it (`call_op`: dispatch modes and profiles see `fastres::conv2d_fused`);
    torch.compile traces the custom op directly (`conv2d_fused`)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = call_op(torch.ops.fastres.conv2d_fused, conv2d_fused_body, inputs)
        _setup_context(ctx, inputs, output)
        # No zero-filled gradients for the statistics (never differentiable): two ops less.
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_m2):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        return _backward(ctx, grad_out, None, None)


def _conv2d_fused_out_body(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    allow_tf32: bool,
    residual: Tensor | None,
    residual_scale: Tensor | None,
    residual_shift: Tensor | None,
    input_scale: Tensor | None,
    input_shift: Tensor | None,
    input_relu: bool,
    input_pool: int,
    input_add: Tensor | None,
    relu: bool,
    out: Tensor,
) -> None:
    args = ConvArgs.bind(locals())
    prepared = prepare(args, False, out)
    # Programs of one launch read their inputs while others write out: no common memory.
    for name, t in (("x", x), ("weight", weight), ("residual", residual), ("input_add", input_add)):
        if t is not None and may_overlap(t, out):
            raise ValueError(f"out must not share memory with {name}")
    prepared.launch(args, out)


_conv2d_fused_out_op = torch.library.custom_op("fastres::conv2d_fused_out", mutates_args=("out",))(
    _conv2d_fused_out_body
)


@_conv2d_fused_out_op.register_fake
def _(*inputs) -> None:
    return None


def run_out_op(op, body, *inputs, out: Tensor) -> None:
    """Calls a custom op that writes `out` (one of `inputs`) and returns nothing; `body` is its
    Python body.

    In eager mode with no gradient in play it runs its body directly (`dispatch_free`), or else
    below the ADInplaceOrView wrapper that custom ops get for a mutated argument (which
    re-binds every argument to the schema on each call: about 0.1 ms, more than the launch),
    and bumps out's version counter as that wrapper would. Where a dispatch mode or a profiler
    is active, the op itself still dispatches: they see it.
    """
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs)
    ):
        op(*inputs)
        return
    if dispatch_free(inputs):
        body(*inputs)
    else:
        with torch._C._AutoDispatchBelowADInplaceOrView():
            op(*inputs)
    torch.autograd.graph.increment_version(out)


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
        stats: also return the per-channel mean and M2 (sum of squared deviations from the
            mean) of the output, [C_out] in fp32 (fp64 for fp64), from the accumulator.
        allow_tf32: float32 products in TF32; None follows torch.backends.cudnn.allow_tf32
            (PyTorch's own rule for convolutions). Ignored for fp16 / bf16 and on CPU.
        out: write into this [N, C_out, OH, OW] tensor (e.g. a channel slice of a larger
            buffer; the memory it covers must be disjoint from the inputs') instead of a new
            one. Not differentiable, no stats.

    Returns:
        out [N, C_out, OH, OW] in x's dtype (channels_last when allocated here), or
        (out, mean, m2) when `stats`.
    """
    if allow_tf32 is None:
        allow_tf32 = bool(torch.backends.cudnn.allow_tf32)
    args = ConvArgs(
        x,
        weight,
        bias,
        stride=as_pair(stride, "stride"),
        padding=as_pair(padding, "padding"),
        dilation=as_pair(dilation, "dilation"),
        groups=int(groups),
        allow_tf32=allow_tf32,
        residual=residual,
        residual_scale=residual_scale,
        residual_shift=residual_shift,
        input_scale=input_scale,
        input_shift=input_shift,
        input_relu=bool(input_relu),
        input_pool=int(input_pool),
        input_add=input_add,
        relu=bool(relu),
    )
    if out is not None:
        if stats:
            raise ValueError("stats are not available with out=")
        run_out_op(torch.ops.fastres.conv2d_fused_out, _conv2d_fused_out_body, *args, out, out=out)
        return out
    stats = bool(stats)
    inputs = (*args, stats)
    if eager_autograd():
        result, mean, m2 = apply_function(_Conv2dFused, *inputs)
    elif dispatch_free(inputs):
        result, moments = _run(args, stats)
        return (result, *moments) if stats else result
    else:
        result, mean, m2 = torch.ops.fastres.conv2d_fused(*inputs)
    return (result, mean, m2) if stats else result
