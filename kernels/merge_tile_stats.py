"""The second stage of the fused convolution's statistics (kernels/conv2d_fused.py, STATS=1):
the per-tile (sum, M2) that each BLOCK_M-row tile of the output wrote, merged into the
per-channel mean and M2 in one launch (it took six PyTorch ops).

Algorithm: Chan's merge. With S_t, Q_t the sum and M2 of tile t's n_t rows (every tile has
BLOCK_M rows but the last, which has the rest of the M rows), mean = sum_t S_t / M and
M2 = sum_t (Q_t + (S_t - n_t mean)^2 / n_t), the last term being n_t (mean_t - mean)^2: no
cancellation between large sums of squares. Each program owns BLOCK_C channels and walks the
tiles twice in blocks of BLOCK_T (the mean first), accumulating in ACC (fp32; fp64 for fp64).

Layout: tile_sum and tile_m2 are [tiles, C] contiguous; mean and m2 are [C].
"""

import triton
import triton.language as tl


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
    tl.store(mean_ptr + offs_c, mean, mask=c_ok)
    tl.store(m2_ptr + offs_c, m2, mask=c_ok)
