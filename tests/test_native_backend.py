"""The 'native' backend (PyTorch convolution + fused BatchNorm ops) against the oracle.

Whole ResNet-50 / Res2Net-50 in eval and in training (outputs, gradients, running statistics)
under docs/contract.md §3's rules, on tiny images. Gold is the oracle in float64; base the oracle
in the working dtype.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastres
from fastres.backends import native as native_backend
from fastres.extension import EXTENSION_ERROR, cuda_kernels_built
from fastres.ops import batchnorm as bn_ops
from fastres.testing import (
    OpRecorder,
    assert_matches_oracle,
    assert_trajectory_matches,
    randomize_norms,
    sgd_trajectory,
)

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

MODELS = {
    "resnet50": lambda **kw: fastres.ResNet(depth=50, **kw),
    "res2net50": lambda **kw: fastres.Res2Net(depth=50, **kw),
}
SMALL_MODELS = {
    "resnet18": lambda **kw: fastres.ResNet(depth=18, **kw),
    "resnetv1d50-caffe": lambda **kw: fastres.ResNetV1d(depth=50, style="caffe", **kw),
    "res2net50-always-plainstem": lambda **kw: fastres.Res2Net(
        depth=50, pool_last_chunk="always", deep_stem=False, avg_down=False, **kw
    ),
    "resnet50-dilated": lambda **kw: fastres.ResNet(
        depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), **kw
    ),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def build(ctor, seed=0, **kw):
    kw.setdefault("zero_init_residual", False)
    return randomize_norms(ctor(backend="torch", **kw), seed)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def weighted_loss(outs):
    """A loss whose gradient differs per element (a plain sum hides transposition bugs)."""
    total = 0
    for o in as_tuple(outs):
        w = torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)
        total = total + (o * w.to(o.dtype)).sum()
    return total


def run(model, x, backward=True):
    """Outputs, input gradient, parameter gradients (name -> grad) and buffers after a step."""
    x = x.detach().clone().requires_grad_(backward)
    outs = as_tuple(model(x))
    grads = {}
    if backward:
        weighted_loss(outs).backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    return outs, x.grad, grads, buffers


def check_run(actual, base, gold, dtype, what=("outs", "x", "params", "buffers")):
    outs, gx, grads, buffers = actual
    b_outs, b_gx, b_grads, b_buffers = base
    g_outs, g_gx, g_grads, g_buffers = gold
    if "outs" in what:
        for i, (a, b, g) in enumerate(zip(outs, b_outs, g_outs, strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape)
            assert_matches_oracle(a, b, g, dtype, f"output {i}")
    if "x" in what and g_gx is not None:
        assert gx.dtype == b_gx.dtype
        assert_matches_oracle(gx, b_gx, g_gx, dtype, "input gradient")
    if "params" in what:
        assert grads.keys() == g_grads.keys()
        for k in g_grads:
            assert_matches_oracle(grads[k], b_grads[k], g_grads[k], dtype, f"grad {k}")
    if "buffers" in what:
        for k in g_buffers:
            if k.endswith("num_batches_tracked"):
                assert torch.equal(buffers[k], g_buffers[k]), k
            else:
                assert_matches_oracle(buffers[k], b_buffers[k], g_buffers[k], dtype, k)


def native(model):
    """The model (or a lone block) switched to the 'native' backend."""
    if hasattr(model, "set_backend"):
        return model.set_backend("native")
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = "native"
    return model


def three_runs(model, x, dtype, backward=True, layout=torch.contiguous_format):
    """(native in dtype, oracle in dtype, oracle in float64), each on a fresh copy."""
    gold = run(copy.deepcopy(model).double(), x.double(), backward)
    x = x.to(dtype).contiguous(memory_format=layout)
    base_model = copy.deepcopy(model).to(dtype).to(memory_format=layout)
    base = run(base_model, x, backward)
    native_model = native(copy.deepcopy(model).to(dtype).to(memory_format=layout))
    return run(native_model, x, backward), base, gold


def test_native_is_available_and_auto_on_cpu():
    status = fastres.available_backends()["native"]
    assert status.available, status.reason
    model = fastres.ResNet(depth=18)
    assert model.backend == "auto"
    from fastres import backends

    auto = backends.resolve("auto", torch.device("cpu"))
    assert auto.name == "auto" and auto.default(torch.device("cpu")).name == "native"
    if not cuda_kernels_built():
        reason = native_backend.NativeBackend().unavailable_reason("cuda")
        assert "CUDA" in reason


# Every dtype and layout, not every pair of them: whole-model runs are slow on 2 cores.
DTYPE_LAYOUTS = [
    (torch.float32, torch.contiguous_format),
    (torch.float32, torch.channels_last),
    (torch.bfloat16, torch.channels_last),
    (torch.float16, torch.contiguous_format),
]


@pytest.mark.parametrize(
    ("dtype", "layout"), DTYPE_LAYOUTS, ids=[f"{d}-{f}" for d, f in DTYPE_LAYOUTS]
)
@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_oracle(name, dtype, layout):
    model = build(MODELS[name]).eval()
    x = torch.randn(2, 3, 40, 36)
    check_run(*three_runs(model, x, dtype, backward=False, layout=layout), dtype)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_eval_matches_oracle_variants(name):
    model = build(SMALL_MODELS[name], num_classes=10).eval()
    x = torch.randn(2, 3, 33, 47)
    check_run(*three_runs(model, x, torch.float32, backward=False), torch.float32)


@pytest.mark.parametrize("name", MODELS)
def test_frozen_bn_training_matches_oracle(name):
    """norm_eval=True (the default): eval-mode BN while training; gradients reach every param."""
    model = build(MODELS[name]).train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 32, 32)
    native, base, gold = three_runs(model, x, torch.float32, layout=torch.channels_last)
    # Gradients in float64: in float32 a pre-activation rounding across a ReLU kink in one run
    # and not the other moves a weight gradient by a whole upstream gradient (rare, but seen).
    check_run(native, base, gold, torch.float32, what=("outs", "buffers"))
    check_run(*float64_runs(model, x), torch.float64)
    assert len(native[2]) == len(list(model.parameters()))


def float64_runs(model, x):
    """(native, oracle in channels_last, oracle) in float64: exact-math checks.

    Gradients and running statistics through training-mode BN over a few values per channel
    (the last stages of a tiny image) are dominated by rounding in float32 — the float32
    oracle itself is off by tens of percent there — so whole models with training-mode BN
    are compared in float64, with the float64 oracle in channels_last (another summation
    order) as base.
    """
    cl = torch.channels_last
    gold = run(copy.deepcopy(model).double(), x.double())
    base_model = copy.deepcopy(model).double().to(memory_format=cl)
    base = run(base_model, x.double().contiguous(memory_format=cl))
    return run(native(copy.deepcopy(model).double()), x.double()), base, gold


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_bn_matches_oracle(name):
    """BN in training mode: float32 outputs; float64 outputs, gradients, running statistics."""
    model = build(MODELS[name], norm_eval=False).train()
    # 48x48: the last stage keeps 2x2 values per image; at 1x1 (two values per channel) BN's
    # gradient is zero up to rounding and no comparison means anything.
    x = torch.randn(2, 3, 48, 48)
    native, base, gold = three_runs(model, x, torch.float32, backward=False)
    check_run(native, base, gold, torch.float32, what=("outs",))
    check_run(*float64_runs(model, x), torch.float64)


def _bottleneck(**kw):
    down = nn.Sequential(nn.Conv2d(24, 64, 1, 2, bias=False), nn.BatchNorm2d(64))
    return fastres.models.resnet.Bottleneck(24, 16, stride=2, downsample=down, **kw)


def _bottle2neck(**kw):
    down = nn.Sequential(
        nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
        nn.Conv2d(24, 64, 1, bias=False),
        nn.BatchNorm2d(64),
    )
    return fastres.models.res2net.Bottle2neck(
        24, 16, stride=2, downsample=down, scales=4, base_width=26, stage_type="stage", **kw
    )


BLOCKS = {
    "basic-identity": lambda: fastres.models.resnet.BasicBlock(24, 24),
    "bottleneck-downsample": _bottleneck,
    "bottle2neck-stage-avgdown": _bottle2neck,
    "bottle2neck-normal": lambda: fastres.models.res2net.Bottle2neck(
        64, 16, scales=4, base_width=26, stage_type="normal"
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS)
def test_train_mode_block_matches_oracle(block, dtype, layout):
    """Training-mode BN in every dtype and layout, on blocks with many values per channel.

    In fp16 / bf16 a few outputs sit within rounding of the ReLU kink, where the fp64 gold
    takes the other branch; each such element moves a per-channel gradient sum by a whole
    upstream gradient, by chance more in one run than in another. So gradients meet the rule
    in float32 (and float64 above); in half precision they must match the oracle's dtypes.
    """
    module = randomize_norms(BLOCKS[block]()).train()
    module.backend = "torch"
    x = torch.randn(4, module.conv1.in_channels, 17, 16)
    native, base, gold = three_runs(module, x, dtype, layout=layout)
    if dtype == torch.float32:
        check_run(native, base, gold, dtype)
        return
    check_run(native, base, gold, dtype, what=("outs", "buffers"))
    assert native[1].dtype == base[1].dtype
    for k, grad in native[2].items():
        assert grad.dtype == base[2][k].dtype and torch.isfinite(grad).all(), k


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage_type", ["normal", "stage"])
def test_res2net_inference_concatenates_in_place(stage_type, dtype, layout):
    """Without autograd, a stride-1 Bottle2neck's chunk results overwrite conv1's output, which
    conv3 then reads: no torch.cat, and the output of the oracle's split-conv-cat."""
    module = fastres.models.res2net.Bottle2neck(
        64, 16, scales=4, base_width=26, stage_type=stage_type
    )
    module = randomize_norms(module).eval()
    x = torch.randn(2, 64, 13, 11)
    module.backend = "torch"
    with torch.no_grad():
        gold = module.double()(x.double())
        module.to(dtype).to(memory_format=layout)
        x = x.to(dtype).contiguous(memory_format=layout)
        base = module(x)
        module.backend = "native"
        with OpRecorder() as recorder:
            out = module(x)
    assert "aten.cat.default" not in recorder.ops
    assert_matches_oracle(out, base, gold, dtype)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_momentum_and_count(momentum):
    norm_cfg = {"type": "BN", "momentum": momentum}
    model = build(MODELS["resnet50"], norm_eval=False, norm_cfg=norm_cfg).train().double()
    oracle = copy.deepcopy(model)
    native = copy.deepcopy(model).set_backend("native")
    for _ in range(3):
        x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
        with torch.no_grad():
            oracle(x)
            native(x)
    for (k, a), b in zip(native.named_buffers(), oracle.buffers(), strict=True):
        if k.endswith("num_batches_tracked"):
            assert a.item() == b.item() == 3
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


def test_frozen_stages_and_frozen_affine_get_no_grads():
    model = build(
        MODELS["res2net50"],
        frozen_stages=2,
        norm_eval=False,
        norm_cfg={"type": "BN", "requires_grad": False},
    ).train()
    native, base, gold = float64_runs(model, torch.randn(2, 3, 48, 48))
    check_run(native, base, gold, torch.float64)
    assert not any(k.startswith(("layer1", "layer2", "stem")) for k in native[2])
    assert not any(".bn" in k for k in native[2])


@pytest.mark.parametrize("name", MODELS)
def test_trajectory_matches_oracle(name):
    """A few SGD steps with training-mode BN under docs/contract.md §3's trajectory rule, in
    float64.

    In fp32, batch-statistics BN on tiny images makes the trajectories chaotic: the oracle's own
    NCHW / channels_last deviation (the rule's bound) varies by an order of magnitude between
    tensors and seeds, so an fp32 run passes or fails by chance. In float64 the bound is the
    rule's slack (1e-4), far below what a real error leaves behind (a wrong momentum or a biased
    running variance moves the state by about 1/N).
    """
    model = build(MODELS[name], norm_eval=False, num_classes=5).double().train()
    xs = [torch.randn(2, 3, 40, 40, dtype=torch.float64) for _ in range(3)]
    targets = [torch.randint(0, 5, (2,)) for _ in range(3)]

    oracle = sgd_trajectory(model, xs, targets, torch.contiguous_format)
    oracle_cl = sgd_trajectory(model, xs, targets, torch.channels_last)
    native = copy.deepcopy(model).set_backend("native")
    native = sgd_trajectory(native, xs, targets, torch.channels_last)
    assert_trajectory_matches(native, oracle, oracle_cl, f"{name} ")


def test_autocast_bf16_returns_what_the_oracle_returns():
    model = build(MODELS["res2net50"]).eval()
    x = torch.randn(2, 3, 40, 40)
    gold = as_tuple(copy.deepcopy(model).double()(x.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = as_tuple(model(x))
        native = as_tuple(copy.deepcopy(model).set_backend("native")(x))
    for i, (a, b, g) in enumerate(zip(native, base, gold, strict=True)):
        assert a.dtype == b.dtype
        assert_matches_oracle(a, b, g, torch.bfloat16, f"output {i}")


def test_autocast_bf16_training():
    model = build(MODELS["resnet50"], norm_eval=False).train()
    x = torch.randn(2, 3, 32, 32)
    results = []
    for backend in ("torch", "native"):
        m = copy.deepcopy(model).set_backend(backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = m(x)
        weighted_loss(outs).backward()
        results.append((outs, m))
    (base, m_base), (native, m_native) = results
    for a, b in zip(native, base, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    for (k, p), q in zip(m_native.named_parameters(), m_base.parameters(), strict=True):
        assert p.grad is not None and p.grad.dtype == q.grad.dtype, k


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_fullgraph(mode):
    model = build(MODELS["res2net50"], norm_eval=mode == "eval", num_classes=4)
    model.train() if mode == "train" else model.eval()
    model.set_backend("native")
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    if mode == "train":
        out.sum().backward()
        expected.sum().backward()
        for (k, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=k)
        for a, b in zip(model.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deepcopy_and_pickle():
    model = build(MODELS["res2net50"]).eval().set_backend("native")
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        for a, b in zip(clone(x), expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_parameter_change_invalidates_folded_weights():
    model = build(MODELS["resnet50"]).eval().set_backend("native")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(1.5)
                m.running_var.mul_(0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.mul_(-1)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        out = model(x)
        base = copy.deepcopy(model).set_backend("torch")(x)
        gold = copy.deepcopy(model).double().set_backend("torch")(x.double())
    for i, (a, b, g) in enumerate(zip(out, base, gold, strict=True)):
        assert_matches_oracle(a, b, g, torch.float32, f"output {i}")
    for k, v in model.state_dict().items():  # folding never writes back
        assert torch.equal(v, weights[k]), k


def test_unfused_norms_run_the_oracle():
    x = torch.randn(2, 3, 32, 32)
    for norm_cfg in ({"type": "GN", "num_groups": 2}, {"type": "SyncBN"}):
        model = build(MODELS["resnet50"], norm_cfg=norm_cfg).eval()
        native = copy.deepcopy(model).set_backend("native")
        for a, b in zip(native(x), model(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_empty_batch_and_with_cp():
    model = build(MODELS["res2net50"], with_cp=True, norm_eval=False).train()
    empty = torch.randn(0, 3, 32, 32)
    native = copy.deepcopy(model).set_backend("native")
    for a, b in zip(native.eval()(empty), model.eval()(empty), strict=True):
        assert a.shape == b.shape
    model.train()
    # Training-mode BN through the recomputation: float64, as test_train_mode_bn_matches_oracle.
    check_run(*float64_runs(model, torch.randn(2, 3, 48, 48)), torch.float64)


@pytest.mark.parametrize("tail", ["plain", "residual", "two_bn"])
def test_train_batchnorm_function_gradcheck_float64(tail):
    shape = (3, 4, 3, 2)
    y = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y_d = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight_d = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(True)
    bias_d = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def stats(t):
        # Constants to autograd: the op's backward holds their gradient terms, which the
        # numerical gradient sees through the recomputed statistics.
        return (*bn_ops.bn_stats(t.detach()), t.numel() // t.shape[1])

    def f(y, weight, bias, residual, y_d, weight_d, bias_d):
        if tail == "two_bn":
            shortcut = (y_d, stats(y_d), weight_d, bias_d, 1e-5)
            return bn_ops.bn_train_act(y, stats(y), weight, bias, 1e-5, None, shortcut)
        r = residual if tail == "residual" else None
        return bn_ops.bn_train_act(y, stats(y), weight, bias, 1e-5, r)

    torch.autograd.gradcheck(f, (y, weight, bias, residual, y_d, weight_d, bias_d))


def test_without_the_extension_the_package_falls_back_to_torch():
    """Where fastres._C is missing, fastres imports, 'auto' runs the oracle, and says why."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "fastres._C":
                    raise ImportError("simulated: not built")

        sys.meta_path.insert(0, Block())
        import torch, fastres
        from fastres import backends

        status = fastres.available_backends()["native"]
        assert not status.available and "fastres._C" in status.reason, status
        assert backends.resolve("auto", torch.device("cpu")).name == "torch"
        fastres.ResNet(18).eval()(torch.randn(1, 3, 32, 32))
        try:
            fastres.ResNet(18, backend="native")
        except RuntimeError as exc:
            assert "fastres._C" in str(exc)
        else:
            raise AssertionError("an explicit 'native' backend must fail without the extension")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTRES_BACKEND"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
