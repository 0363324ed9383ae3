"""An eval-mode BatchNorm folded into the convolution before it, for training with the BN frozen
(running statistics, affine parameters learning): the folded weight, arranged and cast for
kernels/conv2d_fused.py, and the folded bias in one launch forward (it took eight PyTorch ops:
the fold's per-channel arithmetic, the weight product, the cast), and the gradients of the conv
weight, conv bias and BN weight and bias in one launch backward (it took about ten).

Formulas (per output channel c, ACC arithmetic: fp32, fp64 for fp64 weights):
    invstd = rsqrt(var + eps), scale = gamma * invstd (invstd without affine)
    w_f[c] = w[c] * scale, b_f = beta - mean * scale + conv_bias * scale
backward, from grad_wf [C_out, C_in, KH, KW] and grad_bf [C_out]:
    grad_w[c] = grad_wf[c] * scale, grad_conv_bias = grad_bf * scale, grad_beta = grad_bf,
    grad_gamma = (sum(grad_wf[c] * w[c]) + grad_bf * (conv_bias - mean)) * invstd

Layout: every weight-shaped tensor, the arranged output included, is addressed through its
(C_out, C_in, KH, KW) strides (conv weights are channels_last after
`model.to(memory_format=torch.channels_last)`; the output is in
`fastres.ops.conv2d_fused.arrange_weight`'s layout: channels_last, or C_out innermost for the
stem's few input channels). Each program owns BLOCK_C output channels and walks the
K = KH * KW * C_in reduction in BLOCK_K steps, in channels_last order (along K there).
"""

import triton
import triton.language as tl

from .conv2d_fused import round_to


@triton.jit
def channel_scale(
    gamma_ptr, var_ptr, offs_c, c_ok, eps, ACC: tl.constexpr, HAS_GAMMA: tl.constexpr
):
    """(invstd, scale) of channels offs_c; invstd correctly rounded in fp32 (sqrt_rn, div_rn:
    not the GPU's approximate rsqrt)."""
    var = tl.load(var_ptr + offs_c, mask=c_ok, other=1.0).to(ACC) + eps
    if ACC == tl.float32:  # noqa: SIM300 (ACC is a constexpr)
        invstd = tl.div_rn(tl.full(var.shape, 1.0, ACC), tl.sqrt_rn(var))
    else:
        invstd = 1.0 / tl.sqrt(var)
    scale = invstd
    if HAS_GAMMA:
        scale = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(ACC) * invstd
    return invstd, scale


@triton.jit
def folded_bias(
    mean_ptr, conv_bias_ptr, beta_ptr, c, c_ok, scale, ACC: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, HAS_BETA: tl.constexpr,
):  # fmt: skip
    """The folded bias of channels c: beta + (conv_bias - mean) * scale."""
    shift = -tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC) * scale
    if HAS_CONV_BIAS:
        shift += tl.load(conv_bias_ptr + c, mask=c_ok, other=0.0).to(ACC) * scale
    if HAS_BETA:
        shift += tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC)
    return shift


@triton.jit
def store_parameter_grads(
    grad_bf, dot, invstd, scale, mean_ptr, conv_bias_ptr, grad_conv_bias_ptr, grad_gamma_ptr,
    offs_c, c_ok, ACC: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
):  # fmt: skip
    """Stores the gradients of the conv bias (grad_bf * scale) and of the BN weight
    ((dot + grad_bf * (conv_bias - mean)) * invstd, dot = sum(grad_wf[c] * w[c])) of channels
    offs_c, from the folded bias's gradient grad_bf."""
    if HAS_CONV_BIAS:
        dst = grad_conv_bias_ptr + offs_c
        tl.store(dst, (grad_bf * scale).to(grad_conv_bias_ptr.dtype.element_ty), mask=c_ok)
    if HAS_GAMMA:
        centre = -tl.load(mean_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
        if HAS_CONV_BIAS:
            centre += tl.load(conv_bias_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
        grad_gamma = (dot + grad_bf * centre) * invstd
        tl.store(grad_gamma_ptr + offs_c, grad_gamma.to(grad_gamma_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def weight_offsets(k, offs_c, C_in, KW, s_o, s_i, s_h, s_w):
    """Offsets of the [BLOCK_K, BLOCK_C] tile (index k = (kh * KW + kw) * C_in + ci along K,
    output channel c) in a weight-shaped tensor of strides (s_o, s_i, s_h, s_w)."""
    ci = k % C_in
    r = k // C_in
    row = ci.to(tl.int64) * s_i + (r // KW).to(tl.int64) * s_h + (r % KW).to(tl.int64) * s_w
    return row[:, None] + offs_c.to(tl.int64)[None, :] * s_o


@triton.jit
def fold_bn_kernel(
    w_ptr,
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
    o_o,
    o_i,
    o_h,
    o_w,
    HAS_CONV_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACC: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out_w (arranged, in out_w's dtype) and out_b (ACC) of the fold; w has strides s_*,
    out_w o_*. Grid: (cdiv(C_out, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_out
    _, scale = channel_scale(gamma_ptr, var_ptr, offs_c, c_ok, eps, ACC, HAS_GAMMA)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = (k < K)[:, None] & c_ok[None, :]
        src = weight_offsets(k, offs_c, C_in, KW, s_o, s_i, s_h, s_w)
        w = tl.load(w_ptr + src, mask=ok, other=0.0).to(ACC) * scale[None, :]
        dst = weight_offsets(k, offs_c, C_in, KW, o_o, o_i, o_h, o_w)
        tl.store(out_w_ptr + dst, round_to(w, out_w_ptr.dtype.element_ty, EMULATE_RTNE), mask=ok)
    shift = folded_bias(
        mean_ptr, conv_bias_ptr, beta_ptr, offs_c, c_ok, scale, ACC, HAS_CONV_BIAS, HAS_BETA
    )
    tl.store(out_b_ptr + offs_c, shift, mask=c_ok)


@triton.jit
def fold_bn_backward_kernel(
    grad_wf_ptr,
    grad_bf_ptr,
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
    HAS_CONV_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The gradients of the fold's inputs (see the file header); w has strides s_*, grad_wf
    g_*, grad_w d_*. Grid: (cdiv(C_out, BLOCK_C),)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C_out
    invstd, scale = channel_scale(gamma_ptr, var_ptr, offs_c, c_ok, eps, ACC, HAS_GAMMA)
    dot = tl.zeros((BLOCK_C,), dtype=ACC)  # sum(grad_wf[c] * w[c])
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = (k < K)[:, None] & c_ok[None, :]
        gwf = tl.load(
            grad_wf_ptr + weight_offsets(k, offs_c, C_in, KW, g_o, g_i, g_h, g_w),
            mask=ok,
            other=0.0,
        ).to(ACC)
        if HAS_GAMMA:
            w = tl.load(w_ptr + weight_offsets(k, offs_c, C_in, KW, s_o, s_i, s_h, s_w), mask=ok)
            dot += tl.sum(gwf * w.to(ACC), axis=0)
        dst = grad_w_ptr + weight_offsets(k, offs_c, C_in, KW, d_o, d_i, d_h, d_w)
        tl.store(dst, (gwf * scale[None, :]).to(grad_w_ptr.dtype.element_ty), mask=ok)
    grad_bf = tl.load(grad_bf_ptr + offs_c, mask=c_ok, other=0.0).to(ACC)
    store_parameter_grads(
        grad_bf, dot, invstd, scale, mean_ptr, conv_bias_ptr, grad_conv_bias_ptr, grad_gamma_ptr,
        offs_c, c_ok, ACC, HAS_CONV_BIAS, HAS_GAMMA,
    )  # fmt: skip
    if HAS_BETA:
        tl.store(grad_beta_ptr + offs_c, grad_bf.to(grad_beta_ptr.dtype.element_ty), mask=c_ok)
