"""The fused convolution's statistics, second stage: per-tile (sum, M2) merged into the
per-channel mean and M2 by one kernel (`kernels/merge_tile_stats.py`), against float64 PyTorch;
the merge with the BatchNorm finalize in one launch against the extension's finalize ops.

Runs on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
and on CUDA where a GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from fastres.ops.conv2d_fused import _merge_tiles, interpreting, merge_finalize_launch
from fastres.testing import OpRecorder

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1"
)


def _tile_partials(x: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the convolution's epilogue writes: each tile's sum and M2 about its own mean."""
    tiles = x.split(block_m)
    sums = torch.stack([t.sum(0) for t in tiles])
    m2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles])
    return sums, m2


# (rows, channels, rows per tile): a last tile with fewer rows; more tiles than one step of
# the kernel's loop over tiles (32), and more channels than one program's (128).
SHAPES = [(16 * 70 + 5, 24, 16), (1000, 130, 64), (7, 3, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, c, block_m", SHAPES)
def test_merge_matches_float64(device, dtype, m, c, block_m):
    if dtype == torch.float64 and device.type == "cuda":
        pytest.skip("float64 statistics come from the interpreter's float64 kernels only")
    # Channels with a mean far from 0 against their spread: a one-pass sum of squares would
    # lose their variance. (Not further in float32: there the partials' own rounding is what
    # limits any merge.)
    spread = torch.rand(c, dtype=torch.float64) * 3 + 0.5
    x = torch.randn(m, c, dtype=torch.float64) * spread + torch.randn(c, dtype=torch.float64) * 100
    sums, m2 = _tile_partials(x, block_m)
    mean, merged_m2 = _merge_tiles(sums.to(device, dtype), m2.to(device, dtype), m, block_m)
    assert mean.dtype == merged_m2.dtype == dtype and mean.shape == merged_m2.shape == (c,)
    gold_m2 = ((x - x.mean(0)) ** 2).sum(0)
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(mean.cpu().double(), x.mean(0), **tol)
    torch.testing.assert_close(merged_m2.cpu().double(), gold_m2, **tol)


def test_merge_is_one_launch_and_no_pytorch_op(device):
    """The merge used to take about a dozen ATen ops (kernels on a GPU): now its two outputs
    are allocated and one kernel runs (the interpreter's copies of the kernel's arguments,
    copy_ / set_, are no PyTorch arithmetic)."""
    sums, m2 = _tile_partials(torch.randn(100, 8, dtype=torch.float64), 16)
    sums, m2 = sums.float().to(device), m2.float().to(device)
    with OpRecorder() as recorder:
        _merge_tiles(sums, m2, 100, 16)
    allocations_or_copies = ("aten.empty", "aten.new_empty", "aten.set_", "aten.copy_")
    assert not [op for op in recorder.ops if not op.startswith(allocations_or_copies)]


@pytest.mark.parametrize("running_dtype", [None, torch.float32, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, c, block_m", SHAPES)
def test_merge_finalize_matches_extension(device, dtype, m, c, block_m, running_dtype):
    """`merge_finalize_kernel`: the merge, then the BatchNorm finalized and its running
    statistics updated as `fastres::bn_finalize_update` does (None: no running statistics, as
    `fastres::bn_finalize`)."""
    pytest.importorskip("fastres._C")
    if dtype == torch.float64 and (device.type == "cuda" or running_dtype == torch.float16):
        pytest.skip("float64 statistics: the interpreter's, with float64 running statistics")
    if dtype == torch.float64 and running_dtype is not None:
        running_dtype = torch.float64
    x = torch.randn(m, c, dtype=torch.float64) * 2 + torch.randn(c, dtype=torch.float64)
    sums, m2 = (t.to(device, dtype) for t in _tile_partials(x, block_m))
    weight = torch.rand(c, dtype=dtype, device=device) + 0.5
    bias = torch.randn(c, dtype=dtype, device=device)
    momentum = 0.3 if running_dtype is not None else None
    running = []
    if running_dtype is not None:
        running = [torch.randn(c, device=device).to(running_dtype),
                   torch.rand(c, device=device).to(running_dtype) + 0.5,
                   torch.tensor(7, device=device)]  # fmt: skip
    expected_running = [t.clone() for t in running]
    outputs = torch.empty(5, c, dtype=dtype, device=device).unbind()
    launch = merge_finalize_launch(sums.shape[0], c, m, block_m, dtype, 1e-3, momentum)
    launch(sums, m2, weight, bias, *outputs, *(running or [None] * 3))

    mean, merged_m2 = _merge_tiles(sums, m2, m, block_m)
    if running_dtype is None:
        expected = torch.ops.fastres.bn_finalize(mean, merged_m2, m, weight, bias, 1e-3)
    else:
        expected = torch.ops.fastres.bn_finalize_update(
            mean, merged_m2, m, weight, bias, 1e-3, *expected_running, momentum
        )
    # The same formulas, correctly rounded on both sides: equal but for the order of a
    # multiply-add where the GPU fuses it.
    tol = dict(rtol=0, atol=0) if device.type == "cpu" else dict(rtol=2e-7, atol=1e-7)
    for name, got, want in zip(("mean", "m2", "scale", "shift", "invstd"), outputs,
                               (mean, merged_m2, *expected)):  # fmt: skip
        torch.testing.assert_close(got, want, **tol, msg=name)
    for got, want in zip(running, expected_running, strict=True):
        torch.testing.assert_close(got, want, **tol)
    if running:
        assert running[2].item() == 8


@pytest.mark.parametrize("chunks, slot, width", [(4, 16, 6), (1, 16, 13), (3, 32, 26)])
def test_merge_finalize_padded_slots(device, chunks, slot, width):
    """Channels in padded slots (Res2Net's chunks: `width` real channels of every `slot`, a pad
    a copy of its chunk's first channel): every channel's coefficients are its real channel's
    (the extension's finalize of the real channels, gathered), only the real channels update
    the running statistics (the BatchNorm's, of chunks * width channels)."""
    pytest.importorskip("fastres._C")
    m, block_m = 300, 64
    real = chunks * width
    padded_index = torch.tensor(
        [c * width + (j if j < width else 0) for c in range(chunks) for j in range(slot)]
    )
    x = torch.randn(m, real, dtype=torch.float64) * 2 + torch.randn(real, dtype=torch.float64)
    sums, m2 = (t.float().to(device) for t in _tile_partials(x[:, padded_index], block_m))
    weight, bias = torch.rand(real, device=device) + 0.5, torch.randn(real, device=device)
    running = [torch.randn(real, device=device), torch.rand(real, device=device) + 0.5,
               torch.tensor(3, device=device)]  # fmt: skip
    expected_running = [t.clone() for t in running]
    outputs = torch.empty(5, chunks * slot, device=device).unbind()
    launch = merge_finalize_launch(sums.shape[0], chunks * slot, m, block_m, torch.float32,
                                   1e-5, 0.1, slot, width)  # fmt: skip
    launch(sums, m2, weight, bias, *outputs, *running)

    real_index = torch.tensor([c * slot + j for c in range(chunks) for j in range(width)])
    mean, merged_m2 = (t[real_index.to(device)] for t in outputs[:2])
    expected = torch.ops.fastres.bn_finalize_update(
        mean.contiguous(), merged_m2.contiguous(), m, weight, bias, 1e-5, *expected_running, 0.1
    )
    tol = dict(rtol=0, atol=0) if device.type == "cpu" else dict(rtol=2e-7, atol=1e-7)
    for name, got, want in zip(("scale", "shift", "invstd"), outputs[2:], expected):
        torch.testing.assert_close(got, want[padded_index.to(device)], **tol, msg=name)
    torch.testing.assert_close(mean.cpu().double(), x.mean(0), rtol=1e-4, atol=1e-3)
    for got, want in zip(running, expected_running, strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert running[2].item() == 4
