"""The last-chunk average pool of the fused Res2Net block (the rest of the block runs in
kernels/conv2d_fused.py: the hierarchical add in its prologue, 'stage' blocks as one grouped
launch).

Algorithm: AvgPool2d(K, stride, padding, count_include_pad=True, ceil_mode=False) on an NHWC
channel slice, written straight into a channel slice of another buffer (the concatenation that
conv3 reads), so the pooled chunk needs neither its own tensor nor a copy. Each program owns a
BLOCK_M pixels x BLOCK_C channels tile and sums its K*K taps in ACC (fp32, and fp64 for fp64
inputs, which the tests run under the interpreter); every window lies inside
the padded input (ceil_mode off), so the divisor is always K*K.

Layout: input and output are addressed through their (n, c, h, w) strides; channel slices of
larger NHWC buffers are read and written in place. Offsets are 64-bit.
"""

import triton
import triton.language as tl

from .conv2d_fused import nhwc_tile_ptrs, round_to


@triton.jit
def res2net_pool_kernel(
    x_ptr,
    out_ptr,
    N,
    H,
    W,
    C,
    OH,
    OW,
    pool_stride,
    pad,
    stride_x_n,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_out_n,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    K: tl.constexpr,
    ACC: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[n, c, oh, ow] = sum over the K x K window of x (zero outside the image) / K^2.

    Grid: (cdiv(N*OH*OW, BLOCK_M), cdiv(C, BLOCK_C)).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < N * OH * OW
    c_ok = offs_c < C
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    x_row = x_ptr + img.to(tl.int64) * stride_x_n
    x_cols = offs_c.to(tl.int64)[None, :] * stride_x_c
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in tl.static_range(K):
        for kw in tl.static_range(K):
            ih = oh * pool_stride - pad + kh
            iw = ow * pool_stride - pad + kw
            ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ptrs = x_row + ih.to(tl.int64) * stride_x_h + iw.to(tl.int64) * stride_x_w
            v = tl.load(ptrs[:, None] + x_cols, mask=ok[:, None] & c_ok[None, :], other=0.0)
            acc += v.to(ACC)
    # count_include_pad=True: padding counts in the divisor.
    acc = acc / (K * K)
    out_ptrs = nhwc_tile_ptrs(
        out_ptr, img, oh, ow, offs_c, stride_out_n, stride_out_h, stride_out_w, stride_out_c
    )
    out = round_to(acc, out_ptr.dtype.element_ty, EMULATE_RTNE)
    tl.store(out_ptrs, out, mask=m_ok[:, None] & c_ok[None, :])
