"""The fused convolution (kernels/conv2d_fused.py, fastres/ops/conv2d_fused.py) against the
float64 oracle, one kernel feature per test, with the docs/contract.md §3 rule.

On CPU the kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny; the same tests run on CUDA where a GPU is present.
Without a GPU, `test_compiles_for_hopper` also compiles the real kernel for sm_90 (run as a
script: `python tests/test_conv2d_fused.py`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fastres.ops.batchnorm_reference import bn_stats
from fastres.testing import OpRecorder, assert_matches_oracle

triton = pytest.importorskip("triton")

from fastres.kernels import conv2d_configs  # noqa: E402, I001
from fastres.kernels.conv2d_fused import conv2d_fused_name  # noqa: E402
from fastres.ops import conv2d_fused as conv2d_fused_module  # noqa: E402
from fastres.ops.conv2d_fused import ConvArgs, arrange_weight, conv2d_fused  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _small_interpreter_tiles(monkeypatch):
    """Tiles smaller than the test shapes, so that several tiles and their tails run (and no
    launch prepared with other tiles, by other test files)."""
    monkeypatch.setattr(
        conv2d_configs, "INTERPRETER_MAX_TILE", {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}
    )
    monkeypatch.setattr(conv2d_fused_module, "_PREPARED", {})


def reference(
    x,
    weight,
    bias=None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    residual=None,
    residual_scale=None,
    residual_shift=None,
    input_scale=None,
    input_shift=None,
    input_relu=False,
    input_pool=1,
    relu=False,
):
    """The unfused graph in plain PyTorch, in the dtype of its inputs (the oracle)."""
    col = (1, -1, 1, 1)
    if input_scale is not None:
        x = x * input_scale.to(x.dtype).view(col) + input_shift.to(x.dtype).view(col)
    if input_relu:
        x = torch.relu(x)
    if input_pool > 1:
        x = F.avg_pool2d(x, input_pool, input_pool, ceil_mode=True, count_include_pad=False)
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    if bias is not None:
        y = y + bias.to(y.dtype).view(col)
    if residual is not None:
        if residual_scale is not None:
            residual = residual * residual_scale.to(y.dtype).view(col) + residual_shift.to(
                y.dtype
            ).view(col)
        y = y + residual
    return torch.relu(y) if relu else y


def _cast(kwargs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in kwargs.items()}


def check_against_oracle(x, weight, dtype, name, **kwargs):
    """Runs the fused op on (x, weight, kwargs) in `dtype` and checks it against the oracle.

    Tensors are made in float64; the fused op gets `dtype` copies (per-channel vectors stay
    float32, as the backend passes them), the oracle float64 (gold) and `dtype` (base) ones.
    """
    vectors = ("bias", "residual_scale", "residual_shift", "input_scale", "input_shift")
    fused_kwargs = {
        k: (v.float() if k in vectors else v.to(dtype)) if torch.is_tensor(v) else v
        for k, v in kwargs.items()
    }
    xd = x.to(dtype)
    actual = conv2d_fused(xd, arrange_weight(weight.to(dtype)), **fused_kwargs)
    gold = reference(x.double(), weight.double(), **_cast(kwargs, torch.float64))
    base = reference(xd, weight.to(dtype), **_cast(kwargs, dtype))
    assert actual.dtype == dtype and actual.shape == gold.shape
    assert actual.is_contiguous(memory_format=CL)
    assert_matches_oracle(actual, base, gold, dtype, name)
    return actual


# name: (C_in, C_out, kernel, stride, padding, dilation, H, W)
SHAPES = {
    "stem7x7s2-c3": (3, 16, 7, 2, 3, 1, 13, 11),
    "1x1-c32": (32, 24, 1, 1, 0, 1, 6, 5),
    "1x1s2-c26": (26, 40, 1, 2, 0, 1, 7, 8),
    "3x3-c26": (26, 26, 3, 1, 1, 1, 7, 6),
    "3x3s2-c20": (20, 36, 3, 2, 1, 1, 9, 8),
    "3x3dil2-c17": (17, 19, 3, 1, 2, 2, 8, 7),
    "3x3-c5-odd": (5, 7, 3, 1, 1, 1, 5, 6),
    "3x3-1x1spatial": (16, 16, 3, 1, 1, 1, 1, 1),
    "3x3-nopad-c33": (33, 18, 3, 1, 0, 1, 6, 6),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_conv_shapes(device, shape, dtype):
    c_in, c_out, k, stride, padding, dilation, h, w = shape
    x = torch.randn(2, c_in, h, w, dtype=torch.float64, device=device)
    weight = torch.randn(c_out, c_in, k, k, dtype=torch.float64, device=device) / (k * c_in**0.5)
    check_against_oracle(
        x.contiguous(memory_format=CL), weight, dtype, "conv",
        stride=stride, padding=padding, dilation=dilation,
    )  # fmt: skip


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "weight-nchw", "weight-hwio"])
def test_layouts(device, layout):
    """NCHW input and a plain (un-arranged) or C_out-innermost weight are read through their
    strides."""
    x = torch.randn(2, 18, 7, 7, dtype=torch.float64, device=device)
    weight = torch.randn(20, 18, 3, 3, dtype=torch.float64, device=device) / 10
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    gold = F.conv2d(x, weight, padding=1)
    base = F.conv2d(x.float(), weight.float(), padding=1)
    w = arrange_weight(weight.float())
    if layout == "weight-nchw":
        w = weight.float()
    elif layout == "weight-hwio":
        w = weight.float().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    actual = conv2d_fused(x.float(), w, padding=1)
    assert_matches_oracle(actual, base, gold, torch.float32, layout)


def test_arrange_weight():
    """The arranged weight is channels_last from 16 input channels (as eager's autocast cast of
    a channels_last parameter, which convolution_backward takes without a copy), C_out
    innermost below (the flat-K stem), in the dtype asked for; a weight already so is returned
    as is (fp32 training copies nothing)."""
    weight = torch.randn(12, 16, 3, 3)
    arranged = arrange_weight(weight, torch.bfloat16)
    assert arranged.dtype == torch.bfloat16 and arranged.is_contiguous(memory_format=CL)
    assert torch.equal(arranged, weight.to(torch.bfloat16))
    param = torch.nn.Parameter(weight.contiguous(memory_format=CL))
    assert arrange_weight(param, torch.float32) is param
    assert arrange_weight(param, torch.bfloat16).stride() == param.to(torch.bfloat16).stride()
    stem = arrange_weight(torch.randn(12, 3, 7, 7), torch.bfloat16)
    assert stem.permute(2, 3, 1, 0).is_contiguous()


EPILOGUES = {
    "bias": dict(bias=True),
    "bias-relu": dict(bias=True, relu=True),
    "bias-add-relu": dict(bias=True, residual=True, relu=True),
    "add": dict(residual=True),
    "bias-addbn-relu": dict(bias=True, residual=True, residual_affine=True, relu=True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES.values(), ids=EPILOGUES.keys())
def test_epilogue(device, epilogue, dtype):
    n, c_in, c_out, h, w = 2, 24, 40, 6, 5
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(n, c_in, h, w, **f64).contiguous(memory_format=CL)
    weight = torch.randn(c_out, c_in, 3, 3, **f64) / 15
    kwargs = dict(padding=1, relu=epilogue.get("relu", False))
    if epilogue.get("bias"):
        kwargs["bias"] = torch.randn(c_out, **f64)
    if epilogue.get("residual"):
        kwargs["residual"] = torch.randn(n, c_out, h, w, **f64).contiguous(memory_format=CL)
    if epilogue.get("residual_affine"):
        kwargs["residual_scale"] = torch.rand(c_out, **f64) + 0.5
        kwargs["residual_shift"] = torch.randn(c_out, **f64)
    check_against_oracle(x, weight, dtype, "epilogue", **kwargs)


def test_residual_nchw(device):
    """A residual in another memory format than the output is read through its strides."""
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 16, 5, 5, **f64).contiguous(memory_format=CL)
    weight = torch.randn(24, 16, 1, 1, **f64) / 4
    residual = torch.randn(2, 24, 5, 5, **f64)  # NCHW contiguous
    check_against_oracle(x, weight, torch.float32, "nchw residual", residual=residual, relu=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stats(device, dtype):
    """Per-channel mean and M2 of the output, accumulated in fp32."""
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 20, 9, 7, **f64).contiguous(memory_format=CL)
    weight = torch.randn(36, 20, 3, 3, **f64) / 13
    bias = torch.randn(36, **f64)
    out, mean, m2 = conv2d_fused(
        x.to(dtype), arrange_weight(weight.to(dtype)), bias.float(), padding=1, stats=True
    )
    gold = reference(x, weight, bias, padding=1)
    base = reference(x.to(dtype), weight.to(dtype), bias, padding=1).float()
    assert mean.dtype == m2.dtype == torch.float32 and mean.shape == m2.shape == (36,)
    assert_matches_oracle(out, base, gold, dtype, "out")
    (base_mean, base_m2), (gold_mean, gold_m2) = bn_stats(base), bn_stats(gold)
    assert_matches_oracle(mean, base_mean, gold_mean, dtype, "mean")
    assert_matches_oracle(m2, base_m2, gold_m2, dtype, "m2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kernel,padding,input_relu,affine",
    [(3, 1, True, True), (1, 0, True, True), (3, 1, False, True), (3, 1, True, False)],
    ids=["3x3-bnrelu", "1x1-bnrelu", "3x3-bn", "3x3-relu"],
)
def test_input_prologue(device, kernel, padding, input_relu, affine, dtype):
    """The previous layer's BN (+ ReLU) applied on the input load; padding stays zero."""
    f64 = dict(dtype=torch.float64, device=device)
    c_in = 26
    x = torch.randn(2, c_in, 7, 6, **f64).contiguous(memory_format=CL)
    weight = torch.randn(20, c_in, kernel, kernel, **f64) / (kernel * 5)
    kwargs = dict(padding=padding, input_relu=input_relu, bias=torch.randn(20, **f64))
    if affine:
        # A negative shift so that padding with BN(0) + ReLU would differ from zero padding.
        kwargs["input_scale"] = torch.rand(c_in, **f64) + 0.5
        kwargs["input_shift"] = torch.randn(c_in, **f64) - 0.5
    check_against_oracle(x, weight, dtype, "prologue", **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool,hw", [(2, (7, 9)), (2, (8, 6)), (3, (7, 8))], ids=str)
def test_avgpool_prologue(device, pool, hw, dtype):
    """avg_down shortcut: pool (ceil_mode, count_include_pad=False) fused into the 1x1 conv."""
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 24, *hw, **f64).contiguous(memory_format=CL)
    weight = torch.randn(40, 24, 1, 1, **f64) / 5
    check_against_oracle(x, weight, dtype, "avgpool", input_pool=pool, bias=torch.randn(40, **f64))


def test_avgpool_with_bn_prologue(device):
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 16, 5, 7, **f64).contiguous(memory_format=CL)
    weight = torch.randn(24, 16, 1, 1, **f64) / 4
    check_against_oracle(
        x, weight, torch.float32, "bnrelu+avgpool", input_pool=2, input_relu=True,
        input_scale=torch.rand(16, **f64) + 0.5, input_shift=torch.randn(16, **f64),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_slices(device, dtype):
    """Input and output are channel slices of larger NHWC buffers, read and written in place."""
    n, h, w, width = 2, 6, 5, 13
    whole = torch.randn(n, 4 * width, h, w, device=device).to(dtype).contiguous(memory_format=CL)
    chunk = whole[:, width : 2 * width]
    weight = (torch.randn(width, width, 3, 3, device=device) / 10).to(dtype)
    bias = torch.randn(width, device=device)
    target = torch.full((n, 3 * width, h, w), float("nan"), device=device, dtype=dtype)
    target = target.contiguous(memory_format=CL)
    out = target[:, 2 * width :]
    result = conv2d_fused(chunk, arrange_weight(weight), bias, padding=1, relu=True, out=out)
    assert result is out
    gold = reference(chunk.double(), weight.double(), bias.double(), padding=1, relu=True)
    base = reference(chunk, weight, bias, padding=1, relu=True)
    assert_matches_oracle(target[:, 2 * width :], base, gold, dtype, "slice out")
    assert torch.isnan(target[:, : 2 * width]).all(), "wrote outside its channel slice"


def test_out_bumps_the_version_and_dispatches(device):
    """conv2d_fused(out=) runs below the custom op's ADInplaceOrView wrapper when no gradient
    is in play (`run_out_op`): out's version still advances, so autograd still rejects a
    backward through a value it overwrote, and dispatch modes still see the op."""
    x = torch.randn(2, 8, 5, 5, device=device).contiguous(memory_format=CL)
    weight = torch.randn(4, 8, 1, 1, device=device)
    out = torch.empty(2, 4, 5, 5, device=device).contiguous(memory_format=CL)
    version = out._version
    with OpRecorder() as recorder:
        conv2d_fused(x, arrange_weight(weight), out=out)
    assert out._version > version
    assert "fastres.conv2d_fused_out.default" in recorder.ops
    torch.testing.assert_close(out, reference(x, weight))
    product = torch.randn(2, 4, 5, 5, device=device, requires_grad=True).exp()  # saved
    with torch.no_grad():
        conv2d_fused(x, arrange_weight(weight), out=product)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_output_rounds_to_nearest(device, dtype):
    """Products of two 8-bit mantissas are exact in fp32: the stored output must be their
    round-to-nearest-even value, not a truncation (whose bias compounds over a network)."""
    x = torch.randn(2, 1, 8, 8, device=device).to(dtype).contiguous(memory_format=CL)
    weight = torch.randn(16, 1, 1, 1, device=device).to(dtype)
    out = conv2d_fused(x, weight)
    exact = (x.double() * weight.double().view(1, -1, 1, 1)).to(dtype)
    torch.testing.assert_close(out, exact, rtol=0, atol=0)


def test_out_must_not_alias_input(device):
    x = torch.randn(1, 8, 4, 4, device=device).contiguous(memory_format=CL)
    weight = torch.randn(8, 8, 1, 1, device=device)
    with pytest.raises(ValueError, match="share memory"):
        conv2d_fused(x, weight, out=x)


GRAD_CASES = {
    "bias-relu": dict(bias=True, relu=True),
    "bias-add-relu": dict(bias=True, residual=True, relu=True),
    "addbn-relu": dict(bias=True, residual=True, residual_affine=True, relu=True),
    "bnrelu-prologue": dict(input_affine=True, input_relu=True, bias=True),
    "avgpool": dict(input_pool=2, bias=True),
    "bnrelu-avgpool": dict(input_affine=True, input_relu=True, input_pool=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients(device, case, dtype):
    """Every input's gradient through the custom op's backward against the oracle's autograd."""
    f64 = dict(dtype=torch.float64, device=device)
    n, c_in, c_out, h, w = 2, 12, 20, 5, 7
    pool = case.get("input_pool", 1)
    oh, ow = -(-h // pool), -(-w // pool)
    k = 1 if pool > 1 else 3
    leaves = {
        "x": torch.randn(n, c_in, h, w, **f64),
        "weight": torch.randn(c_out, c_in, k, k, **f64) / 8,
    }
    if case.get("bias"):
        leaves["bias"] = torch.randn(c_out, **f64)
    if case.get("residual"):
        leaves["residual"] = torch.randn(n, c_out, oh, ow, **f64)
    if case.get("residual_affine"):
        leaves["residual_scale"] = torch.rand(c_out, **f64) + 0.5
        leaves["residual_shift"] = torch.randn(c_out, **f64)
    if case.get("input_affine"):
        scale, shift = torch.rand(c_in, **f64) + 0.5, torch.randn(c_in, **f64)
        leaves["input_scale"], leaves["input_shift"] = scale, shift
        # Keep the normalized input away from the ReLU's kink, where rounding x to the working
        # dtype could flip which side an element falls on and with it its whole gradient.
        u = torch.randn(n, c_in, h, w, **f64)
        u = u.sign() * (u.abs() + 0.25)
        leaves["x"] = (u - shift.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)
    options = dict(
        padding=(k - 1) // 2,
        relu=case.get("relu", False),
        input_relu=case.get("input_relu", False),
        input_pool=pool,
    )
    grad_out = torch.randn(n, c_out, oh, ow, **f64)
    if options["relu"]:
        # No gradient where the output sits at the ReLU's kink: which side rounding puts an
        # element on is arbitrary there, and flips would dominate the comparison.
        args = {k: v for k, v in leaves.items() if k not in ("x", "weight")}
        z = reference(leaves["x"], leaves["weight"], **args, **{**options, "relu": False})
        grad_out[z.abs() < 0.05 * z.abs().max()] = 0
    vectors = ("bias", "residual_scale", "residual_shift", "input_scale", "input_shift")

    def run(fn, cast, vector_cast):
        args = {
            name: (vector_cast(t) if name in vectors else cast(t)).detach().requires_grad_()
            for name, t in leaves.items()
        }
        x, weight = args.pop("x"), args.pop("weight")
        y = fn(x, weight, **args, **options)
        y.backward(cast(grad_out))
        return y, {"x": x.grad, "weight": weight.grad, **{k: v.grad for k, v in args.items()}}

    low = lambda t: t.to(dtype)
    fused = lambda x, weight, **kw: conv2d_fused(x, arrange_weight(weight), **kw)
    y, grads = run(fused, low, lambda t: t.float())
    y_gold, grads_gold = run(reference, lambda t: t, lambda t: t)
    y_base, grads_base = run(reference, low, low)
    assert_matches_oracle(y, y_base, y_gold, dtype, "out")
    for name in grads_gold:
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_matches_oracle(grads[name], grads_base[name], grads_gold[name], dtype, f"d{name}")


def test_empty_batch(device):
    x = torch.randn(0, 8, 5, 5, device=device)
    weight = torch.randn(16, 8, 3, 3, device=device)
    out = conv2d_fused(x, weight, padding=1, stride=2)
    assert out.shape == (0, 16, 3, 3)


def test_bad_inputs(device):
    x = torch.randn(1, 8, 5, 5, device=device)
    with pytest.raises(ValueError, match="input channels"):
        conv2d_fused(x, torch.randn(4, 6, 1, 1, device=device))
    with pytest.raises(TypeError, match="dtype"):
        conv2d_fused(x, torch.randn(4, 8, 1, 1, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="bias"):
        conv2d_fused(x, torch.randn(4, 8, 1, 1, device=device), torch.randn(5, device=device))
    with pytest.raises(ValueError, match="too small"):
        conv2d_fused(x, torch.randn(4, 8, 7, 7, device=device))
    with pytest.raises(ValueError, match="residual"):
        conv2d_fused(x, torch.randn(4, 8, 1, 1, device=device), residual=torch.randn(1, 4, 4, 4))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(conv2d_fused_module, "INTERPRET", False)  # TRITON_INTERPRET=0 at import
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conv2d_fused(x, torch.randn(8, 8, 1, 1))


def test_opcheck(device):
    """Schema, fake implementation and autograd registration are consistent (torch.library)."""
    x = torch.randn(2, 8, 5, 5, device=device).contiguous(memory_format=CL)
    weight = arrange_weight(torch.randn(12, 8, 3, 3, device=device)).requires_grad_()
    bias = torch.randn(12, device=device, requires_grad=True)
    residual = torch.randn(2, 12, 5, 5, device=device)
    args = ConvArgs(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, False, residual, relu=True)
    torch.library.opcheck(
        torch.ops.fastres.conv2d_fused.default,
        (*args, False),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    out = torch.empty(2, 12, 5, 5, device=device).contiguous(memory_format=CL)
    torch.library.opcheck(
        torch.ops.fastres.conv2d_fused_out.default,
        (*args._replace(weight=weight.detach(), bias=bias.detach()), out),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_kernel_names():
    """Profiler timelines name each specialization by its fusions."""

    def name(**constants):
        return conv2d_fused_name(SimpleNamespace(constants=constants, signature={}))

    assert name(KH=3, KW=3, HAS_BIAS=1, RELU=1) == "fastres_conv3x3_bias_relu"
    assert name(KH=1, KW=1, HAS_BIAS=1, RESIDUAL=1, RELU=1) == "fastres_conv1x1_bias_add_relu"
    assert name(KH=1, KW=1, POOL=2, HAS_BIAS=1) == "fastres_avgpool2_conv1x1_bias"
    assert name(KH=1, KW=1, IN_AFFINE=1, IN_RELU=1, STATS=1) == "fastres_bnrelu_conv1x1_stats"
    assert name(KH=7, KW=7, HAS_BIAS=1, RESIDUAL=1, RES_AFFINE=1) == "fastres_conv7x7_bias_addbn"


@pytest.mark.cuda
def test_int64_offsets_cuda():
    """An activation of more than 2**31 elements is addressed without overflow (CUDA only)."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    x = torch.empty(1, 16, 11600, 11600, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=CL)
    assert x.numel() > 2**31
    x.normal_()
    weight = (torch.randn(16, 16, 1, 1, device="cuda") / 4).to(torch.bfloat16)
    out = conv2d_fused(x, arrange_weight(weight))
    tail = x[:, :, -4:, -4:].double()
    gold = F.conv2d(tail, weight.double())
    base = F.conv2d(x[:, :, -4:, -4:], weight)
    assert_matches_oracle(out[:, :, -4:, -4:], base, gold, torch.bfloat16, "last pixels")


# Specializations the backend and the later training path launch: (dtype, constexprs).
HOPPER_CASES = [
    ("bf16", dict(KH=1, KW=1, HAS_BIAS=1, RESIDUAL=1, RELU=1)),
    ("bf16", dict(KH=3, KW=3, HAS_BIAS=1, RELU=1)),
    ("bf16", dict(KH=3, KW=3, IN_ADD=1, HAS_BIAS=1, RELU=1)),
    ("bf16", dict(KH=7, KW=7, HAS_BIAS=1, RELU=1, FLAT_K=1)),
    ("bf16", dict(KH=1, KW=1, HAS_BIAS=1, POOL=2)),
    ("bf16", dict(KH=3, KW=3, IN_AFFINE=1, IN_RELU=1, STATS=1)),
    ("bf16", dict(KH=1, KW=1, HAS_BIAS=1, RESIDUAL=1, RES_AFFINE=1, RELU=1)),
    ("fp16", dict(KH=3, KW=3, HAS_BIAS=1, RELU=1)),
    ("fp32", dict(KH=3, KW=3, HAS_BIAS=1, RELU=1, DOT_PRECISION="tf32")),
    ("fp32", dict(KH=1, KW=1, HAS_BIAS=1, RESIDUAL=1, DOT_PRECISION="ieee")),
]


def compile_for_hopper() -> list[str]:
    """Compiles HOPPER_CASES to sm_90 cubins (Triton's own ptxas, no GPU needed).

    Arguments get what the JIT infers at a ResNet launch: channel strides of 1, 16-divisible
    pointers, channel counts and other strides. Returns 'name shared=<bytes> pipelined=<bool>'.
    """
    import triton.language as tl
    from fastres.kernels.conv2d_fused import conv2d_fused_kernel as kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    optional = {
        "bias_ptr": "HAS_BIAS", "res_ptr": "RESIDUAL", "res_scale_ptr": "RES_AFFINE",
        "in_scale_ptr": "IN_AFFINE", "in_shift_ptr": "IN_AFFINE", "tile_sum_ptr": "STATS",
        "tile_m2_ptr": "STATS", "res_shift_ptr": "RES_AFFINE", "x2_ptr": "IN_ADD",
    }  # fmt: skip
    unit_strides = ("stride_x_c", "stride_x2_c", "stride_w_o", "stride_res_c", "stride_out_c")
    reports = []
    for dtype, switches in HOPPER_CASES:
        constexprs = dict(
            POOL=1, IN_AFFINE=0, IN_RELU=0, IN_ADD=0, HAS_BIAS=0, RESIDUAL=0, RES_AFFINE=0,
            RELU=0, STATS=0, DOT_PRECISION="native", ACC=tl.float32, EMULATE_RTNE=0, FLAT_K=0,
            BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if dtype == "fp32" else 64, GROUP_M=8,
        )  # fmt: skip
        constexprs.update(switches)
        signature, attrs = {}, {}
        for i, name in enumerate(names):
            if name in constexprs or name in unit_strides:
                constexprs.setdefault(name, 1)
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                flag = optional.get(name)
                if flag is not None and not constexprs[flag]:
                    signature[name], constexprs[name] = "constexpr", None
                    continue
                is_activation = name in ("x_ptr", "x2_ptr", "w_ptr", "res_ptr", "out_ptr")
                signature[name] = "*" + (dtype if is_activation else "fp32")
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "i32"
                if name.startswith("stride_") or name in ("C_in", "C_out"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}
        )
        pipelined = "async_copy_global_to_local" in compiled.asm["ttgir"]
        reports.append(f"{compiled.name} shared={compiled.metadata.shared} pipelined={pipelined}")
    return reports


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the real kernel")
def test_compiles_for_hopper():
    """Without a GPU the interpreter never sees Triton's compiler: compile the real kernel for
    sm_90 (in a subprocess, without TRITON_INTERPRET) so typing and layout errors surface here."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = result.stdout.split("\n")
    names = [r.split()[0] for r in reports if r]
    assert len(names) == len(HOPPER_CASES)
    assert {"fastres_conv1x1_bias_add_relu", "fastres_avgpool2_conv1x1_bias"} <= set(names)
    # The gathered A tiles and the weight tiles are loaded asynchronously, several stages ahead.
    assert all("pipelined=True" in r for r in reports if r), reports


if __name__ == "__main__":
    print("\n".join(compile_for_hopper()))
