"""The second stage of the fused convolution's statistics (kernels/conv2d_fused.py, STATS=1):
the per-tile (sum, M2) that each BLOCK_M-row tile of the output wrote, merged into the
per-channel mean and M2 in one launch (it took six PyTorch ops).

Algorithm: Chan's merge. With S_t, Q_t the sum and M2 of tile t's n_t rows (every tile has
BLOCK_M rows but the last, which has the rest of the M rows), mean = sum_t S_t / M and
M2 = sum_t (Q_t + (S_t - n_t mean)^2 / n_t), the last term being n_t (mean_t - mean)^2: no
cancellation between large sums of squares. Each program owns BLOCK_C channels and walks the
tiles twice in blocks of BLOCK_T (the mean first), accumulating in ACC (fp32; fp64 for fp64).

`merge_finalize_kernel` also finalizes the BatchNorm that normalizes those channels (scale,
shift, invstd, as `fastres::bn_finalize`) and updates its running statistics (as
`fastres::bn_finalize_update`, the arithmetic of csrc/batchnorm_math.h), in the same launch:
one launch per training convolution's BatchNorm instead of a merge and a finalize op.

Layout: tile_sum and tile_m2 are [tiles, C] contiguous; every per-channel tensor is [C]
contiguous.
"""

import triton
import triton.language as tl


@triton.jit
def _merged(tile_sum_ptr, tile_m2_ptr, offs_c, c_ok, tiles, C, M, rows_per_tile,
            ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """(mean, M2) of the channels offs_c over M rows, from the tiles' partials."""
    total = tl.zeros((BLOCK_C,), dtype=ACC)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < tiles)[:, None] & c_ok[None, :]
        ptrs = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
        total += tl.sum(tl.load(tile_sum_ptr + ptrs, mask=ok, other=0.0).to(ACC), axis=0)
    mean = total / M
    m2 = tl.zeros((BLOCK_C,), dtype=ACC)
    for t0 in range(0, tiles, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < tiles)[:, None] & c_ok[None, :]
        ptrs = offs_t.to(tl.int64)[:, None] * C + offs_c[None, :]
        s = tl.load(tile_sum_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        q = tl.load(tile_m2_ptr + ptrs, mask=ok, other=0.0).to(ACC)
        # Rows of each tile (at least 1 where masked off, so that nothing divides by 0).
        n = tl.maximum(tl.minimum(M - offs_t * rows_per_tile, rows_per_tile), 1).to(ACC)
        d = s - n[:, None] * mean[None, :]
        m2 += tl.sum(tl.where(ok, q + d * d / n[:, None], 0.0), axis=0)
    return mean, m2


@triton.jit
def merge_tile_stats_kernel(
    tile_sum_ptr,
    tile_m2_ptr,
    mean_ptr,
    m2_ptr,
    tiles,
    C,
    M,
    rows_per_tile,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """mean[c], m2[c] of M rows from the tiles' partials. Grid: (cdiv(C, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    mean, m2 = _merged(
        tile_sum_ptr, tile_m2_ptr, offs_c, c_ok, tiles, C, M, rows_per_tile, ACC, BLOCK_T, BLOCK_C
    )
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(m2_ptr + offs_c, m2, mask=c_ok)


@triton.jit
def merge_finalize_kernel(
    tile_sum_ptr,
    tile_m2_ptr,
    weight_ptr,
    bias_ptr,
    mean_ptr,
    m2_ptr,
    scale_ptr,
    shift_ptr,
    invstd_ptr,
    running_mean_ptr,
    running_var_ptr,
    num_batches_tracked_ptr,
    tiles,
    C,
    M,
    rows_per_tile,
    EPS: tl.constexpr,
    MOMENTUM: tl.constexpr,
    UPDATE: tl.constexpr,
    SLOT: tl.constexpr,
    WIDTH: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """`merge_tile_stats_kernel`, then the BatchNorm of the M rows finalized: invstd =
    1 / sqrt(M2 / M + EPS), scale = weight * invstd, shift = bias - mean * scale; with UPDATE
    the running statistics too (factor MOMENTUM: the cumulative average, whose factor reads
    num_batches_tracked, is not done here), and num_batches_tracked + 1 by program 0 (which no
    program reads). Per-channel parameters load in their dtype, compute in ACC; the outputs are
    ACC. Grid: (cdiv(C, BLOCK_C),).

    Padded channels (Res2Net's chunk slots): the C channels are chunks of SLOT, the first
    WIDTH of each real and the rest copies of the chunk's first channel; the BatchNorm's weight,
    bias and running statistics are the real channels' (C / SLOT * WIDTH). Each channel reads
    its real channel's parameters, and only real channels update running statistics. SLOT =
    WIDTH = 1: no padding."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    in_slot = offs_c % SLOT
    real = in_slot < WIDTH
    source = (offs_c // SLOT) * WIDTH + tl.where(real, in_slot, 0)
    mean, m2 = _merged(
        tile_sum_ptr, tile_m2_ptr, offs_c, c_ok, tiles, C, M, rows_per_tile, ACC, BLOCK_T, BLOCK_C
    )
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(m2_ptr + offs_c, m2, mask=c_ok)
    # Correctly rounded, as the extension's 1 / sqrt on either device (Triton's float32 sqrt
    # and division are approximate by default; its float64 ones are not).
    if ACC == tl.float64:  # noqa: SIM300 (ACC is a constexpr)
        invstd = 1.0 / tl.sqrt(m2 / M + EPS)
    else:
        invstd = tl.div_rn(tl.full((BLOCK_C,), 1.0, ACC), tl.sqrt_rn(m2 / M + EPS))
    scale = tl.load(weight_ptr + source, mask=c_ok, other=0.0).to(ACC) * invstd
    shift = tl.load(bias_ptr + source, mask=c_ok, other=0.0).to(ACC) - mean * scale
    tl.store(invstd_ptr + offs_c, invstd, mask=c_ok)
    tl.store(scale_ptr + offs_c, scale, mask=c_ok)
    tl.store(shift_ptr + offs_c, shift, mask=c_ok)
    if UPDATE:
        factor = tl.full((BLOCK_C,), MOMENTUM, ACC)
        ok = c_ok & real
        old_mean = tl.load(running_mean_ptr + source, mask=ok, other=0.0).to(ACC)
        old_var = tl.load(running_var_ptr + source, mask=ok, other=0.0).to(ACC)
        unbiased = m2 / (M - 1)
        new_mean = (1.0 - factor) * old_mean + factor * mean
        new_var = (1.0 - factor) * old_var + factor * unbiased
        tl.store(running_mean_ptr + source, new_mean, mask=ok)
        tl.store(running_var_ptr + source, new_var, mask=ok)
        if tl.program_id(0) == 0:
            tl.store(num_batches_tracked_ptr, tl.load(num_batches_tracked_ptr) + 1)
