"""The fused BatchNorm ops (`fastres::bn_*`) against their pure-torch reference.

Gold is the reference in float64, base the reference in the working dtype (docs/contract.md §3).
"""

from __future__ import annotations

import pytest
import torch

from fastres.extension import EXTENSION_ERROR, cuda_kernels_built
from fastres.ops import batchnorm as bn_ops
from fastres.ops import batchnorm_reference as ref
from fastres.ops.precision import accumulator_dtype
from fastres.testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

SHAPES = {
    "odd-3ch": (2, 3, 5, 7),
    "res2net-26ch": (2, 26, 6, 6),
    "1x1-spatial": (4, 64, 1, 1),
    "stride2-56ch": (3, 56, 9, 4),
    "wide-260ch": (2, 260, 3, 3),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# residual: none, added as is, or through a second BN (scale_r / shift_r)
TAILS = ["plain", "residual", "two_bn"]


def _rand(shape, dtype, layout, device="cpu", scale=1.0, offset=0.0):
    x = torch.randn(shape, dtype=torch.float64, device=device) * scale + offset
    return x.to(dtype).contiguous(memory_format=layout)


def _channel(c, kind, device="cpu"):
    if kind == "scale":
        return torch.rand(c, dtype=torch.float64, device=device) * 1.5 + 0.25
    return torch.randn(c, dtype=torch.float64, device=device) * 0.5


def _check(actual, base, gold, dtype, name):
    if isinstance(actual, tuple):
        for i, (a, b, g) in enumerate(zip(actual, base, gold, strict=True)):
            _check(a, b, g, dtype, f"{name}[{i}]")
        return
    assert actual.dtype == base.dtype, f"{name}: dtype {actual.dtype} != {base.dtype}"
    assert actual.shape == base.shape
    assert_matches_oracle(actual, base, gold, dtype, name)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def _per_channel(args, acc):
    """Per-channel tensors in the ops' accumulation dtype, element-wise ones as they are."""
    return tuple(a.to(acc) if isinstance(a, torch.Tensor) and a.dim() == 1 else a for a in args)


def _compare(op_name, args, dtype):
    """Runs op and reference on args (element-wise tensors in `dtype`), checks the rule of
    docs/contract.md §3."""
    op = getattr(bn_ops, op_name)
    reference = getattr(ref, op_name)
    args = _per_channel(args, torch.float32)
    actual = op(*args)
    base = reference(*args)
    gold = reference(*_f64(args))
    _check(actual, base, gold, dtype, op_name)
    return actual


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_stats(shape, dtype, layout):
    # An offset much larger than the spread: a naive sum-of-squares variance would fail here.
    x = _rand(shape, dtype, layout, scale=0.5, offset=20.0)
    mean, m2 = _compare("bn_stats", (x,), dtype)
    assert mean.dtype == torch.float32 and m2.shape == (shape[1],)


def test_stats_float64_matches_torch_var():
    x = _rand((3, 17, 5, 4), torch.float64, torch.channels_last, offset=3.0)
    mean, m2 = bn_ops.bn_stats(x)
    count = x.numel() // x.shape[1]
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(m2 / count, x.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=0)


def test_finalize():
    c = 37
    mean = torch.randn(c)
    m2 = torch.rand(c) * 50 + 0.1
    weight, bias = _channel(c, "scale").float(), _channel(c, "shift").float()
    for w, b in ((weight, bias), (None, None)):
        _compare("bn_finalize", (mean, m2, 40, w, b, 1e-5), torch.float32)


def _tail_args(shape, dtype, layout, tail):
    c = shape[1]
    x = _rand(shape, dtype, layout)
    residual = _rand(shape, dtype, layout) if tail != "plain" else None
    scale_r = _channel(c, "scale") if tail == "two_bn" else None
    shift_r = _channel(c, "shift") if tail == "two_bn" else None
    return x, _channel(c, "scale"), _channel(c, "shift"), residual, scale_r, shift_r


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_apply(shape, dtype, layout, tail, relu):
    args = _tail_args(shape, dtype, layout, tail)
    out = _compare("bn_apply", (*args, relu), dtype)
    assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("train", [True, False], ids=["train_bn", "eval_bn"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_backward(shape, dtype, layout, tail, train):
    x, scale, shift, residual, scale_r, shift_r = _tail_args(shape, dtype, layout, tail)
    grad = _rand(shape, dtype, layout)
    c = shape[1]
    count = x.numel() // c
    mean = _channel(c, "shift") if train else None
    mean_r = _channel(c, "shift") if train and tail == "two_bn" else None
    reduced = _compare(
        "bn_backward_reduce",
        (grad, x, scale, shift, residual, scale_r, shift_r, True, mean, mean_r),
        dtype,
    )
    assert reduced[2].numel() == (c if tail == "two_bn" else 0)
    # The element-wise pass, fed with float64 reductions so that only it is under test.
    sum_dy, sum_dy_xmu, sum_dy_rmu = ref.bn_backward_reduce(
        *_f64((grad, x, scale, shift, residual, scale_r, shift_r, True, mean, mean_r))
    )
    invstd = _channel(c, "scale") if train else None
    invstd_r = _channel(c, "scale") if mean_r is not None else None
    grads = _compare(
        "bn_backward_elemt",
        (
            grad, x, scale, shift, residual, scale_r, shift_r, True,
            mean, invstd, sum_dy if train else None, sum_dy_xmu if train else None,
            mean_r, invstd_r, sum_dy_rmu if mean_r is not None else None,
            count, residual is not None,
        ),
        dtype,
    )  # fmt: skip
    assert grads[1].numel() == (0 if residual is None else x.numel())


def _opcheck_cases():
    shape, c = (2, 6, 3, 4), 6
    for layout in LAYOUTS.values():
        x, scale, shift, residual, scale_r, shift_r = _tail_args(
            shape, torch.float32, layout, "two_bn"
        )
        scale, shift, scale_r, shift_r = (t.float() for t in (scale, shift, scale_r, shift_r))
        grad = _rand(shape, torch.float32, layout)
        vec = lambda: torch.randn(c)
        yield "bn_stats", (x,)
        yield "bn_finalize", (vec(), vec().abs() + 1, 24, vec(), vec(), 1e-5)
        yield "bn_apply", (x, scale, shift, None, None, None, True)
        yield "bn_apply", (x, scale, shift, residual, scale_r, shift_r, False)
        yield (
            "bn_backward_reduce",
            (grad, x, scale, shift, residual, scale_r, shift_r, True, vec(), vec()),
        )
        yield "bn_backward_elemt", (
            grad, x, scale, shift, residual, scale_r, shift_r, True,
            vec(), vec().abs(), vec(), vec(), vec(), vec().abs(), vec(), 24, True,
        )  # fmt: skip


@pytest.mark.parametrize("case", range(12))
def test_opcheck(case):
    name, args = list(_opcheck_cases())[case]
    torch.library.opcheck(getattr(torch.ops.fastres, name).default, args)


def test_opcheck_apply_autograd():
    x, scale, shift, residual, scale_r, shift_r = _tail_args(
        (2, 5, 3, 3), torch.float32, torch.channels_last, "two_bn"
    )
    args = [x, scale.float(), shift.float(), residual, scale_r.float(), shift_r.float()]
    for a in args:
        a.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastres.bn_apply.default, (*args, True))


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_apply_gradcheck_float64(tail, layout):
    args = _tail_args((2, 4, 3, 5), torch.float64, layout, tail)
    args = [a.requires_grad_(True) if a is not None else None for a in args]
    inputs = tuple(args)

    def f(*a):
        return bn_ops.bn_apply(*a, relu=True)

    torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels_built(), reason="fastres._C built without CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_cuda_ops_match_cpu_reference(dtype, layout):
    """Every op on CUDA (vectorized and scalar paths: C or S multiple of 8 or not)."""
    for shape in SHAPES.values():
        for tail in TAILS:
            x, scale, shift, residual, scale_r, shift_r = (
                t.cuda() if t is not None else None for t in _tail_args(shape, dtype, layout, tail)
            )
            acc = accumulator_dtype(dtype)
            per_channel = [
                t.to(acc) if t is not None else None for t in (scale, shift, scale_r, shift_r)
            ]
            scale, shift, scale_r, shift_r = per_channel
            grad = _rand(shape, dtype, layout, device="cuda")
            c, count = shape[1], x.numel() // shape[1]
            mean = torch.randn(c, device="cuda", dtype=acc)
            mean_r = torch.randn(c, device="cuda", dtype=acc) if tail == "two_bn" else None
            tail_args = (scale, shift, residual, scale_r, shift_r, True)
            cases = [
                ("bn_stats", (x,)),
                ("bn_apply", (x, *tail_args)),
                ("bn_backward_reduce", (grad, x, *tail_args, mean, mean_r)),
            ]
            sums = ref.bn_backward_reduce(*cases[2][1])
            cases.append(
                (
                    "bn_backward_elemt",
                    (
                        grad, x, *tail_args, mean, scale.abs(), sums[0], sums[1], mean_r,
                        scale_r.abs() if scale_r is not None else None,
                        sums[2] if tail == "two_bn" else None, count, residual is not None,
                    ),
                )
            )  # fmt: skip
            for name, args in cases:
                actual = getattr(bn_ops, name)(*args)
                base = getattr(ref, name)(*args)
                gold = getattr(ref, name)(*_f64(args))
                _check(actual, base, gold, dtype, f"cuda {name} {shape} {tail}")


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_stats_of_parts_combine_to_the_whole(layout):
    """What SyncBN would all-gather: per-part bn_stats merged equal the stats of the union."""
    x = _rand((7, 12, 5, 3), torch.float64, layout, offset=5.0)
    parts = torch.split(x, [1, 4, 2])
    stats = [bn_ops.bn_stats(p.contiguous(memory_format=layout)) for p in parts]
    count = torch.tensor([p.numel() // p.shape[1] for p in parts])
    total, mean, m2 = bn_ops.combine_stats(
        count, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])
    )
    whole_mean, whole_m2 = bn_ops.bn_stats(x)
    assert total.item() == x.numel() // x.shape[1]
    torch.testing.assert_close(mean, whole_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(m2, whole_m2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_finalize_update_is_nn_batchnorm_training_update(momentum, running_dtype):
    """bn_finalize_update: bn_finalize's coefficients, and the running statistics (momentum or
    cumulative average, unbiased variance, num_batches_tracked) exactly as nn.BatchNorm2d."""
    x = _rand((3, 7, 5, 4), torch.float32, torch.channels_last)
    module = torch.nn.BatchNorm2d(7, momentum=momentum).to(running_dtype)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(7))
        module.running_var.copy_(torch.rand(7) + 0.5)
    module.num_batches_tracked.fill_(3)
    buffers = [b.clone() for b in (module.running_mean, module.running_var)]
    gold_buffers = [b.double() for b in buffers]
    nbt = module.num_batches_tracked.clone()
    gold_nbt = nbt.clone()
    mean, m2 = bn_ops.bn_stats(x)
    count = x.numel() // 7
    weight, bias = torch.rand(7) + 0.5, torch.randn(7)
    out = bn_ops.bn_finalize_update(mean, m2, count, weight, bias, 1e-5, *buffers, nbt, momentum)
    module.train()(x.to(running_dtype) if running_dtype != torch.float32 else x)
    gold_mean, gold_m2 = ref.bn_stats(x.double())
    gold = ref.bn_finalize_update(
        gold_mean, gold_m2, count, weight.double(), bias.double(), 1e-5, *gold_buffers,
        gold_nbt, momentum,
    )  # fmt: skip
    base = ref.bn_finalize(mean, m2, count, weight, bias, 1e-5)
    _check(out, base, gold, torch.float32, "bn_finalize_update")
    assert nbt.item() == module.num_batches_tracked.item() == 4
    tol = {"rtol": 1e-5, "atol": 1e-6} if running_dtype == torch.float32 else {}
    for ours, theirs, gold_buffer in zip(buffers, module.buffers(), gold_buffers):
        assert ours.dtype == running_dtype
        torch.testing.assert_close(ours.double(), gold_buffer.to(running_dtype).double(), **tol)
        if running_dtype == torch.float32:
            torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("train", [True, False], ids=["train_bn", "eval_bn"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES["odd-3ch"], SHAPES["wide-260ch"]], ids=["3ch", "260ch"])
def test_fused_backward(shape, dtype, layout, tail, train):
    """bn_backward = bn_backward_reduce + bn_backward_elemt + the affine gradients, in one op;
    count 0 (eval_bn): norms on running statistics, no batch terms."""
    x, scale, shift, residual, scale_r, shift_r = _tail_args(shape, dtype, layout, tail)
    c = shape[1]
    grad = _rand(shape, dtype, layout)
    mean, invstd = _channel(c, "shift"), _channel(c, "scale")
    two_bn = tail == "two_bn"
    mean_r = _channel(c, "shift") if two_bn else None
    invstd_r = _channel(c, "scale") if two_bn else None
    count = x.numel() // c if train else 0
    outs = _compare(
        "bn_backward",
        (grad, x, scale, shift, residual, scale_r, shift_r, True, mean, invstd, mean_r,
         invstd_r, count, residual is not None),
        dtype,
    )  # fmt: skip
    assert outs[4].numel() == outs[5].numel() == (c if two_bn else 0)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_relu_(dtype, layout):
    y = _rand((2, 6, 5, 3), dtype, layout)
    r = _rand((2, 6, 5, 3), dtype, layout)
    y[0, 0, 0, 0] = float("nan")
    gold = ref.add_relu_(y.double(), r.double())
    base = ref.add_relu_(y.clone(), r)
    out = bn_ops.add_relu_(y, r)
    assert out is y and out.is_contiguous(memory_format=layout)
    assert out[0, 0, 0, 0].isnan(), "ReLU keeps NaN"
    out[0, 0, 0, 0] = gold[0, 0, 0, 0] = base[0, 0, 0, 0] = 0
    _check(out, base, gold, dtype, "add_relu_")
    # Layouts that differ: the same result through ATen.
    other = _rand((2, 6, 5, 3), dtype, torch.contiguous_format)
    expected = ref.add_relu_(y.clone(), other)
    torch.testing.assert_close(bn_ops.add_relu_(y, other), expected)


def test_opcheck_new_ops():
    shape, c = (2, 6, 3, 4), 6
    x, scale, shift, residual, scale_r, shift_r = _tail_args(
        shape, torch.float32, torch.channels_last, "two_bn"
    )
    scale, shift, scale_r, shift_r = (t.float() for t in (scale, shift, scale_r, shift_r))
    grad = _rand(shape, torch.float32, torch.channels_last)
    vec = lambda: torch.randn(c)  # noqa: E731
    for momentum in (0.1, None):
        running = (vec(), vec().abs() + 1, torch.tensor(2))
        torch.library.opcheck(
            torch.ops.fastres.bn_finalize_update.default,
            (vec(), vec().abs() + 1, 24, vec(), vec(), 1e-5, *running, momentum),
        )
    for count in (24, 0):
        torch.library.opcheck(
            torch.ops.fastres.bn_backward.default,
            (grad, x, scale, shift, residual, scale_r, shift_r, True, vec(), vec().abs(), vec(),
             vec().abs(), count, True),
        )  # fmt: skip
    torch.library.opcheck(torch.ops.fastres.add_relu_.default, (x.clone(), residual))


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels_built(), reason="fastres._C built without CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
def test_cuda_fused_ops_match_cpu_reference(dtype, layout):
    """bn_backward, bn_finalize_update and add_relu_ on CUDA (their per-channel kernels run
    batchnorm_math.h, as the CPU loops the other tests check)."""
    acc = accumulator_dtype(dtype)
    for shape in SHAPES.values():
        c = shape[1]

        def vec(c=c):
            return torch.randn(c, device="cuda", dtype=acc)

        for tail in TAILS:
            x, scale, shift, residual, scale_r, shift_r = (
                t.cuda() if t is not None else None for t in _tail_args(shape, dtype, layout, tail)
            )
            scale, shift, scale_r, shift_r = (
                t.to(acc) if t is not None else None for t in (scale, shift, scale_r, shift_r)
            )
            grad = _rand(shape, dtype, layout, device="cuda")
            two_bn = tail == "two_bn"
            for count in (x.numel() // c, 0):
                args = (
                    grad, x, scale, shift, residual, scale_r, shift_r, True, vec(),
                    vec().abs() + 0.5, vec() if two_bn else None,
                    vec().abs() + 0.5 if two_bn else None, count, residual is not None,
                )  # fmt: skip
                actual = bn_ops.bn_backward(*args)
                _check(actual, ref.bn_backward(*args), ref.bn_backward(*_f64(args)), dtype,
                       f"cuda bn_backward {shape} {tail} count {count}")  # fmt: skip
        y, r = _rand(shape, dtype, layout, device="cuda"), _rand(shape, dtype, layout, "cuda")
        gold = ref.add_relu_(y.double(), r.double())
        base = ref.add_relu_(y.clone(), r)
        _check(bn_ops.add_relu_(y, r), base, gold, dtype, f"cuda add_relu_ {shape}")
        mean, m2 = bn_ops.bn_stats(x)
        count = x.numel() // c
        for momentum in (0.1, None):
            running = (vec(), vec().abs() + 0.5)
            nbt = torch.tensor(5, device="cuda")
            gold_running = [t.double() for t in running]
            gold_nbt = nbt.clone()
            out = bn_ops.bn_finalize_update(
                mean, m2, count, vec(), vec(), 1e-5, *running, nbt, momentum
            )
            ref.bn_finalize_update(
                mean.double(), m2.double(), count, None, None, 1e-5, *gold_running, gold_nbt,
                momentum,
            )  # fmt: skip
            assert out[0].shape == (c,) and nbt.item() == 6
            for ours, expected in zip(running, gold_running, strict=True):
                torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
