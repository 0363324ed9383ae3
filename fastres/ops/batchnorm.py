"""The fused BatchNorm ops of the extension `fastres._C`: `fastres::bn_*` custom ops.

The kernels (CPU always, CUDA where built) are registered in C++ (`csrc/`) and loaded by
`fastres.extension`; this module adds the fake implementations (torch.compile) and the autograd
formula of `bn_apply`, and offers typed Python wrappers. The pure-torch reference with the same
signatures is `fastres.ops.batchnorm_reference`.

Ops (x [N, C, *], NCHW or channels_last; per-channel tensors [C] in float32, float64 for float64
inputs):

- `bn_stats(x) -> (mean, m2)`: mean and M2 = sum (x - mean)^2 over N, H, W. (count, mean, M2)
  of several processes merge with Chan's formula (`combine_stats`), which is how SyncBN
  would all-gather them.
- `bn_finalize(mean, m2, count, weight, bias, eps) -> (scale, shift, invstd)`.
- `bn_finalize_update(..., running_mean, running_var, num_batches_tracked, momentum)`: the same,
  and the running statistics updated in place as nn.BatchNorm2d's training forward does.
- `bn_apply(x, scale, shift, residual, scale_r, shift_r, relu)`: act(x * scale + shift
  [+ residual | + residual * scale_r + shift_r]).
- `bn_backward_reduce` / `bn_backward_elemt`: the two passes of the backward of `bn_apply` and
  of training-mode BatchNorms in front of it (formulas in the reference); `bn_backward`: both
  and the affine gradients in one op.
- `add_relu_(y, r)`: y = ReLU(y + r) in place, one pass (an inference tail whose BN is folded
  into the convolution).

Each op's per-channel arithmetic runs in its kernel (csrc/batchnorm_math.h): a training-mode
BatchNorm costs `bn_stats`, `bn_finalize_update` and `bn_apply` forward (as many ops as
nn.BatchNorm2d + ReLU) and one `bn_backward` (tests/test_op_count.py).

`bn_stats`, `bn_apply` and the backward ops take a last argument `variant`, the CUDA kernels
they run (CPU ignores it): 0 the default ones, 1 the bandwidth-bound ones
(csrc/cuda/batchnorm_fast_kernels.cu), an 'auto' candidate until measured. The wrappers below
and the composite ops pass the variant of the enclosing `kernel_variant` scope; a backward runs
with its forward's.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import torch
from torch import Tensor

from ..extension import EXTENSION_ERROR
from . import tuning
from .conv2d_fused import apply_function, call_op
from .precision import accumulator_dtype, cast


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout the kernels produce for x: channels_last where x is, else contiguous."""
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


_KERNEL_VARIANT = contextvars.ContextVar("fastres_bn_kernel_variant", default=0)


@contextlib.contextmanager
def kernel_variant(variant: int):
    """Within the scope, the bn_* ops run CUDA kernel variant `variant` (see above)."""
    token = _KERNEL_VARIANT.set(variant)
    try:
        yield
    finally:
        _KERNEL_VARIANT.reset(token)


def current_variant() -> int:
    """The enclosing scope's kernel variant; 0 while torch.compile traces (which would not
    guard on it)."""
    return 0 if torch.compiler.is_compiling() else _KERNEL_VARIANT.get()


def _channels(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.new_empty(x.shape[1], dtype=dtype)


def _register_fakes() -> None:
    @torch.library.register_fake("fastres::bn_stats")
    def _(x, variant=0):
        acc = accumulator_dtype(x.dtype)
        return _channels(x, acc), _channels(x, acc)

    @torch.library.register_fake("fastres::bn_finalize")
    def _(mean, m2, count, weight, bias, eps):
        return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("fastres::bn_finalize_update")
    def _(mean, m2, count, weight, bias, eps, running_mean, running_var, nbt, momentum):
        return torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)

    @torch.library.register_fake("fastres::bn_backward")
    def _(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, invstd, mean_r,
          invstd_r, count, grad_residual, variant=0):  # fmt: skip
        grad_x = torch.empty_like(x, memory_format=memory_format_of(x))
        want_r = grad_residual and residual is not None
        grad_r = torch.empty_like(grad_x) if want_r else x.new_empty(0)
        c_r = x.shape[1] if scale_r is not None else 0
        acc = accumulator_dtype(x.dtype)
        grads = [x.new_empty(c, dtype=acc) for c in (x.shape[1], x.shape[1], c_r, c_r)]
        return grad_x, grad_r, *grads

    @torch.library.register_fake("fastres::add_relu_")
    def _(y, r):
        return None

    @torch.library.register_fake("fastres::bn_apply")
    def _(x, scale, shift, residual, scale_r, shift_r, relu, variant=0):
        return torch.empty_like(x, memory_format=memory_format_of(x))

    @torch.library.register_fake("fastres::bn_backward_reduce")
    def _(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, mean_r, variant=0):
        c = x.shape[1]
        rmu = c if residual is not None and scale_r is not None else 0
        acc = accumulator_dtype(x.dtype)
        return x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc), x.new_empty(rmu, dtype=acc)

    @torch.library.register_fake("fastres::bn_backward_elemt")
    def _(grad_out, x, scale, shift, residual, scale_r, shift_r, relu, mean, invstd, sum_dy,
          sum_dy_xmu, mean_r, invstd_r, sum_dy_rmu, count, grad_residual, variant=0):  # fmt: skip
        grad_x = torch.empty_like(x, memory_format=memory_format_of(x))
        if grad_residual and residual is not None:
            return grad_x, torch.empty_like(x, memory_format=memory_format_of(x))
        return grad_x, x.new_empty(0)

    def apply_setup_context(ctx, inputs, output):
        x, scale, shift, residual, scale_r, shift_r, relu, variant = inputs
        ctx.save_for_backward(x, scale, shift, residual, scale_r, shift_r)
        ctx.relu, ctx.variant = relu, variant

    def apply_backward(ctx, grad):
        x, scale, shift, residual, scale_r, shift_r = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad_scale = grad_shift = grad_r = grad_scale_r = grad_shift_r = None
        if need[1] or need[2] or need[4] or need[5]:
            sum_dy, sum_dy_x, sum_dy_r = torch.ops.fastres.bn_backward_reduce(
                grad, x, scale, shift, residual, scale_r, shift_r, ctx.relu, None, None, ctx.variant
            )
            grad_scale, grad_shift = sum_dy_x.to(scale.dtype), sum_dy.to(shift.dtype)
            if scale_r is not None:
                grad_scale_r, grad_shift_r = sum_dy_r.to(scale_r.dtype), sum_dy.to(shift_r.dtype)
        if need[0] or need[3]:
            grad_x, grad_r = torch.ops.fastres.bn_backward_elemt(
                grad, x, scale, shift, residual, scale_r, shift_r, ctx.relu,
                None, None, None, None, None, None, None, 1, bool(need[3]), ctx.variant,
            )  # fmt: skip
            grad_r = grad_r if need[3] else None
        return grad_x, grad_scale, grad_shift, grad_r, grad_scale_r, grad_shift_r, None, None

    torch.library.register_autograd(
        "fastres::bn_apply", apply_backward, setup_context=apply_setup_context
    )


if EXTENSION_ERROR is None:
    _register_fakes()


def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean [C] and M2 [C] of x [N, C, *] (count = x.numel() / C)."""
    return torch.ops.fastres.bn_stats(x, current_variant())


def combine_stats(count: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merges per-process statistics (e.g. all-gathered for SyncBN) with Chan's formula.

    Args:
        count: [P] values per channel in each part; mean, m2: [P, C] `bn_stats` of each part.

    Returns:
        The total count (0-d), mean [C] and M2 [C] of the union.
    """
    count = count.to(mean.dtype)
    total = count.sum()
    weights = (count / total).unsqueeze(1)
    merged_mean = (weights * mean).sum(0)
    merged_m2 = m2.sum(0) + (count.unsqueeze(1) * (mean - merged_mean) ** 2).sum(0)
    return total, merged_mean, merged_m2


def bn_finalize(
    mean: Tensor,
    m2: Tensor,
    count: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch statistics and BN weight / bias [C] -> scale, shift, invstd [C]."""
    return torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, eps)


def bn_finalize_update(
    mean: Tensor,
    m2: Tensor,
    count: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`bn_finalize`, and the running statistics updated in place (one op; see
    `bn_finalize_updating_running`)."""
    return torch.ops.fastres.bn_finalize_update(
        mean, m2, count, weight, bias, eps, running_mean, running_var, num_batches_tracked,
        momentum,
    )  # fmt: skip


def bn_backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`fastres::bn_backward`; see `batchnorm_reference.bn_backward`."""
    return torch.ops.fastres.bn_backward(*args)


def add_relu_(y: Tensor, r: Tensor) -> Tensor:
    """y = ReLU(y + r) in place, one pass (NaN stays NaN, as torch.relu)."""
    torch.ops.fastres.add_relu_(y, r)
    return y


def bn_apply(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Tensor | None = None,
    scale_r: Tensor | None = None,
    shift_r: Tensor | None = None,
    relu: bool = True,
) -> Tensor:
    """act(x * scale + shift [+ residual | + residual * scale_r + shift_r]) [N, C, *], x's dtype.

    Differentiable in x, scale, shift, residual, scale_r and shift_r.
    """
    op = torch.ops.fastres.bn_apply.default
    args = (x, scale, shift, residual, scale_r, shift_r, relu, current_variant())
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return op(*args)
    # No graph to record (e.g. a backward recomputing its forward's activation): below the op's
    # Python autograd layer, which costs the host more than the op's own dispatch.
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def bn_backward_reduce(*args) -> tuple[Tensor, Tensor, Tensor]:
    """`fastres::bn_backward_reduce`; see `batchnorm_reference.bn_backward_reduce`."""
    return torch.ops.fastres.bn_backward_reduce(*args)


def bn_backward_elemt(*args) -> tuple[Tensor, Tensor]:
    """`fastres::bn_backward_elemt`; see `batchnorm_reference.bn_backward_elemt`."""
    return torch.ops.fastres.bn_backward_elemt(*args)


def tracks_running_stats(bn: torch.nn.Module) -> bool:
    """Whether bn's training forward updates running statistics (as nn.BatchNorm2d decides)."""
    return bool(bn.training and bn.track_running_stats and bn.running_mean is not None)


def bn_finalize_updating_running(
    bn: torch.nn.Module, mean: Tensor, m2: Tensor, count: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`bn_finalize` of bn's affine parameters (constants here: `bn_norm_act` takes their
    gradients), and bn's running statistics updated as nn.BatchNorm2d in training mode does
    (momentum, or None: the cumulative average; unbiased variance; num_batches_tracked + 1),
    in one op.

    Args:
        mean, m2: [C] batch statistics over `count` values per channel (all processes' for
            SyncBN).
    """
    with torch.no_grad():
        if not tracks_running_stats(bn):
            return torch.ops.fastres.bn_finalize(mean, m2, count, bn.weight, bn.bias, bn.eps)
        return torch.ops.fastres.bn_finalize_update(
            mean, m2, count, bn.weight, bn.bias, bn.eps, bn.running_mean, bn.running_var,
            bn.num_batches_tracked, bn.momentum,
        )  # fmt: skip


def sync_group_name(bn: torch.nn.Module) -> str:
    """The name of the process group whose batch `bn` normalizes over, or "" for its own batch.

    Non-empty for a SyncBatchNorm in training mode while torch.distributed runs with more than
    one process in its group (its process_group, else WORLD), as nn.SyncBatchNorm decides.
    The ops take the name, not the group, because custom-op arguments are plain values.
    """
    if not (isinstance(bn, torch.nn.SyncBatchNorm) and bn.training):
        return ""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return ""
    group = bn.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else ""


def gather_stats(y: Tensor, mean: Tensor, m2: Tensor, group: str) -> tuple[Tensor, Tensor, int]:
    """This process's batch statistics of y -> (mean, m2, count) over the group's batch.

    Synchronizes them for SyncBN (`group`, see `sync_group_name`) and rejects one value per
    channel as nn.BatchNorm2d does.
    """
    count = y.numel() // y.shape[1]
    if group:
        mean, m2, count = sync_batch_stats(mean, m2, count, group)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {y.size()}"
        )
    return mean, m2, count


def _process_group(name: str):
    return torch.distributed.distributed_c10d._resolve_process_group(name)


def sync_batch_stats(
    mean: Tensor, m2: Tensor, count: int, group_name: str
) -> tuple[Tensor, Tensor, int]:
    """This process's batch statistics -> those of every process's batch together (SyncBN).

    All-gathers (count, mean [C], M2 [C]) over the group and merges them with Chan's formula
    (`combine_stats`), so unequal batch sizes merge exactly. Returns mean, M2 and the count.
    """
    if tuning.capturing(mean.device):
        raise tuning.CaptureError(
            "fastres: SyncBatchNorm on the fused backends reads the merged batch count on the "
            "host, which a CUDA graph capture forbids: capture it with the 'torch' backend "
            "(nn.SyncBatchNorm), or without SyncBatchNorm"
        )
    group = _process_group(group_name)
    local = torch.cat([mean.new_full((1,), count), mean, m2])
    parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, local, group=group)
    gathered = torch.stack(parts)
    c = mean.shape[0]
    total, mean, m2 = combine_stats(gathered[:, 0], gathered[:, 1 : 1 + c], gathered[:, 1 + c :])
    return mean, m2, int(total.item())


def all_reduce_sums(tensors: list[Tensor], group_name: str) -> list[Tensor]:
    """Sums each [C] tensor over the processes of the group (one collective for all)."""
    flat = torch.cat(tensors)
    torch.distributed.all_reduce(flat, group=_process_group(group_name))
    return list(flat.split([t.numel() for t in tensors]))


class Normalized(NamedTuple):
    """A BatchNorm as the per-channel affine map it applies, bn(y) = y * scale + shift [C], with
    what its backward needs: its affine parameters (their gradients), the mean it subtracts
    and invstd (batch statistics, or the running ones in eval mode)."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    scale: Tensor
    shift: Tensor
    invstd: Tensor


def batch_normalized(bn: torch.nn.Module, mean: Tensor, m2: Tensor, count: int) -> Normalized:
    """bn normalizing with batch statistics (mean, m2 over count values per channel), its
    running statistics updated (`bn_finalize_updating_running`): one op."""
    scale, shift, invstd = bn_finalize_updating_running(bn, mean, m2, count)
    return Normalized(bn.weight, bn.bias, mean, scale, shift, invstd)


def running_normalized(bn: torch.nn.Module) -> Normalized:
    """bn normalizing with its running statistics (eval mode): one op (`bn_finalize` reads the
    running variance as M2 over one value)."""
    with torch.no_grad():
        scale, shift, invstd = torch.ops.fastres.bn_finalize(
            bn.running_mean, bn.running_var, 1, bn.weight, bn.bias, bn.eps
        )
    return Normalized(bn.weight, bn.bias, bn.running_mean, scale, shift, invstd)


def _train_act_impl(
    y, weight, bias, mean, scale, shift, invstd, residual, y_d, weight_d, bias_d, mean_d, scale_d,
    shift_d, invstd_d, relu, count, group,
):  # fmt: skip
    variant = current_variant()
    if y_d is not None:
        residual, scale_r, shift_r = y_d, scale_d, shift_d
    else:
        scale_r = shift_r = None
    # bn_train_act's autograd is its caller's: bn_apply's own (Python) autograd layer below it
    # would only cost host time.
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastres.bn_apply(
            y, scale, shift, residual, scale_r, shift_r, relu, variant
        )


def _train_act_fake(*inputs):
    y = inputs[0]
    return torch.empty_like(y, memory_format=memory_format_of(y))


def _train_act_setup_context(ctx, inputs, output):
    y, weight, bias, mean, scale, shift, invstd, residual, y_d = inputs[:9]
    weight_d, bias_d, mean_d, scale_d, shift_d, invstd_d, relu, count, group = inputs[9:]
    two_bn = y_d is not None
    ctx.save_for_backward(
        y, weight, bias, mean, scale, shift, invstd, y_d if two_bn else residual, weight_d,
        bias_d, mean_d, scale_d, shift_d, invstd_d,
    )  # fmt: skip
    ctx.relu, ctx.two_bn, ctx.count, ctx.group = relu, two_bn, count, group
    ctx.variant = current_variant()


def _train_act_backward(ctx, grad_out):
    saved = ctx.saved_tensors  # once: checkpointing lets each saved tensor unpack once
    y, weight, bias, mean, scale, shift, invstd, r = saved[:8]
    weight_d, bias_d, mean_d, scale_d, shift_d, invstd_d = saved[8:]
    need = ctx.needs_input_grad
    count, group = ctx.count, ctx.group
    grad_out = cast(grad_out, y.dtype)
    want_r = r is not None and bool(need[7] or need[8])
    if not group:
        grad_y, grad_r, grad_w, grad_b, grad_w_d, grad_b_d = torch.ops.fastres.bn_backward(
            grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, invstd, mean_d,
            invstd_d, count, want_r, ctx.variant,
        )  # fmt: skip
    else:
        # SyncBN: the input gradient's batch-statistics terms are over every process's batch,
        # the affine parameters' gradients this process's share (as nn.SyncBatchNorm's: DDP
        # reduces them).
        sums = torch.ops.fastres.bn_backward_reduce(
            grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, mean_d, ctx.variant
        )
        local_dy, local_dy_xmu, local_dy_rmu = sums
        sum_dy, sum_dy_xmu, sum_dy_rmu = all_reduce_sums(list(sums), group)
        grad_y, grad_r = torch.ops.fastres.bn_backward_elemt(
            grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, invstd, sum_dy,
            sum_dy_xmu, mean_d, invstd_d, sum_dy_rmu if ctx.two_bn else None, count, want_r,
            ctx.variant,
        )  # fmt: skip
        grad_w, grad_b = local_dy_xmu * invstd, local_dy
        grad_w_d = local_dy_rmu * invstd_d if ctx.two_bn else None
        grad_b_d = local_dy
    grad_w = cast(grad_w, weight.dtype) if need[1] else None
    grad_b = cast(grad_b, bias.dtype) if need[2] else None
    grad_residual = grad_r if want_r and not ctx.two_bn else None
    grad_y_d = grad_r if want_r and ctx.two_bn else None
    if ctx.two_bn:
        grad_w_d = cast(grad_w_d, weight_d.dtype) if need[9] else None
        grad_b_d = cast(grad_b_d, bias_d.dtype) if need[10] else None
    else:
        grad_w_d = grad_b_d = None
    return (
        grad_y, grad_w, grad_b, None, None, None, None, grad_residual, grad_y_d, grad_w_d,
        grad_b_d, None, None, None, None, None, None, None,
    )  # fmt: skip


if EXTENSION_ERROR is None:
    # A composite op of the kernels above, so that torch.compile sees one opaque op with a
    # fake implementation (dynamo could not trace the equivalent hand-written
    # autograd.Function with optional inputs); register_autograd wraps it in an
    # autograd.Function.
    _train_act_op = torch.library.custom_op(
        "fastres::bn_train_act",
        _train_act_impl,
        mutates_args=(),
        schema=(
            "(Tensor y, Tensor weight, Tensor bias, Tensor mean, Tensor scale, Tensor shift,"
            " Tensor invstd, Tensor? residual, Tensor? y_d, Tensor? weight_d, Tensor? bias_d,"
            " Tensor? mean_d, Tensor? scale_d, Tensor? shift_d, Tensor? invstd_d, bool relu,"
            " int count, str group) -> Tensor"
        ),
    )
    _train_act_op.register_fake(_train_act_fake)
    _train_act_op.register_autograd(_train_act_backward, setup_context=_train_act_setup_context)


class _TrainAct(torch.autograd.Function):
    """The autograd of `fastres::bn_train_act` (same backward) for eager execution.

    The custom op's own autograd wrapper (`register_autograd`) costs 0.05-0.1 ms more Python
    per call each way than this Function. Its body runs directly where nothing could see its
    dispatch, else the op below autograd (`call_op`), so dispatch modes and profiles see
    `fastres::bn_train_act`. torch.compile traces the custom op directly (see `bn_norm_act`).
    """

    @staticmethod
    def forward(ctx, *inputs):
        out = call_op(torch.ops.fastres.bn_train_act, _train_act_impl, inputs)
        _train_act_setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _train_act_backward(ctx, grad_out)


def bn_norm_act(
    y: Tensor,
    norm: Normalized,
    count: int,
    residual: Tensor | None = None,
    shortcut: tuple[Tensor, Normalized] | None = None,
    relu: bool = True,
    group: str = "",
) -> Tensor:
    """act(bn(y) [+ residual | + bn_d(y_d)]) for BatchNorms given as `Normalized` maps: one
    `bn_apply` forward, one `bn_backward` backward (SyncBN: reduce, all-reduce, elemt).

    Args:
        y: [N, C, H, W] conv output.
        norm: its BN (`batch_normalized`, or `running_normalized` for eval mode).
        count: values per channel of the batch statistics of both norms; 0 for norms on
            running statistics (the backward then has no batch-statistics terms).
        residual: [N, C, H, W] shortcut added as is, or None.
        shortcut: (y_d, norm_d): the downsample conv output and its BN (the two-BN tail), in
            the same mode as `norm`, or None.
        group: `sync_group_name` of the BNs: the backward sums its batch-statistics terms over
            that process group (SyncBN); "" for none.

    Returns:
        out [N, C, H, W] in y's dtype. Differentiable in y, the norms' weight and bias,
        residual and y_d; the statistics are constants to autograd (their gradient is part of
        the formula).
    """
    y_d, norm_d = shortcut if shortcut is not None else (None, None)
    args = (
        y, *norm, residual, y_d, *(norm_d or (None,) * len(Normalized._fields)), relu, count,
        group,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return torch.ops.fastres.bn_train_act(*args)
    return apply_function(_TrainAct, *args)


def bn_train_act(
    y: Tensor,
    stats: tuple[Tensor, Tensor, int],
    weight: Tensor,
    bias: Tensor,
    eps: float,
    residual: Tensor | None = None,
    shortcut: tuple[Tensor, tuple[Tensor, Tensor, int], Tensor, Tensor, float] | None = None,
    relu: bool = True,
    group: str = "",
) -> Tensor:
    """act(BN(y) [+ residual | + BN_d(y_d)]) with batch statistics (training-mode BN):
    `bn_finalize` of each BN, then `bn_norm_act`.

    Args:
        y: [N, C, H, W] conv output; weight, bias: [C] BN affine parameters.
        stats: (mean [C], m2 [C], count) of y's batch: `bn_stats`, or a conv epilogue's, or
            their `sync_batch_stats`.
        residual: [N, C, H, W] shortcut added as is, or None.
        shortcut: (y_d, its stats, weight_d, bias_d, eps_d): the downsample conv output and its
            BN (the two-BN tail), or None. Its count must equal y's.
        group: `sync_group_name` of the BNs: the backward sums its batch-statistics terms over
            that process group (SyncBN); "" for none.

    Returns:
        out [N, C, H, W] in y's dtype. Differentiable in y, weight, bias, residual, y_d,
        weight_d and bias_d; the statistics are constants to autograd (their gradient is part
        of the formula). Running statistics are the caller's (`batch_normalized` and
        `bn_norm_act` finalize and update them in one op).
    """

    def normalized(mean, m2, count, weight, bias, eps) -> Normalized:
        with torch.no_grad():
            coefficients = torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, eps)
        return Normalized(weight, bias, mean, *coefficients)

    mean, m2, count = stats
    norm = normalized(mean, m2, count, weight, bias, eps)
    if shortcut is not None:
        y_d, (mean_d, m2_d, count_d), weight_d, bias_d, eps_d = shortcut
        if count_d != count:
            raise ValueError(f"the two BNs normalize {count} and {count_d} values per channel")
        shortcut = (y_d, normalized(mean_d, m2_d, count, weight_d, bias_d, eps_d))
    return bn_norm_act(y, norm, count, residual, shortcut, relu, group)
