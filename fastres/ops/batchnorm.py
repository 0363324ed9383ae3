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
- `bn_apply(x, scale, shift, residual, scale_r, shift_r, relu)`: act(x * scale + shift
  [+ residual | + residual * scale_r + shift_r]).
- `bn_backward_reduce` / `bn_backward_elemt`: the two passes of the backward of `bn_apply` and
  of training-mode BatchNorms in front of it (formulas in the reference).

Every op but `bn_finalize` takes a last argument `variant`, the CUDA kernels it runs (CPU
ignores it): 0 the default ones, 1 the bandwidth-bound ones (csrc/cuda/batchnorm_fast_kernels.cu),
an 'auto' candidate until measured. The wrappers below and the composite ops pass the variant
of the enclosing `kernel_variant` scope; a backward runs with its forward's.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

from ..extension import EXTENSION_ERROR
from . import tuning
from .precision import accumulator_dtype


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
    return torch.ops.fastres.bn_apply(
        x, scale, shift, residual, scale_r, shift_r, relu, current_variant()
    )


def bn_backward_reduce(*args) -> tuple[Tensor, Tensor, Tensor]:
    """`fastres::bn_backward_reduce`; see `batchnorm_reference.bn_backward_reduce`."""
    return torch.ops.fastres.bn_backward_reduce(*args)


def bn_backward_elemt(*args) -> tuple[Tensor, Tensor]:
    """`fastres::bn_backward_elemt`; see `batchnorm_reference.bn_backward_elemt`."""
    return torch.ops.fastres.bn_backward_elemt(*args)


def update_running_stats(bn: torch.nn.Module, mean: Tensor, m2: Tensor, count: int) -> None:
    """The running-statistics update of nn.BatchNorm2d in training mode, from batch statistics.

    Args:
        mean, m2: [C] batch statistics (`bn_stats`, or a conv epilogue's), over `count` values
            per channel (all processes' for SyncBN).
    """
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # momentum None: the cumulative moving average; a tensor factor keeps torch.compile
        # from specializing on the step count.
        cumulative = bn.momentum is None
        factor = 1.0 / bn.num_batches_tracked.to(mean.dtype) if cumulative else bn.momentum
        unbiased_var = m2 / (count - 1)
        bn.running_mean.mul_(1 - factor).add_((mean * factor).to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - factor).add_((unbiased_var * factor).to(bn.running_var.dtype))


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


def gather_stats_and_update_running(
    bns: list[torch.nn.Module], y: Tensor, mean: Tensor, m2: Tensor, group: str
) -> tuple[Tensor, Tensor, int]:
    """This process's batch statistics of y -> (mean, m2, count) over the group's batch.

    Synchronizes them for SyncBN (`group`, see `sync_group_name`), rejects one value per
    channel as nn.BatchNorm2d does, and updates the running statistics of `bns`, which
    normalize consecutive equal channel ranges of y [N, C, H, W].
    """
    count = y.numel() // y.shape[1]
    if group:
        mean, m2, count = sync_batch_stats(mean, m2, count, group)
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {y.size()}"
        )
    width = y.shape[1] // len(bns)
    for i, bn in enumerate(bns):
        part = slice(i * width, (i + 1) * width)
        update_running_stats(bn, mean[part], m2[part], count)
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


def _train_act_impl(
    y, mean, m2, weight, bias, eps, residual, y_d, mean_d, m2_d, weight_d, bias_d, eps_d, relu,
    count, group,
):  # fmt: skip
    variant = current_variant()
    scale, shift, _ = torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, eps)
    if y_d is None:
        return torch.ops.fastres.bn_apply(y, scale, shift, residual, None, None, relu, variant)
    scale_d, shift_d, _ = torch.ops.fastres.bn_finalize(
        mean_d, m2_d, count, weight_d, bias_d, eps_d
    )
    return torch.ops.fastres.bn_apply(y, scale, shift, y_d, scale_d, shift_d, relu, variant)


def _train_act_fake(
    y, mean, m2, weight, bias, eps, residual, y_d, mean_d, m2_d, weight_d, bias_d, eps_d, relu,
    count, group,
):  # fmt: skip
    return torch.empty_like(y, memory_format=memory_format_of(y))


def _train_act_setup_context(ctx, inputs, output):
    y, mean, m2, weight, bias, eps, residual, y_d, mean_d, m2_d, weight_d, bias_d = inputs[:12]
    eps_d, relu, count, group = inputs[12:]
    two_bn = y_d is not None
    ctx.save_for_backward(
        y, weight, bias, y_d if two_bn else residual, weight_d, bias_d, mean, m2, mean_d, m2_d
    )
    ctx.eps, ctx.eps_d, ctx.relu, ctx.two_bn = eps, eps_d, relu, two_bn
    ctx.count, ctx.group = count, group
    ctx.variant = current_variant()


def _train_act_backward(ctx, grad_out):
    y, weight, bias, r, weight_d, bias_d, mean, m2, mean_d, m2_d = ctx.saved_tensors
    need = ctx.needs_input_grad
    count = ctx.count
    # scale / shift / invstd are [C] vectors: recomputing them is cheaper than saving them.
    scale, shift, invstd = torch.ops.fastres.bn_finalize(mean, m2, count, weight, bias, ctx.eps)
    scale_d = shift_d = invstd_d = None
    if ctx.two_bn:
        scale_d, shift_d, invstd_d = torch.ops.fastres.bn_finalize(
            mean_d, m2_d, count, weight_d, bias_d, ctx.eps_d
        )
    mu_d = mean_d if ctx.two_bn else None
    grad_out = grad_out.to(y.dtype)
    sums = torch.ops.fastres.bn_backward_reduce(
        grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, mu_d, ctx.variant
    )
    # The affine parameters' gradients are this process's share (as nn.SyncBatchNorm's: DDP
    # reduces them); the input gradient's batch-statistics terms are over every process's batch.
    local_dy, local_dy_xmu, local_dy_rmu = sums
    if ctx.group:
        sums = all_reduce_sums(list(sums), ctx.group)
    sum_dy, sum_dy_xmu, sum_dy_rmu = sums
    want_r = r is not None and bool(need[6] or need[7])
    grad_y, grad_r = torch.ops.fastres.bn_backward_elemt(
        grad_out, y, scale, shift, r, scale_d, shift_d, ctx.relu, mean, invstd, sum_dy,
        sum_dy_xmu, mu_d, invstd_d, sum_dy_rmu if ctx.two_bn else None, count, want_r,
        ctx.variant,
    )  # fmt: skip
    grad_w = (local_dy_xmu * invstd).to(weight.dtype) if need[3] else None
    grad_b = local_dy.to(bias.dtype) if need[4] else None
    grad_residual = grad_r if want_r and not ctx.two_bn else None
    grad_y_d = grad_r if want_r and ctx.two_bn else None
    grad_w_d = grad_b_d = None
    if ctx.two_bn:
        grad_w_d = (local_dy_rmu * invstd_d).to(weight_d.dtype) if need[10] else None
        grad_b_d = local_dy.to(bias_d.dtype) if need[11] else None
    return (
        grad_y, None, None, grad_w, grad_b, None, grad_residual, grad_y_d, None, None,
        grad_w_d, grad_b_d, None, None, None, None,
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
            "(Tensor y, Tensor mean, Tensor m2, Tensor weight, Tensor bias, float eps,"
            " Tensor? residual, Tensor? y_d, Tensor? mean_d, Tensor? m2_d, Tensor? weight_d,"
            " Tensor? bias_d, float eps_d, bool relu, int count, str group) -> Tensor"
        ),
    )
    _train_act_op.register_fake(_train_act_fake)
    _train_act_op.register_autograd(_train_act_backward, setup_context=_train_act_setup_context)


class _TrainAct(torch.autograd.Function):
    """The autograd of `fastres::bn_train_act` (same backward) for eager execution.

    The custom op's own autograd wrapper (`register_autograd`) costs 0.05-0.1 ms more Python
    per call each way than this Function; the op itself still runs (below autograd), so
    dispatch modes and profiles see `fastres::bn_train_act`. torch.compile traces the custom
    op directly (see `bn_train_act`).
    """

    @staticmethod
    def forward(ctx, *inputs):
        out = torch.ops.fastres.bn_train_act(*inputs)
        _train_act_setup_context(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _train_act_backward(ctx, grad_out)


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
    """act(BN(y) [+ residual | + BN_d(y_d)]) with batch statistics (training-mode BN).

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
        of the formula). Running statistics are the caller's (`update_running_stats`).
    """
    mean, m2, count = stats
    y_d = mean_d = m2_d = weight_d = bias_d = None
    eps_d = 1e-5
    if shortcut is not None:
        y_d, (mean_d, m2_d, count_d), weight_d, bias_d, eps_d = shortcut
        if count_d != count:
            raise ValueError(f"the two BNs normalize {count} and {count_d} values per channel")
    args = (
        y, mean, m2, weight, bias, eps, residual, y_d, mean_d, m2_d, weight_d, bias_d, eps_d,
        relu, count, group,
    )  # fmt: skip
    if torch.compiler.is_compiling():
        return torch.ops.fastres.bn_train_act(*args)
    return _TrainAct.apply(*args)
