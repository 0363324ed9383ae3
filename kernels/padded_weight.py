"""A convolution weight laid out in padded channel slots (Res2Net's chunks: see
`fastres.backends.triton.res2net`), cast to the kernels' dtype and stored in the output's strides
(`arrange_weight`'s layout), with an eval-mode BatchNorm optionally folded in (FOLD: the
formulas of kernels/fold_bn.py), in one launch; its gradient in one launch back.

Channel maps (int32): row r of the padded weight is source output channel ROWS[r] (a pad row
copies a real one), column j is source input channel COLS[j], or zeros where COLS[j] < 0.
Backward: source row c and column i read their primary copy INV_ROWS[c] / INV_COLS[i]. A pad
row's gradient is dropped: its output channel only meets zero weight columns downstream, so
that gradient is zero.

Every weight-shaped tensor is addressed through its (C_out, C_in, KH, KW) strides. Each program
owns BLOCK_C output channels and walks its K = C_in * KH * KW reduction in BLOCK_K steps.
"""

import triton
import triton.language as tl

from .conv2d_fused import round_to
from .fold_bn import channel_scale, folded_bias, store_parameter_grads, weight_offsets


@triton.jit
def _mapped_offsets(k, rows, cols, C_in, KW, s_o, s_i, s_h, s_w):
    """Offsets of the [BLOCK_K, BLOCK_C] tile (index k = (kh * KW + kw) * C_in + ci, output
    channel c) at (rows[c], cols[ci], kh, kw) in a tensor of strides (s_o, s_i, s_h, s_w)."""
    r = k // C_in
    row = cols.to(tl.int64) * s_i + (r // KW).to(tl.int64) * s_h + (r % KW).to(tl.int64) * s_w
    return row[:, None] + rows.to(tl.int64)[None, :] * s_o


@triton.jit
def padded_weight_kernel(
    w_ptr,
    rows_ptr,
    cols_ptr,
    conv_bias_ptr,
    gamma_ptr,
    beta_ptr,
    mean_ptr,
    var_ptr,
    out_w_ptr,
    out_b_ptr,
    eps,
    C_out,
    C_in,
    K,
    KW,
    s_o,
    s_i,
    s_h,
    s_w,
    d_o,
    d_i,
    d_h,
    d_w,
    FOLD: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACC: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out_w [C_out, C_in, KH, KW] (the padded sizes; strides d_*), out_b [C_out] (FOLD) from
    the source weight (strides s_*). Grid: (cdiv(C_out, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_out
    src_c = tl.load(rows_ptr + offs_c, mask=c_ok, other=0)
    if FOLD:
        _, scale = channel_scale(gamma_ptr, var_ptr, src_c, c_ok, eps, ACC, HAS_GAMMA)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        src_ci = tl.load(cols_ptr + k % C_in, mask=k_ok, other=-1)
        ok = k_ok[:, None] & c_ok[None, :]
        src = _mapped_offsets(k, src_c, src_ci, C_in, KW, s_o, s_i, s_h, s_w)
        w = tl.load(w_ptr + src, mask=ok & (src_ci >= 0)[:, None], other=0.0).to(ACC)
        if FOLD:
            w = w * scale[None, :]
        dst = weight_offsets(k, offs_c, C_in, KW, d_o, d_i, d_h, d_w)
        tl.store(out_w_ptr + dst, round_to(w, out_w_ptr.dtype.element_ty, EMULATE_RTNE), mask=ok)
    if FOLD:
        shift = folded_bias(
            mean_ptr, conv_bias_ptr, beta_ptr, src_c, c_ok, scale, ACC, HAS_CONV_BIAS, HAS_BETA
        )
        tl.store(out_b_ptr + offs_c, shift, mask=c_ok)


@triton.jit
def padded_weight_backward_kernel(
    grad_wf_ptr,
    grad_bf_ptr,
    inv_rows_ptr,
    inv_cols_ptr,
    w_ptr,
    conv_bias_ptr,
    gamma_ptr,
    mean_ptr,
    var_ptr,
    grad_w_ptr,
    grad_conv_bias_ptr,
    grad_gamma_ptr,
    grad_beta_ptr,
    eps,
    C_out,
    C_in,
    K,
    KW,
    s_o,
    s_i,
    s_h,
    s_w,
    g_o,
    g_i,
    g_h,
    g_w,
    d_o,
    d_i,
    d_h,
    d_w,
    FOLD: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The gradients of the source weight [C_out, C_in, KH, KW] (the source sizes; w strides
    s_*, grad_w d_*) and, FOLD, of the conv bias and the BN weight and bias, from those of the
    padded weight (strides g_*) and bias. Grid: (cdiv(C_out, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_out
    row = tl.load(inv_rows_ptr + offs_c, mask=c_ok, other=0)
    if FOLD:
        invstd, scale = channel_scale(gamma_ptr, var_ptr, offs_c, c_ok, eps, ACC, HAS_GAMMA)
    dot = tl.zeros((BLOCK_C,), dtype=ACC)  # sum(grad_wf[c] * w[c])
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        ok = k_ok[:, None] & c_ok[None, :]
        col = tl.load(inv_cols_ptr + k % C_in, mask=k_ok, other=0)
        src = _mapped_offsets(k, row, col, C_in, KW, g_o, g_i, g_h, g_w)
        gwf = tl.load(grad_wf_ptr + src, mask=ok, other=0.0).to(ACC)
        if FOLD:
            if HAS_GAMMA:
                src = weight_offsets(k, offs_c, C_in, KW, s_o, s_i, s_h, s_w)
                w = tl.load(w_ptr + src, mask=ok)
                dot += tl.sum(gwf * w.to(ACC), axis=0)
            gwf = gwf * scale[None, :]
        dst = grad_w_ptr + weight_offsets(k, offs_c, C_in, KW, d_o, d_i, d_h, d_w)
        tl.store(dst, gwf.to(grad_w_ptr.dtype.element_ty), mask=ok)
    if FOLD:
        grad_bf = tl.load(grad_bf_ptr + row, mask=c_ok, other=0.0).to(ACC)
        tl.store(grad_beta_ptr + offs_c, grad_bf.to(grad_beta_ptr.dtype.element_ty), mask=c_ok)
        store_parameter_grads(
            grad_bf, dot, invstd, scale, mean_ptr, conv_bias_ptr, grad_conv_bias_ptr,
            grad_gamma_ptr, offs_c, c_ok, ACC, HAS_CONV_BIAS, HAS_GAMMA,
        )  # fmt: skip
