"""The per-launch path of the Triton ops: launches prepared once per key
(`fastres.ops.conv2d_fused.prepare`, the Res2Net pool's), the custom ops' bodies called without
their dispatch layers (`dispatch_free`), and the direct launch of a compiled kernel
(`fastres.ops.launcher.DirectLaunch`).

The first two run in process through the Triton interpreter (tests/conftest.py), against the
float64 oracle. The direct launch needs Triton's compiler: `test_direct_launch_matches_the_jit`
runs this file as a script (in a subprocess, without TRITON_INTERPRET) under the stand-in driver
of scripts/compile_report.py, which compiles every kernel for sm_90 and launches nothing, and
asks the JIT, for every direct launch, which kernel it would have launched with the same
arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastres.testing import OpRecorder, assert_matches_oracle

pytest.importorskip("triton")

from fastres.ops import conv2d_fused as conv2d_fused_module  # noqa: E402
from fastres.ops import res2net_pool as res2net_pool_module  # noqa: E402
from fastres.ops.conv2d_fused import conv2d_fused, dispatch_free  # noqa: E402
from fastres.ops.res2net_pool import res2net_pool  # noqa: E402

CL = torch.channels_last


@pytest.fixture
def prepared(monkeypatch):
    """Fresh caches of prepared launches; counts how often a launch is prepared (checked and
    worked out) rather than reused."""
    monkeypatch.setattr(conv2d_fused_module, "_PREPARED", {})
    monkeypatch.setattr(res2net_pool_module, "_PREPARED", {})
    counts = {"conv": 0, "pool": 0}
    real_conv, real_pool = conv2d_fused_module._prepare, res2net_pool_module._checked_launch

    def conv(*args):
        counts["conv"] += 1
        return real_conv(*args)

    def pool(*args):
        counts["pool"] += 1
        return real_pool(*args)

    monkeypatch.setattr(conv2d_fused_module, "_prepare", conv)
    monkeypatch.setattr(res2net_pool_module, "_checked_launch", pool)
    return counts


def _check(y, x, weight, bias=None, residual=None, relu=False, **conv):
    """y against the oracle: the convolution in x's dtype and in float64."""

    def oracle(dtype):
        z = F.conv2d(x.to(dtype), weight.to(dtype), None, **conv)
        if bias is not None:
            z = z + bias.to(dtype).view(1, -1, 1, 1)
        if residual is not None:
            z = z + residual.to(dtype)
        return torch.relu(z) if relu else z

    assert_matches_oracle(y, oracle(x.dtype), oracle(torch.float64), x.dtype)


def _inputs(dtype=torch.float32, c_in=8, c_out=16, size=6):
    x = torch.randn(2, c_in, size, size, dtype=dtype).contiguous(memory_format=CL)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype) / 8
    return x, weight, torch.randn(c_out)


def test_a_key_is_prepared_once_and_its_launch_reused_on_new_data(prepared):
    x, weight, bias = _inputs()
    for _ in range(3):
        x, weight, bias = (t.clone().normal_() for t in (x, weight, bias))
        y = conv2d_fused(x, weight, bias, padding=1, relu=True)
        _check(y, x, weight, bias, relu=True, padding=1)
    assert prepared["conv"] == 1
    # The statistics' launches (the merge's too) are kept the same way.
    for _ in range(2):
        y, mean, m2 = conv2d_fused(x, weight, padding=1, stats=True)
        gold = F.conv2d(x.double(), weight.double(), padding=1)
        torch.testing.assert_close(mean.double(), gold.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        var = gold.var((0, 2, 3), unbiased=False) * gold[:, 0].numel()
        torch.testing.assert_close(m2.double(), var, rtol=1e-4, atol=1e-4)
    assert prepared["conv"] == 2


def test_what_a_launch_depends_on_is_in_its_key(prepared):
    """A new shape, stride, dtype, flag or optional input is prepared anew, never served the
    launch of a similar key."""
    x, weight, bias = _inputs()
    calls = [
        lambda: conv2d_fused(x, weight, bias, padding=1),
        lambda: conv2d_fused(x[:, :, :5], weight, bias, padding=1),  # shape
        lambda: conv2d_fused(x.contiguous(), weight, bias, padding=1),  # strides
        lambda: conv2d_fused(x.half(), weight.half(), bias, padding=1),  # dtype
        lambda: conv2d_fused(x, weight, bias.half(), padding=1),  # the bias's dtype
        lambda: conv2d_fused(x, weight, bias, padding=1, relu=True),  # a flag
        lambda: conv2d_fused(x, weight, None, padding=1),  # an optional input
        lambda: conv2d_fused(x, weight, bias, padding=1, stride=2),  # the convolution
    ]
    for i, call in enumerate(calls, 1):
        call()
        assert prepared["conv"] == i
    wide = torch.randn(2, 12, 6, 6).contiguous(memory_format=CL)
    y = conv2d_fused(wide[:, 2:10], weight, bias, padding=1, relu=True)  # a channel slice
    _check(y, wide[:, 2:10], weight, bias, relu=True, padding=1)
    assert prepared["conv"] == len(calls) + 1


def test_bad_input_raises_after_a_good_call_with_a_similar_key(prepared):
    """The kept verdict is never given to input that differs from the checked one: each bad
    call (one thing changed from a good one) raises the usual error."""
    x, weight, bias = _inputs()
    residual = torch.randn(2, 16, 6, 6).contiguous(memory_format=CL)
    good = dict(padding=1, residual=residual)
    conv2d_fused(x, weight, bias, **good)
    bad = [
        (dict(weight=weight[:, :4]), ValueError, "input channels"),
        (dict(weight=weight.half()), TypeError, "share a dtype"),
        (dict(bias=bias[:8]), ValueError, "bias must have shape"),
        (dict(bias=bias.int()), ValueError, "floating-point"),
        (dict(bias=torch.randn(2 * len(bias))[::2]), ValueError, "bias must be contiguous"),
        (dict(residual=residual[:, :, :5]), ValueError, "residual must have the output's shape"),
        (dict(residual_scale=bias), ValueError, "go together"),
        (dict(input_pool=2, input_add=x), ValueError, "input_add cannot be combined"),
        (dict(groups=3), ValueError, "groups must be a positive int"),
        (dict(weight=weight.to("meta")), ValueError, "weight is on meta"),
    ]
    for change, error, match in bad:
        call = dict(x=x, weight=weight, bias=bias, **good) | change
        with pytest.raises(error, match=match):
            conv2d_fused(**call)
    y = conv2d_fused(x, weight, bias, **good)  # and the good call still runs
    _check(y, x, weight, bias, residual, padding=1)


def test_out_must_not_share_memory_even_with_a_known_key(prepared):
    """Whether out shares memory with an input is no part of a key (same shapes and strides):
    it is checked on every call."""
    buffer = torch.randn(2, 32, 6, 6).contiguous(memory_format=CL)
    x, weight, _ = _inputs()
    x = buffer[:, :8]
    weight = torch.randn(8, 8, 3, 3) / 8
    out = buffer[:, 16:24]
    conv2d_fused(x, weight, padding=1, out=out)
    _check(out, x, weight, padding=1)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        conv2d_fused(buffer[:, 16:24], weight, padding=1, out=buffer[:, 16:24])
    with pytest.raises(ValueError, match="out must be"):
        conv2d_fused(x, weight, padding=1, out=buffer[:, 16:23])
    assert prepared["conv"] == 2  # the overlap was a hit, the wrong out a new key
    chunk, pool_out = buffer[:, :8], buffer[:, 24:32]
    res2net_pool(chunk, pool_out, stride=1)
    torch.testing.assert_close(pool_out, F.avg_pool2d(chunk, 3, 1, 1))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        res2net_pool(buffer[:, 24:32], buffer[:, 24:32], stride=1)
    with pytest.raises(ValueError, match="out must be"):
        res2net_pool(chunk, pool_out, stride=2)
    assert prepared["pool"] == 2


class _Recording(torch.utils._python_dispatch.TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_ops_dispatch_where_anything_could_see_them():
    """The ops' bodies run without the dispatcher only in plain eager mode: under a dispatch
    mode, a function mode, the profiler, torch.jit tracing or with a tensor subclass the op
    dispatches (and the mode, profile or trace sees `fastres::conv2d_fused`)."""
    x, weight, bias = _inputs()
    inputs = (x, weight, bias, [1, 1], 2, True, None)
    assert dispatch_free(inputs)
    with _Recording():
        assert not dispatch_free(inputs)
    with _FunctionMode():
        assert not dispatch_free(inputs)
    with torch.profiler.profile() as profile, torch.no_grad():
        assert not dispatch_free(inputs)
        conv2d_fused(x, weight, bias, padding=1)
    assert "fastres::conv2d_fused" in {e.key for e in profile.key_averages()}

    class Subclass(torch.Tensor):
        pass

    assert not dispatch_free((x.as_subclass(Subclass), weight))
    with torch.no_grad():
        traced = torch.jit.trace(lambda x: conv2d_fused(x, weight, bias, padding=1), x)
    assert "fastres::conv2d_fused" in str(traced.graph)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), OpRecorder() as recorder:
            conv2d_fused(x, weight.requires_grad_(grad), bias, padding=1)
            conv2d_fused(x, weight, bias, padding=1, out=torch.empty(2, 16, 6, 6))
        assert recorder.ops.count("fastres.conv2d_fused.default") == 1
        assert recorder.ops.count("fastres.conv2d_fused_out.default") == 1


def test_out_ops_bump_the_version_of_out():
    """Written without the dispatcher, out still counts as modified (autograd's check of
    tensors saved for backward)."""
    x, weight, _ = _inputs()
    out = torch.empty(2, 16, 6, 6)
    before = out._version
    with torch.no_grad():
        conv2d_fused(x, weight, padding=1, out=out)
    assert out._version > before
    pool_out = torch.empty(2, 8, 6, 6)
    before = pool_out._version
    res2net_pool(x, pool_out)
    assert pool_out._version > before


# -- the training ops: fastres::conv2d_bn_train, fastres::bn_fold ------------------------------


def _train_inputs(c_in=5, c_out=6):
    """x, conv weight, BN weight and bias for a conv2d_bn_train with an input BatchNorm."""
    x = torch.randn(2, c_in, 6, 5).contiguous(memory_format=CL)
    weight = torch.randn(c_out, c_in, 3, 3) / 8
    return x, weight, torch.rand(c_in) + 0.5, torch.randn(c_in)


def _input_bn(x, bn_weight, bn_bias, eps=1e-5):
    from fastres.ops.batchnorm import bn_stats
    from fastres.ops.conv2d_bn_train import InputBN

    mean, m2 = bn_stats(x)
    return InputBN(mean, m2, x.numel() // x.shape[1], bn_weight, bn_bias, eps)


def _check_bn_train(y, mean, m2, x, weight, bn_weight, bn_bias):
    """conv2d_bn_train's output and statistics against the oracle (BN with batch statistics,
    ReLU, conv)."""

    def oracle(dtype):
        a = F.batch_norm(x.to(dtype), None, None, bn_weight.to(dtype), bn_bias.to(dtype), True)
        return F.conv2d(torch.relu(a), weight.to(dtype), padding=1)

    gold = oracle(torch.float64)
    assert_matches_oracle(y, oracle(x.dtype), gold, x.dtype)
    torch.testing.assert_close(mean.double(), gold.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    var = gold.var((0, 2, 3), unbiased=False) * gold[:, 0].numel()
    torch.testing.assert_close(m2.double(), var, rtol=1e-4, atol=1e-4)


def _fold_oracle(weight, bn_weight, bn_bias, running_mean, running_var, eps, dtype):
    """The folded weight and bias in `dtype` (PyTorch ops)."""
    scale = bn_weight.to(dtype) / torch.sqrt(running_var.to(dtype) + eps)
    shift = bn_bias.to(dtype) - running_mean.to(dtype) * scale
    return weight.to(dtype) * scale.view(-1, 1, 1, 1), shift


@pytest.fixture
def kept_training_launches(monkeypatch):
    """Fresh caches of the training ops' kept launches and input-BN verdicts; counts how often
    a fold's launch (either way) is made rather than reused."""
    from fastres.ops import bn_fold as bn_fold_module
    from fastres.ops import conv2d_bn_train as conv2d_bn_train_module

    monkeypatch.setattr(bn_fold_module, "_LAUNCHES", {})
    monkeypatch.setattr(conv2d_bn_train_module, "_CHECKED_INPUT_BN", set())
    counts = {"fold": 0, "fold_backward": 0}
    for name in counts:
        real = getattr(bn_fold_module, f"_{name}_launch")

        def counted(*args, name=name, real=real):
            counts[name] += 1
            return real(*args)

        monkeypatch.setattr(bn_fold_module, f"_{name}_launch", counted)
    return counts


def test_training_ops_keep_their_launches_per_key_and_reuse_them_on_new_data(
    prepared, kept_training_launches
):
    """conv2d_bn_train (with gradients) and the BatchNorm fold (both ways) prepare a key once
    and give the right answer on new data; a new eps (a scalar of the fold's launch) is a new
    key, never the kept launch of the old one."""
    from fastres.ops.bn_fold import bn_fold
    from fastres.ops.conv2d_bn_train import conv2d_bn_train

    x, weight, bn_weight, bn_bias = _train_inputs()
    for _ in range(3):
        x, weight, bn_weight, bn_bias = (
            t.clone().normal_() for t in (x, weight, bn_weight, bn_bias)
        )
        bn_weight = bn_weight.abs() + 0.5
        w = weight.clone().requires_grad_()
        y, mean, m2 = conv2d_bn_train(x, w, padding=1, input_bn=_input_bn(x, bn_weight, bn_bias))
        _check_bn_train(y, mean, m2, x, weight, bn_weight, bn_bias)
    assert prepared["conv"] == 1
    running_mean, running_var = torch.randn(6), torch.rand(6) + 0.5
    gamma, beta = torch.rand(6) + 0.5, torch.randn(6)
    for eps, folds in ((1e-5, 1), (1e-5, 1), (1e-3, 2)):
        w = weight.clone().normal_().requires_grad_()
        g = gamma.clone().requires_grad_()
        folded_w, folded_b = bn_fold(w, None, g, beta, running_mean, running_var, eps, w.dtype)
        oracles = [_fold_oracle(w.detach(), gamma, beta, running_mean, running_var, eps, dtype)
                   for dtype in (torch.float32, torch.float64)]  # fmt: skip
        assert_matches_oracle(folded_w, oracles[0][0], oracles[1][0], w.dtype, "weight")
        assert_matches_oracle(folded_b, oracles[0][1], oracles[1][1], w.dtype, "bias")
        grad_w = torch.randn_like(folded_w)
        grad_w_x, grad_g = torch.autograd.grad((folded_w * grad_w).sum(), [w, g])
        scale = gamma.double() / torch.sqrt(running_var.double() + eps)
        gold = grad_w.double() * scale.view(-1, 1, 1, 1)
        assert_matches_oracle(grad_w_x, (grad_w * scale.float().view(-1, 1, 1, 1)), gold, w.dtype)
        gold_g = (grad_w.double() * w.detach().double()).sum((1, 2, 3)) / torch.sqrt(
            running_var.double() + eps
        )
        torch.testing.assert_close(grad_g.double(), gold_g, rtol=1e-4, atol=1e-5)
        assert kept_training_launches == {"fold": folds, "fold_backward": folds}


def test_kept_training_verdicts_never_hide_bad_input(kept_training_launches):
    """After a good call, a bad one with a similar key raises the usual error (the input
    BatchNorm's checks, the fold's), and the good call still runs."""
    from fastres.ops.bn_fold import bn_fold
    from fastres.ops.conv2d_bn_train import conv2d_bn_train

    x, weight, bn_weight, bn_bias = _train_inputs()
    good = _input_bn(x, bn_weight, bn_bias)
    conv2d_bn_train(x, weight, padding=1, input_bn=good)
    bad = [
        (dict(input_bn=good._replace(mean=good.mean[:3])), r"input_bn.mean must have shape \[5\]"),
        (dict(input_bn=good._replace(weight=bn_weight.int())), "floating-point"),
        (dict(input_bn=good._replace(scale=bn_weight)), "go together"),
        (dict(input_bn=good, input_add=x), "input_bn cannot be combined"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            conv2d_bn_train(x, weight, padding=1, **(dict(input_bn=good) | change))
    y, mean, m2 = conv2d_bn_train(x, weight, padding=1, input_bn=good)
    _check_bn_train(y, mean, m2, x, weight, bn_weight, bn_bias)
    stats = (torch.randn(6), torch.rand(6) + 0.5)
    bn_fold(weight, None, None, None, *stats, 1e-5, weight.dtype)
    with pytest.raises(ValueError, match=r"must have shape \[6\]"):
        bn_fold(weight, None, None, None, stats[0][:4], stats[1], 1e-5, weight.dtype)
    with pytest.raises(ValueError, match="floating-point"):
        bn_fold(weight, None, None, None, stats[0].int(), stats[1], 1e-5, weight.dtype)


def test_training_ops_dispatch_where_anything_could_see_them():
    """Under a dispatch mode the training ops dispatch (the mode sees them), with gradients
    too: their bodies run without the dispatcher only in plain eager mode."""
    from fastres.ops.bn_fold import bn_fold
    from fastres.ops.conv2d_bn_train import conv2d_bn_train

    x, weight, bn_weight, bn_bias = _train_inputs()
    stats = (torch.randn(6), torch.rand(6) + 0.5)
    # In plain eager mode they run without it (a dtype argument dispatches nothing).
    assert dispatch_free((weight, None, None, None, *stats, 1e-5, weight.dtype))
    for grad in (False, True):
        w = weight.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), OpRecorder() as recorder:
            y, _, _ = conv2d_bn_train(x, w, padding=1, input_bn=_input_bn(x, bn_weight, bn_bias))
            folded, bias = bn_fold(w, None, None, None, *stats, 1e-5, w.dtype)
            if grad:
                torch.autograd.grad(y.sum() + folded.sum(), [w])
        assert recorder.ops.count("fastres.conv2d_bn_train.default") == 1
        assert recorder.ops.count("fastres.bn_fold.default") == 1
        assert recorder.ops.count("fastres.bn_fold_backward.default") == int(grad)


# -- the direct launch, under the stand-in driver (run as a script) ----------------------------


def direct_launch_check() -> dict:
    """Runs the Triton ops under scripts/compile_report.py's stand-in driver and checks every
    direct launch against the JIT: given the same call, the JIT finds the very kernel launched
    and binds the arguments the launcher got. Returns counts and which kernels served the
    aligned and the unaligned inputs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from compile_report import Recorder  # pops TRITON_INTERPRET before triton loads
    from triton.runtime.jit import JITFunction

    from fastres.ops import launcher

    torch.set_flush_denormal(True)  # nothing launches: outputs are garbage
    direct, jit_runs = [], []
    with Recorder(all_candidates=False).patched(90):
        real_run, real_call = JITFunction.run, launcher.DirectLaunch.__call__

        def run(fn, *args, warmup, **kwargs):
            kernel = real_run(fn, *args, warmup=warmup, **kwargs)
            if not warmup:
                jit_runs.append(kernel)
            return kernel

        def call(self, *pointers):
            before = len(direct)
            real_call(self, *pointers)
            if len(direct) == before:
                return  # through the JIT
            kernel, args = direct[-1]
            call = (*pointers, *self.scalars)
            again = real_run(self.jit, *call, grid=self.grid, warmup=True, **self.constexprs)
            assert again is kernel, f"{self.jit.__name__}: the JIT launches another kernel"
            # What the JIT hands the launcher: every parameter in signature order (its binder,
            # JITFunction.device_caches[device][4] in Triton 3.6 and 3.9).
            bound, _, _ = self.jit.device_caches[0][4](*call, **self.constexprs)
            assert len(bound) == len(args), (len(bound), len(args))
            for name, a, b in zip(bound, bound.values(), args):
                assert a is b or (not isinstance(a, torch.Tensor) and a == b), name

        JITFunction.run, launcher.DirectLaunch.__call__ = run, call
        launcher.launch_compiled = lambda kernel, grid, stream, args: direct.append((kernel, args))
        x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=CL)
        weight = torch.randn(32, 16, 3, 3, dtype=torch.bfloat16)
        # The same shape and strides 2 bytes off a 16-byte boundary: the same prepared key.
        storage = torch.empty(x.numel() + 8, dtype=torch.bfloat16)
        unaligned = storage.as_strided(x.shape, x.stride(), 1).copy_(x)
        kernels = {}
        for name, inp in (("aligned", x), ("unaligned", unaligned), ("aligned again", x)):
            for _ in range(2):
                conv2d_fused(inp, weight, padding=1, relu=True)
            kernels[name] = direct[-1][0]
        conv2d_fused(x, weight, padding=1, stats=True)
        conv2d_fused(x, weight, padding=1, stats=True)  # the convolution's and merge's
        buffer = torch.randn(2, 33, 8, 8, dtype=torch.bfloat16).contiguous(memory_format=CL)
        for _ in range(2):
            conv2d_fused(x, weight[:8], padding=1, out=buffer[:, 1:9])  # unaligned out
            res2net_pool(buffer[:, 9:17], buffer[:, 17:25])
        from fastres.ops.bn_fold import bn_fold

        w = torch.randn(32, 16, 3, 3, requires_grad=True)
        stats = (torch.randn(32), torch.rand(32) + 0.5)
        for _ in range(2):  # the BatchNorm fold's launches, forward and backward
            folded, bias = bn_fold(w, None, None, None, *stats, 1e-5, torch.bfloat16)
            torch.autograd.grad(folded.float().sum() + bias.sum(), [w])
    launcher.DirectLaunch.__call__ = real_call
    return {
        "direct": len(direct),
        "jit_runs": len(jit_runs),
        "kernels": len({id(k) for k, _ in direct}),
        "unaligned_kernel_differs": kernels["unaligned"] is not kernels["aligned"],
        "aligned_kernel_kept": kernels["aligned again"] is kernels["aligned"],
    }


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend")
def test_direct_launch_matches_the_jit():
    """Every direct launch is the launch the JIT would have made (same kernel for the same
    arguments), a pointer off a 16-byte boundary gets its own kernel (the JIT specializes on
    alignment), and the first launch of each (key, alignment) goes through the JIT."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["unaligned_kernel_differs"] and result["aligned_kernel_kept"], result
    # JIT launches: the convolution aligned, unaligned, with statistics, into the unaligned
    # out; the merge; the pool; the fold and its backward. Every other launch is direct,
    # checked against the JIT.
    assert result["jit_runs"] == 8, result
    assert result["direct"] == 10, result
    assert result["kernels"] == 8, result


if __name__ == "__main__":
    print(json.dumps(direct_launch_check()))


class _Scale(torch.autograd.Function):
    """y = x * s, with a backward that says which path computed the gradient."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x * s

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.s, None


def test_apply_function_is_function_apply():
    """`apply_function` (the fused ops' cheap Function.apply) builds the same autograd graph as
    Function.apply in eager mode, and under a torch.func transform is Function.apply (which
    refuses a Function without setup_context, as it always did)."""
    from fastres.ops.conv2d_fused import apply_function

    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    s = float(torch.rand(()) + 0.5)
    y = apply_function(_Scale, x, s)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_ScaleBackward"
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, s))
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: apply_function(_Scale, t, s).sum())(x.detach())
