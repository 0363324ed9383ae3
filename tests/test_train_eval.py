"""docs/contract.md §2: train / eval, norm_eval, frozen stages, requires_grad, with_cp."""

import pytest
import torch
from torch import nn

import fastres
from fastres.testing import randomize_norms


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def stats(module: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in batchnorms(module) for t in (m.running_mean, m.running_var)]


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()


def stem_modules(model):
    return [model.stem] if model.deep_stem else [model.conv1, model.bn1]


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval(norm_eval):
    model = fastres.ResNet(depth=18, norm_eval=norm_eval, zero_init_residual=False)
    model.train()
    assert model.training
    assert all(m.training != norm_eval for m in batchnorms(model))
    assert all(m.training for m in model.modules() if isinstance(m, nn.Conv2d))
    before = stats(model)
    train_step(model, torch.randn(2, 3, 32, 32))
    moved = [not torch.equal(a, b) for a, b in zip(before, stats(model))]
    assert all(moved) if not norm_eval else not any(moved)
    # BN affine parameters learn in both cases
    assert all(
        m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in batchnorms(model)
    )
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("frozen_stages", [0, 1, 3])
@pytest.mark.parametrize("deep_stem", [False, True])
def test_frozen_stages(frozen_stages, deep_stem):
    model = fastres.ResNet(
        depth=50,
        base_channels=16,
        deep_stem=deep_stem,
        frozen_stages=frozen_stages,
        norm_eval=False,
        zero_init_residual=False,
    )
    model.train()  # freezing is re-applied on every train()
    frozen = stem_modules(model) + [
        getattr(model, f"layer{i}") for i in range(1, frozen_stages + 1)
    ]
    free = [getattr(model, f"layer{i}") for i in range(frozen_stages + 1, 5)]
    for part in frozen:
        # As OpenMMLab's: the plain stem's conv keeps its training flag (a conv has no mode).
        assert part is getattr(model, "conv1", None) or not any(m.training for m in part.modules())
        assert not any(p.requires_grad for p in part.parameters())
    for part in free:
        assert all(m.training for m in part.modules())
        assert all(p.requires_grad for p in part.parameters())
    frozen_before = [stats(p) for p in frozen]
    free_before = [stats(p) for p in free]
    train_step(model, torch.randn(2, 3, 32, 32))
    for part, before in zip(frozen, frozen_before):
        assert all(p.grad is None for p in part.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, stats(part)))
    for part, before in zip(free, free_before):
        assert all(p.grad is not None for p in part.parameters())
        assert not any(torch.equal(a, b) for a, b in zip(before, stats(part)))


def test_frozen_stages_survive_train_calls_and_eval():
    model = fastres.ResNet(depth=18, frozen_stages=2, norm_eval=False)
    model.eval()
    model.train(True)
    assert not model.layer2.training and model.layer3.training
    assert not model.bn1.training and not model.conv1.weight.requires_grad


def test_norm_requires_grad_false_freezes_affine_only():
    model = fastres.ResNet(
        depth=18,
        norm_cfg=dict(type="BN", requires_grad=False),
        norm_eval=False,
        zero_init_residual=False,
    ).train()
    before = stats(model)
    train_step(model, torch.randn(2, 3, 32, 32))
    assert all(m.weight.grad is None and m.bias.grad is None for m in batchnorms(model))
    assert model.layer1[0].conv1.weight.grad is not None
    assert not any(torch.equal(a, b) for a, b in zip(before, stats(model)))


def test_running_stats_follow_batchnorm_momentum_none():
    model = fastres.ResNet(
        depth=18, norm_cfg=dict(type="BN", momentum=None), norm_eval=False
    ).train()
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    # the stem BN sees conv1(x): its cumulative average is the mean of the two batch statistics
    with torch.no_grad():
        m1 = model.conv1(x1).mean((0, 2, 3))
        m2 = model.conv1(x2).mean((0, 2, 3))
    model(x1)
    model(x2)
    torch.testing.assert_close(model.bn1.running_mean, (m1 + m2) / 2)
    assert model.bn1.num_batches_tracked.item() == 2


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (fastres.ResNet, dict(depth=18)),
        (fastres.ResNet, dict(depth=50)),
        (fastres.Res2Net, dict(depth=50)),
    ],
    ids=["resnet18", "resnet50", "res2net50"],
)
def test_with_cp_equals_plain_run(cls, kwargs):
    """Outputs, every gradient and the running statistics (updated once, not twice)."""
    runs = []
    for with_cp in (False, True):
        torch.manual_seed(0)
        model = cls(
            with_cp=with_cp, norm_eval=False, zero_init_residual=False, base_channels=16, **kwargs
        )
        randomize_norms(model, seed=1).double().train()
        x = torch.randn(
            2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
        )
        x.requires_grad_(True)
        outs = model(x)
        sum((o * o).mean() for o in outs).backward()
        runs.append(
            (outs, x.grad, {n: p.grad for n, p in model.named_parameters()}, model.state_dict())
        )
    (o0, g0, p0, s0), (o1, g1, p1, s1) = runs
    for a, b in zip(o0, o1):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g0, g1)
    for name in p0:
        torch.testing.assert_close(p0[name], p1[name], msg=name)
    for name in s0:
        torch.testing.assert_close(s0[name], s1[name], msg=name)


def test_with_cp_only_checkpoints_when_input_requires_grad():
    model = fastres.ResNet(depth=18, with_cp=True).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert outs[0].grad_fn is None
