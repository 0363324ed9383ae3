"""Fused 2-D convolution: implicit GEMM on NHWC tensors with prologue and epilogue fusions.

Algorithm: the convolution is a GEMM out[M, C_out] = A[M, K] @ B[K, C_out] with M = N*OH*OW
output pixels and K = KH*KW*C_in, where A (the im2col matrix) is never formed: each program
owns a BLOCK_M x BLOCK_N output tile and gathers its A tiles straight from the input, computing
the input pixel of every (output pixel, kernel tap) pair and masking padding, image borders and
the channel tail. Two K orders:

- tap-major (FLAT_K=0): K blocks never straddle two taps (channel blocks within a tap, the
  channel tail masked), so input coordinates are computed per tap. For C_in >= 16.
- flat (FLAT_K=1): one loop over K = (kh, kw, c) flattened, every element decoding its own tap.
  For small C_in (the stem's 3 channels), where a per-tap channel block would be mostly mask.

While the tiles are in registers the kernel also applies
- prologue, on every input element: per-input-channel scale/shift (IN_AFFINE) and ReLU
  (IN_RELU), i.e. the previous layer's BatchNorm applied lazily; then optionally a POOL x POOL
  average pool with stride POOL (ceil_mode, count_include_pad=False; the avg_down shortcut), so
  the convolution reads a virtual pooled input of PH x PW pixels. Padding stays zero after the
  prologue, as in the unfused graph. Then, with IN_ADD, + a second input x2 of x's shape
  (Res2Net's hierarchical add: previous conv output + chunk i, never formed as a tensor).
- epilogue, on the fp32 accumulator: + bias[C_out] (a folded BatchNorm), + residual
  (RESIDUAL), first scaled by res_scale[C_out] + res_shift[C_out] with RES_AFFINE (a shortcut's
  BatchNorm), ReLU, per-channel statistics of the result (STATS: each tile's sum and M2 about
  its mean, merged by the launcher; for training-mode BatchNorm), cast to the output dtype.

Groups: a second grid axis runs several independent convolutions in one launch (a grouped
convolution, as nn.Conv2d(groups=G)): group g reads input channels [g*C_in, (g+1)*C_in), writes
output channels [g*C_out, (g+1)*C_out) with weight rows [g*C_out, (g+1)*C_out) and their bias /
residual / statistics entries. C_in and C_out are per group; odd counts are masked in the tiles.
Res2Net's 'stage' blocks run their scales - 1 chunk convolutions this way.

Layout: every activation is addressed through its (n, c, h, w) strides, so NHWC
(channels_last) tensors and channel slices of larger NHWC buffers (channel offset and pixel
stride) are read and written in place. The weight too is addressed by strides
([C_out, C_in, KH, KW] logical); it is fastest in `fastres.ops.conv2d_fused.arrange_weight`'s
layout: channels_last for tap-major K (a B tile contiguous along K: K-major, as Hopper's TF32
wgmma wants it), C_out innermost for flat K (whose K-major rows are not 16-byte aligned).
Activation offsets are 64-bit.

Precision: DOT_PRECISION "native" multiplies fp16/bf16 tiles as they are (tensor cores),
"ieee" multiplies fp32 exactly, "tf32" multiplies fp32 in TF32, "fp64" multiplies fp64;
accumulation (ACC) is fp32, and fp64 for fp64 inputs, which the launcher allows only under the
interpreter (tests compare whole training runs in float64, where fp32 rounding through batch
statistics of tiny test batches is chaotic). Under the Triton interpreter the launcher picks
"ieee" for fp16 / bf16, casting the tiles to fp32, because the interpreter's bf16 dot is wrong,
and sets EMULATE_RTNE, because its fp32 -> bf16 conversion truncates.

Limits: BLOCK_K >= 16 and BLOCK_M, BLOCK_N >= 16 (tl.dot); M = N*OH*OW and C_out
must fit in int32 (offsets into tensors are int64); the POOL prologue assumes no padding around
the pool (kernel == stride == POOL); IN_ADD needs POOL == 1.
"""

import triton
import triton.language as tl


def conv2d_fused_name(spec) -> str:
    """Kernel name that says which fusions a specialization carries (for profiler timelines).

    E.g. `fastres_conv3x3_bias_relu`, `fastres_conv1x1_bias_add_relu`,
    `fastres_avgpool2_conv1x1_bias`, `fastres_bnrelu_conv1x1_stats`.
    """
    c = spec.constants
    parts = ["fastres"]
    if c.get("IN_AFFINE"):
        parts.append("bnrelu" if c.get("IN_RELU") else "bn")
    elif c.get("IN_RELU"):
        parts.append("relu")
    if c.get("IN_ADD"):
        parts.append("add")
    if c.get("POOL", 1) > 1:
        parts.append(f"avgpool{c['POOL']}")
    parts.append(f"conv{c.get('KH', 'k')}x{c.get('KW', 'k')}")
    if c.get("HAS_BIAS"):
        parts.append("bias")
    if c.get("RESIDUAL"):
        parts.append("addbn" if c.get("RES_AFFINE") else "add")
    if c.get("RELU"):
        parts.append("relu")
    if c.get("STATS"):
        parts.append("stats")
    return "_".join(parts)


@triton.jit
def _relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does (Triton's default maximum drops it on GPUs:
    a model that hid a NaN would hide a diverged run)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nhwc_tile_ptrs(base, img, oh, ow, offs_c, stride_n, stride_h, stride_w, stride_c):
    """Pointers of a [pixels, channels] tile of an (n, c, h, w)-strided tensor, 64-bit offsets."""
    return (
        base
        + img.to(tl.int64)[:, None] * stride_n
        + oh.to(tl.int64)[:, None] * stride_h
        + ow.to(tl.int64)[:, None] * stride_w
        + offs_c.to(tl.int64)[None, :] * stride_c
    )


@triton.jit
def _input_affine(in_scale_ptr, in_shift_ptr, cs, ok, IN_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """The input channels' BatchNorm scale and shift as [1, BLOCK_K] rows (unused without it)."""
    if IN_AFFINE:
        in_scale = tl.load(in_scale_ptr + cs, mask=ok, other=0.0).to(ACC)[None, :]
        in_shift = tl.load(in_shift_ptr + cs, mask=ok, other=0.0).to(ACC)[None, :]
    else:
        in_scale = 0.0
        in_shift = 0.0
    return in_scale, in_shift


@triton.jit
def _load_input_tile(
    x_row,
    x2_row,
    ih,
    iw,
    cs,
    valid,
    in_scale,
    in_shift,
    H,
    W,
    stride_x_h,
    stride_x_w,
    stride_x_c,
    stride_x2_h,
    stride_x2_w,
    stride_x2_c,
    POOL: tl.constexpr,
    IN_AFFINE: tl.constexpr,
    IN_RELU: tl.constexpr,
    IN_ADD: tl.constexpr,
    ACC: tl.constexpr,
):
    """One A tile: input elements (pooled virtual pixels when POOL > 1) after the prologue.

    In the stored dtype without a prologue, else in ACC (the accumulation dtype).

    x_row, x2_row: [BLOCK_M, 1] pointers to each output pixel's image in x and in the added
    input x2 (IN_ADD); ih, iw: virtual input
    coordinates broadcastable to [BLOCK_M, BLOCK_K]; cs: channel of each K column; valid: mask
    of elements inside the virtual input and the channel range.
    """
    if POOL == 1:
        ptrs = x_row + ih.to(tl.int64) * stride_x_h + iw.to(tl.int64) * stride_x_w
        # Without a prologue the tile stays in the stored dtype, straight into the MMA.
        v = tl.load(ptrs + cs.to(tl.int64) * stride_x_c, mask=valid, other=0.0)
        if IN_AFFINE or IN_RELU:
            v = v.to(ACC)
        if IN_AFFINE:
            v = v * in_scale + in_shift
        if IN_RELU:
            v = _relu(v)
        if IN_AFFINE:
            # Zero padding is applied after the (lazy) BatchNorm, not before it.
            v = tl.where(valid, v, 0.0)
        if IN_ADD:
            # The sum is rounded to the operand dtype by the caller, as the unfused graph
            # stores it; masked elements load 0, so padding stays zero.
            ptrs2 = x2_row + ih.to(tl.int64) * stride_x2_h + iw.to(tl.int64) * stride_x2_w
            u = tl.load(ptrs2 + cs.to(tl.int64) * stride_x2_c, mask=valid, other=0.0)
            v = v.to(ACC) + u.to(ACC)
    else:
        total = tl.zeros(valid.shape, dtype=ACC)
        count = tl.zeros(valid.shape, dtype=ACC)
        for py in tl.static_range(POOL):
            for px in tl.static_range(POOL):
                h = ih * POOL + py
                w = iw * POOL + px
                ok = valid & (h < H) & (w < W)
                ptrs = x_row + h.to(tl.int64) * stride_x_h + w.to(tl.int64) * stride_x_w
                u = tl.load(ptrs + cs.to(tl.int64) * stride_x_c, mask=ok, other=0.0)
                u = u.to(ACC)
                if IN_AFFINE:
                    u = u * in_scale + in_shift
                if IN_RELU:
                    u = _relu(u)
                total += tl.where(ok, u, 0.0)
                count += ok.to(ACC)
        # count_include_pad=False: divide by the pixels inside the image (ceil_mode windows).
        v = total / tl.maximum(count, 1.0)
    return v


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """x.to(dtype), rounding to nearest even also where the interpreter would truncate."""
    if EMULATE_RTNE and dtype == tl.bfloat16 and x.dtype == tl.float32:
        # The interpreter converts fp32 -> bf16 by dropping the low 16 bits; round first so that
        # the drop is exact (a truncation bias would compound over a network's layers).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc += a @ b with the requested precision (see the file header)."""
    if DOT_PRECISION == "native":
        acc = tl.dot(a, b, acc)
    elif DOT_PRECISION == "fp64":
        # out_dtype named: Triton 3.6 checks the accumulator against it (fp32 by default).
        a, b = a.to(tl.float64), b.to(tl.float64)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(repr=conv2d_fused_name)
def conv2d_fused_kernel(
    x_ptr,
    x2_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    res_scale_ptr,
    res_shift_ptr,
    in_scale_ptr,
    in_shift_ptr,
    out_ptr,
    tile_sum_ptr,
    tile_m2_ptr,
    N,
    H,
    W,
    C_in,
    PH,
    PW,
    OH,
    OW,
    C_out,
    conv_stride_h,
    conv_stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    stride_x_n,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_x2_n,
    stride_x2_c,
    stride_x2_h,
    stride_x2_w,
    stride_w_o,
    stride_w_i,
    stride_w_h,
    stride_w_w,
    stride_res_n,
    stride_res_c,
    stride_res_h,
    stride_res_w,
    stride_out_n,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    stride_tile,
    KH: tl.constexpr,
    KW: tl.constexpr,
    POOL: tl.constexpr,
    IN_AFFINE: tl.constexpr,
    IN_RELU: tl.constexpr,
    IN_ADD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RESIDUAL: tl.constexpr,
    RES_AFFINE: tl.constexpr,
    RELU: tl.constexpr,
    STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    EMULATE_RTNE: tl.constexpr,
    FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[n, co, oh, ow] = epilogue(sum_k prologue(x)[n, c, ih, iw] * w[co, c, kh, kw]).

    Grid: (cdiv(M, BLOCK_M) * cdiv(C_out, BLOCK_N), groups), M = N*OH*OW; H, W are the stored
    input's size, PH, PW the (pooled) size the convolution sees; C_in, C_out per group.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    # First input / output channel of this program's group (0 without groups).
    ci0 = group * C_in
    co0 = group * C_out
    M = N * OH * OW
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    # Grouped ordering: GROUP_M row blocks share their weight columns while they are in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    img = offs_m // (OH * OW)
    pix = offs_m % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    x_row = (x_ptr + img.to(tl.int64) * stride_x_n + ci0.to(tl.int64) * stride_x_c)[:, None]
    if IN_ADD:
        x2_row = x2_ptr + img.to(tl.int64) * stride_x2_n + ci0.to(tl.int64) * stride_x2_c
        x2_row = x2_row[:, None]
    else:
        x2_row = x_row
    ih0 = (oh * conv_stride_h - pad_h)[:, None]
    iw0 = (ow * conv_stride_w - pad_w)[:, None]
    # This group's output channels in the weight, the per-channel vectors and the output.
    offs_c = co0 + offs_n
    w_cols = w_ptr + offs_c[None, :].to(tl.int64) * stride_w_o

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if FLAT_K:
        K = KH * KW * C_in
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < K
            cs = ks % C_in
            tap = ks // C_in
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + (kh * dil_h)[None, :]
            iw = iw0 + (kw * dil_w)[None, :]
            valid = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < PH) & (iw >= 0) & (iw < PW)
            in_scale, in_shift = _input_affine(
                in_scale_ptr, in_shift_ptr, ci0 + cs, k_ok, IN_AFFINE, ACC
            )
            a = _load_input_tile(
                x_row, x2_row, ih, iw, cs[None, :], valid, in_scale, in_shift, H, W,
                stride_x_h, stride_x_w, stride_x_c, stride_x2_h, stride_x2_w, stride_x2_c,
                POOL, IN_AFFINE, IN_RELU, IN_ADD, ACC,
            )  # fmt: skip
            w_off = cs * stride_w_i + kh * stride_w_h + kw * stride_w_w
            b = tl.load(w_cols + w_off[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            # Round the prologue's result to the operand dtype, as the unfused graph stores it.
            acc = _mma(round_to(a, b.dtype, EMULATE_RTNE), b, acc, DOT_PRECISION)
    else:
        # One flat loop over (tap, channel block) pairs rather than two nested loops, so that
        # the compiler software-pipelines the loads even when C_in fits one block.
        c_blocks = tl.cdiv(C_in, BLOCK_K)
        for it in range(0, KH * KW * c_blocks):
            tap = it // c_blocks
            kh = tap // KW
            kw = tap % KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            pix_ok = m_ok[:, None] & (ih >= 0) & (ih < PH) & (iw >= 0) & (iw < PW)
            cs = (it % c_blocks) * BLOCK_K + offs_k
            c_ok = cs < C_in
            in_scale, in_shift = _input_affine(
                in_scale_ptr, in_shift_ptr, ci0 + cs, c_ok, IN_AFFINE, ACC
            )
            a = _load_input_tile(
                x_row, x2_row, ih, iw, cs[None, :], pix_ok & c_ok[None, :], in_scale, in_shift,
                H, W, stride_x_h, stride_x_w, stride_x_c, stride_x2_h, stride_x2_w, stride_x2_c,
                POOL, IN_AFFINE, IN_RELU, IN_ADD, ACC,
            )  # fmt: skip
            w_tap = w_cols + kh * stride_w_h + kw * stride_w_w
            b = tl.load(
                w_tap + cs[:, None].to(tl.int64) * stride_w_i,
                mask=c_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = _mma(round_to(a, b.dtype, EMULATE_RTNE), b, acc, DOT_PRECISION)

    out_mask = m_ok[:, None] & n_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=n_ok, other=0.0).to(ACC)[None, :]
    if RESIDUAL:
        res_ptrs = nhwc_tile_ptrs(
            res_ptr, img, oh, ow, offs_c, stride_res_n, stride_res_h, stride_res_w, stride_res_c
        )
        r = tl.load(res_ptrs, mask=out_mask, other=0.0).to(ACC)
        if RES_AFFINE:
            r_scale = tl.load(res_scale_ptr + offs_c, mask=n_ok, other=0.0).to(ACC)
            r_shift = tl.load(res_shift_ptr + offs_c, mask=n_ok, other=0.0).to(ACC)
            r = r * r_scale[None, :] + r_shift[None, :]
        acc += r
    if RELU:
        acc = _relu(acc)
    if STATS:
        # This tile's per-channel sum and M2 about its own mean (row pid_m of the [tiles,
        # channels] partials); the launcher merges the tiles with Chan's formula. Deterministic,
        # and unlike a one-pass sum of squares exact for channels whose mean dwarfs their spread.
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        tile_sum = tl.sum(tl.where(out_mask, acc, 0.0), axis=0)
        centered = tl.where(out_mask, acc - (tile_sum / rows)[None, :], 0.0)
        tile_offs = pid_m.to(tl.int64) * stride_tile + offs_c
        tl.store(tile_sum_ptr + tile_offs, tile_sum, mask=n_ok)
        tl.store(tile_m2_ptr + tile_offs, tl.sum(centered * centered, axis=0), mask=n_ok)
    out_ptrs = nhwc_tile_ptrs(
        out_ptr, img, oh, ow, offs_c, stride_out_n, stride_out_h, stride_out_w, stride_out_c
    )
    tl.store(out_ptrs, round_to(acc, out_ptr.dtype.element_ty, EMULATE_RTNE), mask=out_mask)
