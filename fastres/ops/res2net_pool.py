"""Launcher and `fastres::` custom op of the Res2Net last-chunk pool (`kernels/res2net_pool.py`).

    res2net_pool(chunk, out=concat[:, (scales - 1) * width :], stride=2)

writes AvgPool2d(3, stride, padding=1, count_include_pad=True) of a channel slice into a
channel slice of the concatenation buffer that conv3 reads, with no tensor of its own. The rest
of the fused Bottle2neck (hierarchical add in the input load, 'stage' blocks as one grouped
launch, convs writing into their concatenation slices) is `fastres.ops.conv2d_fused`;
`fastres/backends/triton/res2net.py` composes them.

`fastres::res2net_pool_out` mutates `out` and has no gradient (the differentiable path uses
PyTorch's pool); it has a fake implementation, so torch.compile traces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import conv2d_fused
from .conv2d_fused import interpreting, may_overlap
from .precision import triton_accumulator

if TYPE_CHECKING:
    from .launcher import DirectLaunch

# Tile of one program: pixels x channels (channels cover a Res2Net chunk slot of 32..208 in
# 1..4). 32 pixels: at 64, an fp32 tile's nine taps took 255 registers on sm_90 and spilled.
_BLOCK_M, _BLOCK_C = 32, 64
_INTERPRETER_BLOCK_M = 256


def pool_output_size(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(OH, OW) of AvgPool2d(kernel, stride, padding) with ceil_mode=False."""
    return (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1


def _res2net_pool_out_body(x: Tensor, out: Tensor, kernel: int, stride: int, padding: int) -> None:
    launch = _prepare(x, out, kernel, stride, padding)
    if may_overlap(x, out):
        raise ValueError("out must not share memory with x")
    conv2d_fused.check_triton_device(x, "the Res2Net pool")
    if launch is not None:
        launch(x, out)


_res2net_pool_out_op = torch.library.custom_op("fastres::res2net_pool_out", mutates_args=("out",))(
    _res2net_pool_out_body
)


# (x's and out's shape, strides, dtype, device; kernel, stride, padding) -> the launch (None:
# nothing to compute), made at the key's first call: the checks' verdict, grid and arguments.
_PREPARED: dict[tuple, DirectLaunch | None] = {}
_PREPARED_MAX = 1024


def _prepare(x: Tensor, out: Tensor, kernel: int, stride: int, padding: int) -> DirectLaunch | None:
    """The checked launch of a pool of x into out (raises unless they fit), kept per key."""
    key = (
        x.shape, x.stride(), x.dtype, x.device, out.shape, out.stride(), out.dtype, out.device,
        kernel, stride, padding,
    )  # fmt: skip
    if key in _PREPARED:
        return _PREPARED[key]
    launch = _checked_launch(x, out, kernel, stride, padding)
    if len(_PREPARED) >= _PREPARED_MAX:
        _PREPARED.clear()
    _PREPARED[key] = launch
    return launch


def _checked_launch(
    x: Tensor, out: Tensor, kernel: int, stride: int, padding: int
) -> DirectLaunch | None:
    """`_prepare` at a key's first call: checks, and works out the launch."""
    import triton

    from fastres.kernels.res2net_pool import res2net_pool_kernel

    from .launcher import DirectLaunch

    if x.dim() != 4 or out.dim() != 4:
        raise ValueError(f"expected 4-D x and out, got {tuple(x.shape)} and {tuple(out.shape)}")
    if kernel < 1 or stride < 1 or not 0 <= padding <= kernel // 2:
        raise ValueError(f"bad pool kernel {kernel}, stride {stride}, padding {padding}")
    n, c, h, w = x.shape
    oh, ow = pool_output_size(h, w, kernel, stride, padding)
    if tuple(out.shape) != (n, c, oh, ow) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {(n, c, oh, ow)} {x.dtype} on {x.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    m = n * oh * ow
    if m == 0 or c == 0:
        return None
    # Under the interpreter every tile costs Python overhead: the fewest, largest tiles.
    block_m = _INTERPRETER_BLOCK_M if interpreting() else _BLOCK_M
    block_m = min(block_m, max(16, triton.next_power_of_2(m)))
    block_c = min(_BLOCK_C, max(16, triton.next_power_of_2(c)))
    return DirectLaunch(
        res2net_pool_kernel, (triton.cdiv(m, block_m), triton.cdiv(c, block_c)), 2,
        (n, h, w, c, oh, ow, stride, padding, *x.stride(), *out.stride()),
        dict(K=kernel, ACC=triton_accumulator(x.dtype), EMULATE_RTNE=int(interpreting()),
             BLOCK_M=block_m, BLOCK_C=block_c),
    )  # fmt: skip


@_res2net_pool_out_op.register_fake
def _(x, out, kernel, stride, padding) -> None:
    return None


def res2net_pool(
    x: Tensor, out: Tensor, *, kernel: int = 3, stride: int = 1, padding: int = 1
) -> Tensor:
    """AvgPool2d(kernel, stride, padding, count_include_pad=True) of x written into out.

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16 (float64 under the interpreter, summed
            in float64), any strides (e.g. conv1's last chunk).
        out: [N, C, OH, OW] in x's dtype, any strides, memory disjoint from x's (e.g. the last
            channel slice of the concatenation buffer).
        kernel, stride, padding: of the pool (Res2Net: 3, the block's stride, 1).

    Returns:
        out.
    """
    conv2d_fused.run_out_op(
        torch.ops.fastres.res2net_pool_out, _res2net_pool_out_body,
        x, out, int(kernel), int(stride), int(padding), out=out,
    )  # fmt: skip
    return out
