"""docs/contract.md §3: backend selection, FASTRES_BACKEND, available_backends()."""

import copy

import pytest
import torch

import fastres
from fastres import backends
from fastres.testing import TOLERANCE, OpRecorder, randomize_norms, relative_error


@pytest.fixture
def no_native(monkeypatch):
    """Pretends the extension is missing, whatever this machine has."""
    native = backends._REGISTRY["native"]
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type=None: "not built (test)")
    return native


def test_available_backends_reports_every_backend_with_a_reason():
    status = fastres.available_backends()
    assert set(status) == {"torch", "native", "triton"}
    assert status["torch"].available
    for name, s in status.items():
        assert isinstance(s.available, bool) and s.reason, name
        assert s.available == (s.reason == "available")


def test_explicit_backend_that_cannot_run_raises_with_the_reason(no_native):
    assert not fastres.available_backends()["native"].available
    with pytest.raises(RuntimeError, match=r"backend 'native' cannot run here: not built \(test\)"):
        fastres.ResNet(depth=18, backend="native")
    model = fastres.ResNet(depth=18)
    with pytest.raises(RuntimeError, match="not built"):
        model.set_backend("native")


def test_auto_falls_back_to_torch_without_error(no_native):
    model = fastres.ResNet(depth=18, base_channels=8).eval()
    assert model.backend == "auto"
    assert backends.resolve("auto", torch.device("cpu")).name == "torch"
    assert model(torch.randn(1, 3, 32, 32))[0].shape == (1, 8, 8, 8)


def test_auto_selects_on_cpu_when_native_can_run_with_native_its_default(monkeypatch):
    native = backends._REGISTRY["native"]
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type=None: None)
    auto = backends.resolve("auto", torch.device("cpu"))
    assert auto.name == "auto"
    assert auto.default(torch.device("cpu")) is native


def test_environment_variable_overrides_the_default(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    model = fastres.ResNet(depth=18)
    assert model.backend == "torch"
    assert all(b.backend == "torch" for layer in (model.layer1, model.layer4) for b in layer)
    monkeypatch.setenv("FASTRES_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"FASTRES_BACKEND='fast'.*auto, torch, native, triton"):
        fastres.ResNet(depth=18)


def test_environment_variable_naming_a_backend_that_cannot_run_raises(monkeypatch, no_native):
    monkeypatch.setenv("FASTRES_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native"):
        fastres.ResNet(depth=18)


def test_set_backend_reaches_every_block_and_keeps_results():
    model = fastres.Res2Net(depth=50, base_channels=8).eval()
    x = torch.randn(1, 3, 32, 32)
    expected = model.set_backend("torch")(x)
    assert all(
        b.backend == "torch" for b in model.modules() if isinstance(b, fastres.models.ResBlock)
    )
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        model.set_backend("gpu")
    assert model.backend == "torch"  # a rejected change leaves the model as it was
    for a, b in zip(model(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_backend_on_a_device_it_cannot_run_on(monkeypatch):
    native = backends._REGISTRY["native"]
    monkeypatch.setattr(
        native,
        "unavailable_reason",
        lambda device_type=None: "no cpu" if device_type == "cpu" else None,
    )
    with pytest.raises(RuntimeError, match=r"'native' cannot run on cpu tensors: no cpu"):
        backends.resolve("native", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("arch", ["resnet", "res2net"])
def test_detection_training_runs_fused(backend, arch):
    """mmdet's backbone training (frozen_stages=1, norm_eval: every BatchNorm frozen) runs the
    fused BN-frozen path in forward and backward: no PyTorch BatchNorm or ReLU backward (the
    norms run inside the backend's own ops), and the gradients match the oracle."""
    status = fastres.available_backends()[backend]
    if not status.available:
        pytest.skip(status.reason)
    cls = fastres.ResNet if arch == "resnet" else fastres.Res2Net
    two_stages = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))
    model = cls(depth=50, base_channels=8, frozen_stages=1, norm_eval=True, **two_stages)
    randomize_norms(model.train()).double()
    oracle = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with OpRecorder() as recorder:
        grads = _step(model.set_backend(backend), x)
    gold = _step(oracle.set_backend("torch"), x)
    # No PyTorch BatchNorm, no PyTorch ReLU backward on native (its ReLUs' gradients are inside
    # bn_backward); the triton backend's fused conv computes its ReLU's gradient with
    # threshold_backward (as eager's ReLU backward does), so there no PyTorch ReLU forward.
    unfused = ("batch_norm", "threshold_backward" if backend == "native" else "aten.relu")
    assert not [op for op in recorder.ops if any(name in op for name in unfused)]
    # native: the frozen BNs' apply and its backward in one autograd op (bn_train_act: the
    # bn_apply forward, the bn_backward backward).
    fused = (
        ["fastres.bn_train_act.default", "fastres.bn_backward.default"]
        if backend == "native"
        else ["fastres.conv2d_fused.default"]
    )
    assert all(op in recorder.ops for op in fused)
    for a, b in zip(grads, gold, strict=True):
        assert relative_error(a, b) <= TOLERANCE[torch.float64]


def _step(model, x):
    """The stage outputs and the gradients of the trainable parameters after one backward."""
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    return [*outs, *(p.grad for p in model.parameters() if p.requires_grad)]


def test_backend_is_bound_once_per_name_and_device(monkeypatch):
    """A model and each block resolve their backend once per (name, device), not per forward;
    `set_backend`, an assignment to one block's `backend` and another device are seen at the
    next forward."""
    two_stages = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))
    model = fastres.ResNet(depth=18, base_channels=8, **two_stages, backend="torch").eval()
    blocks = [m for m in model.modules() if isinstance(m, fastres.models.ResBlock)]
    x = torch.randn(1, 3, 32, 32)
    resolved, ran = [], []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *args: resolved.append(args) or resolve(*args))
    for backend in (backends.ORACLE, backends._REGISTRY["native"]):
        run_block = backend.run_block
        monkeypatch.setattr(backend, "run_block", lambda b, x, run=run_block, name=backend.name:
                            ran.append((b, name)) or run(b, x))  # fmt: skip

    def forward() -> list[tuple]:
        resolved.clear()
        ran.clear()
        with torch.no_grad():
            model(x)
        return resolved[:]

    assert len(forward()) == 1 + len(blocks)  # the model (its stem) and each block
    assert forward() == [] and ran == [(b, "torch") for b in blocks]
    if not fastres.available_backends()["native"].available:
        return
    model.set_backend("native")
    assert len(forward()) == 1 + len(blocks)
    assert ran == [(b, "native") for b in blocks]
    blocks[1].backend = "torch"
    assert forward() == [("torch", x.device)]
    assert ran == [(b, "torch" if b is blocks[1] else "native") for b in blocks]
    model.to("meta")
    with pytest.raises(RuntimeError, match="'native' cannot run on meta tensors"), torch.no_grad():
        model(x.to("meta"))
