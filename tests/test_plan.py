"""Kept plans (fastres/backends/plan.py, `kept_plan`): a block keeps its plan, and its model the
stem's units, from one forward to the next, and builds them again after the module structure
changed, so that a forward never runs a module that is no longer the model's.

Each test runs a forward (which keeps the plans), changes the structure one way a user or a
library does, and checks the next forward against the oracle run on a copy of the changed
model (docs/contract.md §3, float32), on every backend ('triton' under the interpreter on CPU:
tiny models).
"""

from __future__ import annotations

import copy
import pickle
import weakref

import pytest
import torch
from torch import nn

import fastres
from fastres.backends import plan as plans
from fastres.testing import assert_matches_oracle, randomize_norms

BACKENDS = ["torch", "native", "triton", "auto"]
# Two stages: the second stage's first block has the downsample shortcut; avg_down gives it a pool.
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
    status = fastres.available_backends().get(request.param)
    if status is not None and not status.available:
        pytest.skip(status.reason)
    if request.param == "auto":  # the default candidates: nothing timed
        from fastres.backends import select
        from fastres.ops import tuning

        monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
        monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
        monkeypatch.delenv(select.SELECT_ENV_VAR, raising=False)
        monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    return request.param


def build(backend: str, ctor=fastres.ResNet, **kwargs) -> nn.Module:
    kwargs = {"depth": 18, **TWO_STAGES, **kwargs}
    return randomize_norms(ctor(**kwargs, backend="torch")).eval().set_backend(backend)


def new_like(module: nn.Module) -> nn.Module:
    """A new conv or BatchNorm of the same configuration with other random weights (and
    statistics)."""
    fresh = copy.deepcopy(module)
    if isinstance(fresh, nn.Conv2d):
        with torch.no_grad():
            fresh.weight.copy_(torch.randn_like(fresh.weight) * fresh.weight.std())
        return fresh
    return randomize_norms(fresh)


def assert_matches_modules(model: nn.Module, x: torch.Tensor) -> None:
    """The model's forward agrees with the oracle run on a copy (which builds its own plans)."""
    with torch.no_grad():
        out = model(x)
        base = copy.deepcopy(model).set_backend("torch")(x)
        gold = copy.deepcopy(model).double().set_backend("torch")(x.double())
    for i, (a, b, g) in enumerate(zip(out, base, gold, strict=True)):
        assert_matches_oracle(a, b, g, torch.float32, f"output {i}")


def forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def test_plans_are_kept_between_forwards():
    model = build("torch", avg_down=True, deep_stem=True)
    forward(model, torch.randn(2, 3, 32, 32))
    for block in (model.layer1[0], model.layer2[0]):
        assert block.plan() is block.plan()
    assert model.stem_units() is model.stem_units()


@pytest.mark.parametrize(
    "where",
    ["conv_assigned", "norm_added", "container_item", "sync_bn_converted", "stem_conv"],
)
def test_replaced_submodule_is_run(backend, where):
    """Whatever replaces a submodule after a forward, the next forward runs the new one."""
    model = build(backend, avg_down=True)
    x = torch.randn(2, 3, 32, 32)
    forward(model, x)
    block = model.layer2[0]
    kept = block.plan()
    assert block.plan() is kept
    if where == "conv_assigned":
        block.conv2 = new_like(block.conv2)
    elif where == "norm_added":
        block.add_module(block.norm1_name, new_like(block.norm1))
    elif where == "container_item":  # the shortcut's BN, inside the downsample Sequential
        block.downsample[2] = new_like(block.downsample[2])
    elif where == "sync_bn_converted":  # every BN replaced by a SyncBatchNorm copy of it
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    else:
        model.conv1 = new_like(model.conv1)
    assert block.plan() is not kept
    if where == "sync_bn_converted":
        assert all(isinstance(u.norm, nn.SyncBatchNorm) for u in block.plan().units)
        with torch.no_grad():  # the copies' statistics, not the replaced BNs', must be used
            for u in block.plan().units:
                u.norm.running_mean.add_(1.0)
    assert_matches_modules(model, x)


def test_deleted_submodule_is_not_run(backend):
    """A forward after `del block.conv1` fails as PyTorch's would, rather than running the
    deleted convolution; assigned again, the new one runs."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    forward(model, x)
    block = model.layer1[1]
    del block.conv1
    with pytest.raises(AttributeError, match="conv1"):
        forward(model, x)
    block.conv1 = conv = new_like(model.layer1[0].conv1)
    assert block.plan().units[0].conv is conv
    assert_matches_modules(model, x)


def test_write_past_the_registration_is_seen_after_refresh(backend):
    """A submodule written into a container's dict directly (no registration: what deleting
    one from inside a container amounts to) is seen after `model.refresh()`."""
    model = build(backend)
    x = torch.randn(2, 3, 32, 32)
    forward(model, x)
    block = model.layer1[0]
    conv = new_like(block.conv2)
    block._modules["conv2"] = conv
    assert model.refresh() is model
    assert block.plan().units[1].conv is conv
    assert_matches_modules(model, x)


def test_res2net_plan_is_kept_without_a_reference_cycle():
    """A Bottle2neck's kept plan refers to the block weakly: a deleted model is freed at once,
    not at the garbage collector's next pass."""
    one_stage = dict(num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,))
    model = build("torch", fastres.Res2Net, depth=50, **one_stage)
    forward(model, torch.randn(1, 3, 32, 32))
    block = model.layer1[0]
    assert block.plan() is block.plan() and block.plan().res2net is block
    gone = weakref.ref(block)
    del model, block
    assert gone() is None


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_build_their_own_plans(how):
    """A copy does not carry the original's kept plans or bound backend (they name the
    original's modules and this process's backends): it builds and binds its own."""
    model = build("torch")
    x = torch.randn(2, 3, 32, 32)
    forward(model, x)
    block = model.layer1[0]
    assert plans.KEPT_PLAN in block.__dict__
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    clone_block = clone.layer1[0]
    assert plans.KEPT_PLAN not in clone_block.__dict__
    assert fastres.backends.BOUND not in clone_block.__dict__
    assert clone_block.plan().units[0].conv is clone_block.conv1
    with torch.no_grad():
        clone.layer1[0].conv1.weight.mul_(2)  # the copy's modules, not the original's, run
    assert_matches_modules(clone, x)
