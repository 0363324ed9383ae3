"""`fastres::conv2d_bn_train` (the training convolution) against the oracle, one feature at a time.

The op's output and statistics against PyTorch in float64 (the interpreter runs the kernel in
float64), gradcheck of its backward in float64 with the input BatchNorm's batch statistics
recomputed from the perturbed input (so the numerical gradient sees the statistics' terms that
the analytic BN backward holds), and opcheck. The whole-model training path is
tests/test_triton_training.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastres.extension import EXTENSION_ERROR
from fastres.ops.batchnorm_reference import bn_stats
from fastres.ops.conv2d_bn_train import InputBN, conv2d_bn_train
from fastres.ops.conv2d_fused import arrange_weight, interpreting
from fastres.testing import assert_matches_oracle

pytest.importorskip("triton")
pytestmark = [
    pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR)),
    pytest.mark.skipif(
        not (interpreting() or torch.cuda.is_available()),
        reason="needs a GPU or TRITON_INTERPRET=1",
    ),
]

EPS = 1e-5
# (feature, C_in, C_out, kernel, stride, padding, dilation): the prologue each block uses.
CASES = {
    "bn_relu-3x3": ("input_bn", 5, 6, 3, 1, 1, 1),
    "bn_relu-3x3-stride2-dilated": ("input_bn", 4, 3, 3, 2, 2, 2),
    "bn_relu-1x1": ("input_bn", 6, 7, 1, 1, 0, 1),
    "plain-7x7-stride2": ("plain", 3, 4, 7, 2, 3, 1),
    "avgpool2-1x1": ("input_pool", 5, 4, 1, 1, 0, 1),
    "add-3x3": ("input_add", 4, 4, 3, 1, 1, 1),
}


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, M2, count) of x [N, C, H, W] per channel, constants to autograd."""
    return *bn_stats(x.detach()), x.numel() // x.shape[1]


def reference(feature, x, weight, bn_weight, bn_bias, add, stride, padding, dilation):
    """conv2d(prologue(x)) in PyTorch, the BN with batch statistics."""
    if feature == "input_bn":
        x = torch.relu(F.batch_norm(x, None, None, bn_weight, bn_bias, True, 0.0, EPS))
    elif feature == "input_pool":
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    elif feature == "input_add":
        x = x + add
    return F.conv2d(x, weight, None, stride, padding, dilation)


def fused(feature, x, weight, bn_weight, bn_bias, add, stride, padding, dilation):
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    if feature == "input_bn":
        kwargs["input_bn"] = InputBN(*batch_stats(x), bn_weight, bn_bias, EPS)
    elif feature == "input_pool":
        kwargs["input_pool"] = 2
    elif feature == "input_add":
        kwargs["input_add"] = add
    return conv2d_bn_train(x, arrange_weight(weight), **kwargs)


def make_inputs(case, dtype, device, requires_grad=False, size=(7, 6)):
    _, c_in, c_out, k, *_ = case
    f64 = dict(dtype=torch.float64, device=device)
    tensors = [
        torch.randn(2, c_in, *size, **f64),
        torch.randn(c_out, c_in, k, k, **f64) / (k * c_in**0.5),
        torch.rand(c_in, **f64) + 0.5,
        torch.randn(c_in, **f64),
        torch.randn(2, c_in, *size, **f64),
    ]
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("name", CASES)
def test_output_and_statistics_match_oracle(device, name):
    case = CASES[name]
    feature, *_, stride, padding, dilation = case
    geometry = (stride, padding, dilation)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    gold_inputs = make_inputs(case, torch.float64, device)
    gold = reference(feature, *gold_inputs, *geometry)
    base = reference(feature, *[t.to(dtype) for t in gold_inputs], *geometry)
    # BN parameters stay fp32 (fp64 in float64), as the backend passes them.
    y, mean, m2 = fused(feature, *[t.to(dtype) for t in gold_inputs], *geometry)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    assert_matches_oracle(y, base, gold, dtype, "output")
    gold_mean, gold_m2, _ = batch_stats(gold)
    base_mean, base_m2, _ = batch_stats(base)
    assert_matches_oracle(mean, base_mean, gold_mean, dtype, "mean")
    assert_matches_oracle(m2, base_m2, gold_m2, dtype, "m2")


@pytest.mark.parametrize("name", ["bn_relu-3x3-stride2-dilated", "avgpool2-1x1", "add-3x3"])
def test_gradcheck_float64(name):
    """The backward (PyTorch's conv backward on the recomputed prologue + the extension's BN
    backward) against numerical gradients, in float64 through the interpreter."""
    if not interpreting():
        pytest.skip("float64 runs through the kernels only under the interpreter")
    case = CASES[name]
    feature, *_, stride, padding, dilation = case
    inputs = make_inputs(case, torch.float64, torch.device("cpu"), True, size=(5, 4))

    def f(x, weight, bn_weight, bn_bias, add):
        return fused(feature, x, weight, bn_weight, bn_bias, add, stride, padding, dilation)[0]

    # fast_mode: a random projection of the Jacobian (each interpreted launch is slow).
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, weight, bn_weight, bn_bias, _ = make_inputs(CASES["bn_relu-3x3"], dtype, device, True)
    mean, m2, count = batch_stats(x)
    args = (
        x, arrange_weight(weight), [1, 1], [1, 1], [1, 1], 1, False, 1, None,
        mean, m2, count, bn_weight, bn_bias, EPS, "",
    )  # fmt: skip
    torch.library.opcheck(torch.ops.fastres.conv2d_bn_train.default, args)


def test_bad_input_bn():
    x, weight, bn_weight, bn_bias, add = make_inputs(CASES["bn_relu-3x3"], torch.float32, "cpu")
    mean, m2, count = batch_stats(x)
    with pytest.raises(ValueError, match=r"input_bn.mean must have shape \[5\]"):
        conv2d_bn_train(x, weight, input_bn=InputBN(mean[:3], m2, count, bn_weight, bn_bias, EPS))
    with pytest.raises(ValueError, match="input_bn cannot be combined"):
        conv2d_bn_train(
            x, weight, input_bn=InputBN(mean, m2, count, bn_weight, bn_bias, EPS), input_add=add
        )
