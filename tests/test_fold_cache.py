"""The fused backends' folded-weight caches (fastres/backends/fold_cache.py) never hand out
folds of weights that have changed since.

Each test runs an eval forward (which folds and caches every eval-mode BatchNorm), changes the
weights one way a training script does, and checks the next eval forward against the oracle on
the new weights (docs/contract.md §3, float32): on 'native', 'auto' and 'triton' (under the
interpreter on CPU: tiny two-stage models).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastres
from fastres.backends import select
from fastres.ops import tuning
from fastres.testing import assert_matches_oracle, randomize_norms

# "auto-native": 'auto' forced to native's units that are not prepacked: eval units as one
# convolution with the BN folded in, in the compute dtype (what native runs on CUDA).
BACKENDS = ["native", "auto", "auto-native", "triton"]
TWO_STAGES = dict(
    base_channels=8,
    num_stages=2,
    strides=(1, 2),
    dilations=(1, 1),
    out_indices=(0, 1),
    zero_init_residual=False,
    norm_eval=False,
)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch, tmp_path) -> str:
    name = request.param
    status = fastres.available_backends().get(name)
    if status is not None and not status.available:
        pytest.skip(status.reason)
    if name.startswith("auto"):
        untimed_auto(monkeypatch, tmp_path)
    if name == "auto-native":
        monkeypatch.setenv(select.SELECT_ENV_VAR, "native")
        return "auto"
    return name


def untimed_auto(monkeypatch, tmp_path) -> None:
    """'auto' with nothing chosen or timed: the default candidates, whose eval units fold
    (prepacked oneDNN on CPU)."""
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    monkeypatch.delenv(select.SELECT_ENV_VAR, raising=False)
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))


def build(backend: str, ctor=fastres.ResNet, **kwargs) -> nn.Module:
    """A small model in eval mode whose BatchNorms all matter, on `backend`."""
    kwargs = {"depth": 18, **TWO_STAGES, **kwargs}
    return randomize_norms(ctor(**kwargs, backend="torch")).eval().set_backend(backend)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def warm(model: nn.Module, x: torch.Tensor) -> None:
    """An eval forward: every fused unit folds its BatchNorm and caches the fold."""
    with torch.no_grad():
        model(x)


def assert_matches_weights(model: nn.Module, x: torch.Tensor) -> None:
    """The model's eval forward agrees with the oracle run on its current weights."""
    with torch.no_grad():
        out = as_tuple(model(x))
        base = as_tuple(copy.deepcopy(model).set_backend("torch")(x))
        gold = as_tuple(copy.deepcopy(model).double().set_backend("torch")(x.double()))
    for i, (a, b, g) in enumerate(zip(out, base, gold, strict=True)):
        assert_matches_oracle(a, b, g, torch.float32, f"output {i}")


def random_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fused_optimizer_step(backend, optimizer):
    """Fused optimizers write the parameters without bumping their versions; validation
    right after such a step is the ordinary case. (No train() / eval() switch here: only the
    step itself tells.)"""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    random_grads(model)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, fused=True)
    opt.step()
    assert_matches_weights(model, x)


def test_fused_optimizer_step_res2net(backend):
    """The same for Res2Net, whose triton blocks cache their launch weights as well."""
    one_stage = dict(num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,))
    model = build(backend, fastres.Res2Net, depth=50, **one_stage)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    random_grads(model)
    torch.optim.SGD(model.parameters(), lr=1e-2, fused=True).step()
    assert_matches_weights(model, x)


def test_batchnorm_modules_training_forward(backend):
    """nn.BatchNorm2d's own training forward (the 'torch' backend, or a block where 'auto'
    chose the oracle) updates the running statistics without bumping their versions; here
    the BNs are switched by hand, so no model-level train() / eval() tells either."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model.set_backend("torch")
    for bn in bns:
        bn.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    for bn in bns:
        bn.eval()
    model.set_backend(backend)
    assert_matches_weights(model, x)


def test_training_forward_between_eval_forwards(backend):
    """eval -> a training step with batch statistics (norm_eval=False) on the model's own
    backend -> eval."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    model.train()
    sum(o.sum() for o in model(torch.randn(4, 3, 32, 32))).backward()
    model.eval()
    assert_matches_weights(model, x)


def test_training_forward_where_auto_chose_the_oracle(monkeypatch, tmp_path):
    """The same on 'auto' where the training blocks chose the oracle, whose nn.BatchNorm2d
    moves the running statistics without a version bump."""
    untimed_auto(monkeypatch, tmp_path)
    model = build("auto")
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    model.train()
    with monkeypatch.context() as m:
        m.setenv(select.SELECT_ENV_VAR, "torch")
        sum(o.sum() for o in model(torch.randn(4, 3, 32, 32))).backward()
    model.eval()
    assert_matches_weights(model, x)


@pytest.mark.parametrize("assign", [False, True])
def test_load_state_dict(backend, assign):
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    other = build("torch")
    model.load_state_dict(other.state_dict(), assign=assign)
    assert_matches_weights(model, x)


def test_dtype_round_trip(backend):
    """`.to()` replaces each tensor (a new storage, which may be the freed old one's, the
    version kept): float32 -> bfloat16 -> float32 rounds the weights."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    model.to(torch.bfloat16).to(torch.float32)
    assert_matches_weights(model, x)


def test_hand_written_update_seen_at_eval(backend):
    """A hand-written optimizer writing through `.data` (no version bump) during training:
    the switch back to eval() tells."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    model.train()
    random_grads(model)
    for p in model.parameters():
        p.data.sub_(1e-2 * p.grad)
    model.eval()
    assert_matches_weights(model, x)


def test_data_write_ema_seen_after_the_optimizer_step(backend):
    """Older EMA code: after each optimizer step, the EMA copy (always in eval mode) moves
    through `.data`. Any optimizer step in the process makes every fold stale."""
    model = build(backend)
    ema = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    warm(ema, x)
    random_grads(model)
    torch.optim.SGD(model.parameters(), lr=1e-2).step()
    for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
        p_ema.data.mul_(0.5).add_(p.data, alpha=0.5)
    assert_matches_weights(ema, x)


def test_data_write_then_refresh(backend):
    """A write through `.data` with nothing else happening cannot be seen: `refresh()` drops
    the model's folds."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    warm(model, x)
    for p in model.parameters():
        p.data.add_(torch.randn_like(p), alpha=1e-2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.data.mul_(1.5)
    assert model.refresh() is model
    assert_matches_weights(model, x)


def test_cudnn_units_fold_cache():
    """native's cuDNN units ('auto' on CUDA) keep their own folds: checked here on CPU tensors,
    where the cache works the same (only its convolutions need CUDA)."""
    from fastres.backends import native
    from fastres.backends.folding import fold

    block = build("torch").layer1[0]
    conv, bn = block.conv1, block.bn1
    native._plain_folded(conv, bn, torch.float32)
    random_grads(block)
    torch.optim.Adam(block.parameters(), lr=1e-2, fused=True).step()
    weight, bias = native._plain_folded(conv, bn, torch.float32)
    with torch.no_grad():
        expected_weight, expected_bias = fold(conv, bn, torch.float32)
    torch.testing.assert_close(weight, expected_weight)
    torch.testing.assert_close(bias, expected_bias)


def _autocast_matches_weights(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The eval forward under CPU bf16 autocast agrees with the oracle's on the current
    weights (base: the oracle under the same autocast; gold: float64); returns its ops."""
    from fastres.testing import OpRecorder

    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with OpRecorder() as recorder:
                out = as_tuple(model(x))
            base = as_tuple(copy.deepcopy(model).set_backend("torch")(x))
        gold = as_tuple(copy.deepcopy(model).double().set_backend("torch")(x.double()))
    for i, (a, b, g) in enumerate(zip(out, base, gold, strict=True)):
        assert_matches_oracle(a, b, g, torch.bfloat16, f"output {i}")
    return recorder.ops


@pytest.mark.parametrize("change", ["sgd_step", "load_state_dict", "training_forward"])
def test_folded_in_the_autocast_dtype_is_never_stale(change):
    """native's eval units under autocast (the path CUDA runs, here on CPU): the BN folded into
    the convolution's weight and bias in bf16, no BatchNorm op, and a fresh fold after each
    change (changes large enough to show through bf16's tolerance)."""
    model = build("native")
    x = torch.randn(2, 3, 32, 32)
    ops = _autocast_matches_weights(model, x)
    assert not [op for op in ops if "batch_norm" in op or "bn_" in op], ops
    if change == "sgd_step":
        random_grads(model)
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    elif change == "load_state_dict":
        model.load_state_dict(build("torch").state_dict())
    else:
        model.train()
        sum(o.sum() for o in model(torch.randn(4, 3, 32, 32) * 3 + 1)).backward()
        model.eval()
    _autocast_matches_weights(model, x)


def test_folded_float64():
    """float64 models (never prepacked) fold in float64."""
    model = build("native").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = as_tuple(model(x))
        gold = as_tuple(copy.deepcopy(model).set_backend("torch")(x))
    for i, (a, g) in enumerate(zip(out, gold, strict=True)):
        assert_matches_oracle(a, g, g, torch.float64, f"output {i}")
