"""`fastres::bn_fold` (a frozen BatchNorm folded into its convolution, with gradients) against
the oracle: conv -> eval-mode BN run as `conv2d_fused(x, *bn_fold(...))`, its output and
the gradients of the input, the conv weight and bias, and the BN weight and bias against
PyTorch's modules in float64 (gold) and float32 (base), under the contract's rule. No ReLU:
a float32 output within rounding of its kink would move a gradient element by a whole one. The
whole-model path (norm_eval training on the triton backend) is tests/test_triton_backend.py's
`test_bn_eval_training_gradients`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastres.ops.conv2d_fused import conv2d_fused, interpreting
from fastres.testing import assert_matches_oracle

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1"
)

# (conv bias, BN affine, weight layout[, C_in]): C_in 5 folds into the flat-K layout (C_out
# innermost), 20 into channels_last (`arrange_weight`).
CASES = {
    "plain": (False, True, torch.contiguous_format),
    "channels_last-weight": (False, True, torch.channels_last),
    "wide": (True, True, torch.contiguous_format, 20),
    "wide-channels_last-weight": (False, True, torch.channels_last, 20),
    "conv-bias": (True, True, torch.contiguous_format),
    "no-affine": (True, False, torch.channels_last),
    # Neither a conv bias nor BN weight: two empty gradients, which must not alias.
    "no-bias-no-affine": (False, False, torch.contiguous_format),
}


def _unit(conv_bias: bool, affine: bool, layout, device, c_in: int = 5) -> nn.Sequential:
    """conv 3x3 (C_in -> C_out 6) + BN (eval, random statistics and parameters)."""
    conv = nn.Conv2d(c_in, 6, 3, padding=1, bias=conv_bias)
    bn = nn.BatchNorm2d(6, affine=affine).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if affine:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias)
    return nn.Sequential(conv, bn).to(device).to(memory_format=layout)


def _step(unit: nn.Sequential, x: torch.Tensor, grad: torch.Tensor, fused: bool):
    """(output, gradients of x and of every parameter) of one forward and backward."""
    from fastres.ops.bn_fold import bn_fold

    x = x.detach().requires_grad_()
    conv, bn = unit
    if fused:
        weight, bias = bn_fold(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
            bn.eps, x.dtype,
        )  # fmt: skip
        out = conv2d_fused(x, weight, bias, padding=1)
    else:
        out = unit(x)
    grads = torch.autograd.grad(out, [x, *unit.parameters()], grad.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bn_fold_gradients_match_oracle(device, case):
    dtype = torch.float32
    unit = _unit(*case[:3], device, *case[3:])
    x = torch.randn(2, unit[0].in_channels, 6, 7, device=device)
    grad = torch.randn(2, 6, 6, 7, device=device, dtype=torch.float64)
    gold = _step(copy.deepcopy(unit).double(), x.double(), grad, fused=False)
    base = _step(unit, x, grad, fused=False)
    fused = _step(unit, x, grad, fused=True)
    names = ["output", "grad x", *(f"grad {n}" for n, _ in unit.named_parameters())]
    actual = [fused[0], *fused[1]]
    for name, a, b, g in zip(names, actual, [base[0], *base[1]], [gold[0], *gold[1]], strict=True):
        assert a.dtype == b.dtype, name
        assert_matches_oracle(a, b, g, dtype, name)


# (CASES key, residual, input_pool)
ONE_NODE_CASES = {
    "plain": ("plain", False, 1),
    "conv-bias-residual": ("conv-bias", True, 1),
    "wide-pooled": ("wide-channels_last-weight", False, 2),
    "no-affine-residual-pooled": ("no-affine", True, 2),
}


@pytest.mark.parametrize("case", ONE_NODE_CASES.values(), ids=ONE_NODE_CASES.keys())
def test_folded_conv2d_matches_oracle(device, case):
    """`folded_conv2d` (fold and convolution as one autograd node, the triton backend's
    BN-frozen training unit): output and the gradients of x, the residual and every parameter
    as PyTorch's conv -> BN (-> + residual) on the avg_down-pooled input."""
    from fastres.ops.bn_fold import folded_conv2d

    name, with_residual, pool = case
    dtype = torch.float32
    unit = _unit(*CASES[name][:3], device, *CASES[name][3:])
    x = torch.randn(2, unit[0].in_channels, 6, 7, device=device)
    oh, ow = -(-6 // pool), -(-7 // pool)
    residual = torch.randn(2, 6, oh, ow, device=device) if with_residual else None
    grad = torch.randn(2, 6, oh, ow, device=device, dtype=torch.float64)

    def step(unit, dtype, fused):
        xi = x.to(dtype).requires_grad_()
        res = None if residual is None else residual.to(dtype).requires_grad_()
        conv, bn = unit
        if fused:
            out = folded_conv2d(
                xi, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                bn.running_var, bn.eps, stride=1, padding=1, dilation=1, residual=res,
                input_pool=pool,
            )  # fmt: skip
        else:
            pooled = xi
            if pool > 1:
                pooled = nn.functional.avg_pool2d(
                    xi, pool, pool, ceil_mode=True, count_include_pad=False
                )
            out = unit(pooled) + (0 if res is None else res)
        leaves = [xi, *([] if res is None else [res]), *unit.parameters()]
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    gold = step(copy.deepcopy(unit).double(), torch.float64, False)
    base = step(unit, dtype, False)
    fused = step(unit, dtype, True)
    names = ["output", "grad x", *(["grad residual"] if with_residual else [])]
    names += [f"grad {n}" for n, _ in unit.named_parameters()]
    for name, a, b, g in zip(names, fused, base, gold, strict=True):
        assert a.dtype == b.dtype, name
        assert_matches_oracle(a, b, g, dtype, name)


@pytest.mark.parametrize("c_in", [5, 20])
def test_bn_fold_layout_and_dtypes(c_in):
    """The folded weight is in the kernels' dtype and arranged (`arrange_weight`'s layout:
    channels_last from 16 input channels), the bias in fp32; gradients come back in each
    parameter's dtype."""
    from fastres.ops.bn_fold import bn_fold
    from fastres.ops.conv2d_fused import arrange_weight

    conv, bn = _unit(False, True, torch.channels_last, "cpu", c_in)
    weight, bias = bn_fold(
        conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
        torch.bfloat16,
    )  # fmt: skip
    assert weight.dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert weight.stride() == arrange_weight(conv.weight.detach(), torch.bfloat16).stride()
    assert weight.is_contiguous(memory_format=torch.channels_last) == (c_in >= 16)
    (weight.float().sum() + bias.sum()).backward()
    assert [p.grad.dtype for p in (conv.weight, bn.weight, bn.bias)] == [torch.float32] * 3
    assert conv.weight.grad.shape == conv.weight.shape


def test_opcheck():
    """The fake implementations match the ops (torch.compile traces them through those)."""
    conv, bn = _unit(True, True, torch.channels_last, "cpu")
    with torch.no_grad():
        fold_args = (
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            torch.bfloat16,
        )  # fmt: skip
        grad_w = torch.randn(conv.weight.shape, dtype=torch.bfloat16)
        backward_args = (
            grad_w, torch.randn(6), conv.weight, conv.bias, bn.weight, bn.running_mean,
            bn.running_var, bn.eps,
        )  # fmt: skip
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fastres.bn_fold.default, fold_args, test_utils=checks)
    torch.library.opcheck(
        torch.ops.fastres.bn_fold_backward.default, backward_args, test_utils=checks
    )


def test_strided_channel_vectors_raise():
    """The kernels read per-channel vectors at unit stride: a strided one (a view of every
    other element) raises instead of folding the wrong values."""
    from fastres.ops.bn_fold import bn_fold

    weight = torch.randn(6, 5, 3, 3)
    vectors = [torch.randn(6), torch.randn(6), torch.rand(6) + 0.5]
    bn_fold(weight, None, *vectors[:2], vectors[0], vectors[2], 1e-5, torch.float32)
    strided_var = (torch.rand(12) + 0.5)[::2]
    with pytest.raises(ValueError, match="must be contiguous"):
        bn_fold(weight, None, *vectors[:2], vectors[0], strided_var, 1e-5, torch.float32)


def test_expanded_bias_gradient():
    """A folded-bias gradient that autograd hands over expanded (stride 0, from `bias.sum()`)
    reaches the conv bias as a materialized one does: the kernel reads it at unit stride, and
    used to read past the one stored element."""
    from fastres.ops.bn_fold import bn_fold

    conv, bn = _unit(True, True, torch.contiguous_format, "cpu")

    def conv_bias_grad(loss_of_bias) -> torch.Tensor:
        conv.bias.grad = None
        _, bias = bn_fold(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
            torch.float32,
        )  # fmt: skip
        loss_of_bias(bias).backward()
        return conv.bias.grad

    expanded = conv_bias_grad(lambda b: b.sum())
    materialized = conv_bias_grad(lambda b: (b * torch.ones_like(b)).sum())
    assert torch.equal(expanded, materialized)
    assert torch.allclose(expanded, (bn.weight * torch.rsqrt(bn.running_var + bn.eps)).detach())
