"""`fastres::conv2d_bn_train` (the training convolution) against the oracle, one feature at a time.

The op's output and statistics against PyTorch in float64 (the interpreter runs the kernel in
float64), gradcheck of its backward in float64 with the input BatchNorm's batch statistics
recomputed from the perturbed input (so the numerical gradient sees the statistics' terms that
the analytic BN backward holds), and opcheck. The whole-model training path is
tests/test_triton_training.py. The output BatchNorm finalized in the statistics' merge launch
(`output_bn`) against the extension's finalize and nn.BatchNorm2d's running statistics.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from fastres.extension import EXTENSION_ERROR
from fastres.ops.batchnorm import batch_normalized
from fastres.ops.batchnorm_reference import bn_stats
from fastres.ops.conv2d_bn_train import InputBN, OutputBN, conv2d_bn_train
from fastres.ops.conv2d_fused import arrange_weight, interpreting
from fastres.testing import OpRecorder, assert_matches_oracle

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


def _output_bn_case(device, dtype, track: bool = True):
    """x, a conv weight and a BatchNorm of the conv's output (random parameters and running
    statistics), with its twin for the separate finalize."""
    x, weight, *_ = make_inputs(CASES["bn_relu-3x3"], dtype, device)
    bn = torch.nn.BatchNorm2d(6, momentum=0.3, track_running_stats=track).to(device, dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        if track:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
    return x, arrange_weight(weight), bn, copy.deepcopy(bn)


def _run_output_bn(x, weight, bn, path):
    """conv2d_bn_train with bn as its output BN, on `path`: 'grad' (the autograd Function),
    'no_grad' (the body), 'dispatch' (under a dispatch mode: the op, then the finalize op)."""
    output_bn = OutputBN.of(bn)
    with torch.set_grad_enabled(path == "grad"), contextlib.ExitStack() as stack:
        if path == "dispatch":
            recorder = stack.enter_context(OpRecorder())
        outputs = conv2d_bn_train(x, weight, padding=1, output_bn=output_bn)
    if path == "dispatch":
        assert "fastres.bn_finalize_update.default" in recorder.ops or not bn.track_running_stats
    return outputs


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("path", ["grad", "no_grad", "dispatch"])
def test_output_bn_matches_separate_finalize(device, path, track, monkeypatch):
    """With output_bn, the BN's scale / shift / invstd and running statistics equal the
    extension's finalize of the op's statistics (`batch_normalized`, what the backend ran
    before), and where the body runs directly no finalize op runs (the merge's launch did it)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, weight, bn, twin = _output_bn_case(device, dtype, track)
    x.requires_grad_(path == "grad")
    if path != "dispatch":
        monkeypatch.setattr(OutputBN, "finalize", None)  # the fused launch, or a TypeError
    y, mean, m2, *coefficients = _run_output_bn(x, weight, bn, path)
    y_twin, mean_twin, m2_twin = conv2d_bn_train(x, weight, padding=1)
    twin_norm = batch_normalized(twin, mean_twin, m2_twin, y_twin.numel() // 6)
    torch.testing.assert_close(y, y_twin, rtol=0, atol=0)
    for got, want in zip((mean, m2, *coefficients), (mean_twin, m2_twin, *twin_norm[3:])):
        torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
    assert not any(t.requires_grad for t in (mean, m2, *coefficients))
    assert (y.requires_grad, y.grad_fn is not None) == (path == "grad",) * 2
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        got, want = getattr(bn, name), getattr(twin, name)
        assert (got is None) == (want is None) == (not track)
        if track:
            torch.testing.assert_close(got, want, rtol=2e-7, atol=1e-7)
    if track:
        assert bn.num_batches_tracked.item() == 1


def test_output_bn_running_statistics_match_batchnorm():
    """The fused finalize's running statistics against nn.BatchNorm2d's training forward on
    the oracle's convolution output, in float64 (the interpreter's float64 kernels)."""
    if not interpreting():
        pytest.skip("float64 runs through the kernels only under the interpreter")
    x, weight, bn, oracle_bn = _output_bn_case(torch.device("cpu"), torch.float64)
    for _ in range(2):  # the second update starts from the first's
        y, *_ = conv2d_bn_train(x, weight, padding=1, output_bn=OutputBN.of(bn))
        oracle_bn(F.conv2d(x, weight, padding=1))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(oracle_bn, name))


def test_output_bn_where_the_launch_cannot_finalize(device):
    """No OutputBN for the cumulative average (its factor reads num_batches_tracked); a BN whose
    tensors the launch cannot take as they are runs the extension's finalize, which raises for
    what it cannot take either; one value per channel raises before any running statistic
    changes."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    x, weight, bn, twin = _output_bn_case(device, dtype)
    bn.momentum = None
    assert OutputBN.of(bn) is None
    bn.momentum = twin.momentum = 0.3
    strided = torch.randn(12, device=device, dtype=dtype)[::2]
    output_bn = OutputBN.of(bn)._replace(weight=strided)
    _, _, _, scale, *_ = conv2d_bn_train(x, weight, padding=1, output_bn=output_bn)
    _, mean, m2 = conv2d_bn_train(x, weight, padding=1)
    with torch.no_grad():
        twin.weight.copy_(strided)
    expected = batch_normalized(twin, mean, m2, x.numel() // x.shape[1])
    torch.testing.assert_close(scale, expected.scale)
    with pytest.raises(RuntimeError, match="running statistics must be contiguous floating"):
        short = OutputBN.of(bn)._replace(running_mean=bn.running_mean[:3])
        conv2d_bn_train(x, weight, padding=1, output_bn=short)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv2d_bn_train(x[:1, :, :1, :1], weight, padding=1, output_bn=OutputBN.of(bn))
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name
