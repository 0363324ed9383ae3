"""Drop-in fidelity against OpenMMLab's own backbones (mmdet 3.3, mmpretrain 1.2).

Each case builds the OpenMMLab module and the fastres model with the same arguments, gives the
OpenMMLab one random weights and statistics, loads its real state_dict into fastres (through
`load_checkpoint`, as a user would), and then compares, in float64: the module tree, the
state_dict and parameter order (an optimizer state saved by OpenMMLab maps onto parameters by
index), requires_grad and train/eval flags, outputs, gradients and running statistics. fastres
runs on its default backend, the fused one.

Skipped where the OpenMMLab packages are not installed; `scripts/setup_env.sh` installs them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from openmmlab_backbones import (
    assert_close,
    mmdet_backbones,
    mmpretrain_backbones,
    randomize_weights,
)
from torch import nn

import fastres
from fastres.testing import OpRecorder

MMDET = mmdet_backbones()
MMPRETRAIN = mmpretrain_backbones()
LIBRARIES = {"mmdet": MMDET, "mmpretrain": MMPRETRAIN}

# Narrow models (base_channels 16, Res2Net width 6 * 2^stage) keep float64 on CPU fast.
SMALL = dict(stem_channels=16, base_channels=16)
R2N = dict(SMALL, scales=4, base_width=6)
GN = dict(type="GN", num_groups=4, requires_grad=True)
STAGES3 = dict(num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(0, 1, 2))
DILATED = dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2))
MMPRETRAIN_TREE = dict(module_tree="mmpretrain")

# (library, class name, fastres class, arguments given to both, fastres-only arguments)
CASES = {
    "mmdet-resnet18": ("mmdet", "ResNet", fastres.ResNet, dict(depth=18, **SMALL), {}),
    "mmdet-resnet50": ("mmdet", "ResNet", fastres.ResNet, dict(depth=50, **SMALL), {}),
    "mmdet-resnet50-caffe-frozen1": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, style="caffe", frozen_stages=1, **SMALL),
        {},
    ),
    "mmdet-resnet50-out-indices-3-1": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, out_indices=(3, 1), **SMALL),
        {},
    ),
    "mmdet-resnet50-dilated-avg-down": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, avg_down=True, deep_stem=True, **DILATED, **SMALL),
        {},
    ),
    "mmdet-resnet50-gn-train-norms": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, norm_cfg=GN, norm_eval=False, **SMALL),
        {},
    ),
    "mmdet-resnet50-bn-frozen-affine": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, norm_cfg=dict(type="BN", requires_grad=False), **SMALL),
        {},
    ),
    "mmdet-resnet101-3-stages-cp": (
        "mmdet",
        "ResNet",
        fastres.ResNet,
        dict(depth=101, with_cp=True, norm_eval=False, **STAGES3, **SMALL),
        {},
    ),
    "mmdet-resnet50-v1d": ("mmdet", "ResNetV1d", fastres.ResNetV1d, dict(depth=50, **SMALL), {}),
    "mmdet-res2net50": ("mmdet", "Res2Net", fastres.Res2Net, dict(depth=50, **R2N), {}),
    # mmdet's Res2Net ignores style, deep_stem and avg_down (always pytorch, True, True).
    "mmdet-res2net101-frozen2": (
        "mmdet",
        "Res2Net",
        fastres.Res2Net,
        dict(depth=101, frozen_stages=2, norm_eval=False, **STAGES3, **R2N),
        {},
    ),
    # mmpretrain's defaults differ from mmdet's (out_indices=(3,), norm_eval=False, its module
    # tree): the cases name them; the registry plugin applies them (test_openmmlab_registry.py).
    "mmpretrain-resnet50": (
        "mmpretrain",
        "ResNet",
        fastres.ResNet,
        dict(depth=50, out_indices=(0, 1, 2, 3), norm_eval=False, **SMALL),
        MMPRETRAIN_TREE,
    ),
    "mmpretrain-resnet50-v1c-gn": (
        "mmpretrain",
        "ResNetV1c",
        fastres.ResNetV1c,
        dict(depth=50, out_indices=(3,), norm_eval=False, norm_cfg=GN, **SMALL),
        MMPRETRAIN_TREE,
    ),
    "mmpretrain-resnet50-v1d": (
        "mmpretrain",
        "ResNetV1d",
        fastres.ResNetV1d,
        dict(depth=50, out_indices=(0, 1, 2, 3), norm_eval=False, frozen_stages=1, **SMALL),
        MMPRETRAIN_TREE,
    ),
    # mmpretrain's weights in fastres' default (mmdet) tree: other names, the same model.
    "mmpretrain-resnet50-v1d-mmdet-tree": (
        "mmpretrain",
        "ResNetV1d",
        fastres.ResNetV1d,
        dict(depth=50, out_indices=(2, 3), norm_eval=True, frozen_stages=1, **SMALL),
        {},
    ),
    "mmpretrain-resnet34-v1d-dilated": (
        "mmpretrain",
        "ResNetV1d",
        fastres.ResNetV1d,
        dict(depth=34, out_indices=(3,), norm_eval=False, **DILATED, **SMALL),
        MMPRETRAIN_TREE,
    ),
    "mmpretrain-res2net50": (
        "mmpretrain",
        "Res2Net",
        fastres.Res2Net,
        dict(depth=50, out_indices=(0, 1, 2, 3), norm_eval=False, **R2N),
        dict(pool_last_chunk="always", **MMPRETRAIN_TREE),
    ),
    "mmpretrain-res2net50-caffe-plain": (
        "mmpretrain",
        "Res2Net",
        fastres.Res2Net,
        dict(
            depth=50,
            style="caffe",
            deep_stem=False,
            avg_down=False,
            out_indices=(1, 3),
            norm_eval=False,
            **R2N,
        ),
        dict(pool_last_chunk="always", **MMPRETRAIN_TREE),
    ),
}


def build_pair(case: str) -> tuple[nn.Module, nn.Module, bool]:
    """(OpenMMLab model, fastres model loaded from its state_dict, same key names)."""
    library, name, ours_cls, kwargs, ours_only = CASES[case]
    backbones = LIBRARIES[library]
    if backbones is None:
        pytest.skip(f"{library} is not installed (scripts/setup_env.sh installs it)")
    theirs = randomize_weights(getattr(backbones, name)(**kwargs)).double()
    ours = ours_cls(**kwargs, **ours_only).double()
    report = fastres.load_checkpoint(ours, theirs.state_dict())
    assert not (report.missing or report.unexpected or report.ignored or report.filled)
    # The mmdet tree names mmpretrain's deep stem ConvModules and its stride-1 avg_down
    # shortcuts otherwise.
    same_names = ours.module_tree == library or not (ours.deep_stem or ours.avg_down)
    return theirs, ours, same_names


def leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that compute: no containers, no Identity (mmpretrain's drop_path at rate 0),
    no identity pool (fastres' stride-1 avg_down pool, which mmpretrain leaves out)."""

    def computes(m: nn.Module) -> bool:
        if isinstance(m, nn.Identity):
            return False
        return not (isinstance(m, nn.AvgPool2d) and m.kernel_size in (1, (1, 1)))

    return [(n, m) for n, m in model.named_modules() if not list(m.children()) and computes(m)]


@pytest.mark.parametrize("case", CASES)
def test_module_tree_state_dict_and_parameter_order(case):
    theirs, ours, same_names = build_pair(case)
    ours_leaves, their_leaves = leaves(ours), leaves(theirs)
    assert [repr(m) for _, m in ours_leaves] == [repr(m) for _, m in their_leaves]
    if same_names:
        assert [n for n, _ in ours_leaves] == [n for n, _ in their_leaves]
        assert list(ours.state_dict()) == list(theirs.state_dict())
    # Values in order: the random values tell every tensor apart.
    ours_state, their_state = ours.state_dict(), theirs.state_dict()
    assert len(ours_state) == len(their_state)
    for (key, a), (their_key, b) in zip(ours_state.items(), their_state.items(), strict=True):
        assert torch.equal(a, b), f"state_dict entry {key} holds {their_key}"
    ours_params, their_params = list(ours.named_parameters()), list(theirs.named_parameters())
    assert len(ours_params) == len(their_params)
    for (key, a), (their_key, b) in zip(ours_params, their_params, strict=True):
        assert torch.equal(a, b), f"parameter {key} holds {their_key}"
        assert a.requires_grad == b.requires_grad, key
    for mode in (True, False):
        ours.train(mode), theirs.train(mode)
        assert [m.training for _, m in leaves(ours)] == [m.training for _, m in leaves(theirs)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES)
def test_outputs_gradients_and_running_statistics(case, train):
    theirs, ours = build_pair(case)[:2]
    ours.train(train), theirs.train(train)
    # OpenMMLab's with_cp updates the running statistics twice (forward and recomputation);
    # fastres keeps those of the run without checkpointing, which is what theirs gives then.
    for m in theirs.modules():
        if getattr(m, "with_cp", False):
            m.with_cp = False
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    outs = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        xr = x.clone().requires_grad_(train)
        with torch.set_grad_enabled(train):
            y = model(xr)
            if train:
                torch.manual_seed(0)
                sum((o * torch.randn_like(o)).sum() for o in y).backward()
        grads = [xr.grad] + [p.grad for p in model.parameters() if p.requires_grad] if train else []
        outs[name] = (y, grads, list(model.buffers()))
    (y, grads, buffers), (y_ref, grads_ref, buffers_ref) = outs["ours"], outs["theirs"]
    assert len(y) == len(y_ref)
    for i, (a, b) in enumerate(zip(y, y_ref, strict=True)):
        assert_close(a, b, f"output {i}")
    assert len(grads) == len(grads_ref)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        assert_close(a, b, "input gradient" if i == 0 else f"gradient of parameter {i - 1}")
    for i, (a, b) in enumerate(zip(buffers, buffers_ref, strict=True)):
        if a.is_floating_point():
            assert_close(a, b, f"buffer {i}")
        else:
            assert torch.equal(a, b), f"buffer {i}"


def _eval_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_eval_outputs(ours: nn.Module, theirs: nn.Module) -> None:
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    outs, refs = _eval_outputs(ours, x), _eval_outputs(theirs, x)
    assert len(outs) == len(refs)
    for i, (a, b) in enumerate(zip(outs, refs, strict=True)):
        assert_close(a, b, f"output {i}")


# The cases built with mmpretrain's module tree, and mmdet's (the default) V1d.
ROUND_TRIPS = [
    case for case, (*_, ours_only) in CASES.items() if ours_only.get("module_tree") == "mmpretrain"
] + ["mmdet-resnet50-v1d"]


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_checkpoints_go_both_ways_through_strict_load_state_dict(case):
    """A checkpoint moves between the library's module and fastres' through plain, strict
    `load_state_dict` (as mmengine's runner loads and resumes), and each model then computes
    what the one it came from does."""
    library, name, ours_cls, kwargs, ours_only = CASES[case]
    if LIBRARIES[library] is None:
        pytest.skip(f"{library} is not installed (scripts/setup_env.sh installs it)")
    theirs = randomize_weights(getattr(LIBRARIES[library], name)(**kwargs)).double()
    ours = ours_cls(**kwargs, **ours_only).double()
    ours.load_state_dict(theirs.state_dict())
    assert_same_eval_outputs(ours, theirs)

    source = randomize_weights(ours_cls(**kwargs, **ours_only)).double()
    theirs.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    assert_same_eval_outputs(source, theirs)


# Two stages: layer1's avg_down shortcut is at stride 1 (no pool in mmpretrain's tree), layer2's
# is strided (pooled); the deep stem is mmpretrain's ConvModules.
TWO_STAGES = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))
TREE_CASES = {
    "resnet50-v1d": ("ResNetV1d", fastres.ResNetV1d, dict(depth=50), {}),
    "res2net50": (
        "Res2Net",
        fastres.Res2Net,
        dict(depth=50, scales=4, base_width=6),
        dict(pool_last_chunk="always"),
    ),
}


@pytest.mark.parametrize("backend", ["torch", "native", "triton", "auto"])
@pytest.mark.parametrize("case", TREE_CASES)
def test_mmpretrain_tree_on_every_backend(case, backend):
    """mmpretrain's module tree, run by each backend in float64, against mmpretrain's module
    and the oracle: eval outputs, and in training (batch statistics) the outputs, every
    gradient and the running statistics."""
    if MMPRETRAIN is None:
        pytest.skip("mmpretrain is not installed (scripts/setup_env.sh installs it)")
    try:
        fastres.backends.resolve(backend, torch.device("cpu"))
    except RuntimeError as e:
        pytest.skip(str(e))
    name, ours_cls, kwargs, ours_only = TREE_CASES[case]
    kwargs = dict(kwargs, stem_channels=8, base_channels=8, norm_eval=False, **TWO_STAGES)
    theirs = randomize_weights(getattr(MMPRETRAIN, name)(**kwargs)).double()
    ours = ours_cls(**kwargs, **ours_only, module_tree="mmpretrain", backend=backend).double()
    ours.load_state_dict(theirs.state_dict())
    oracle = copy.deepcopy(ours).set_backend("torch")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for train in (False, True):
        results = {}
        for who, model in (("fastres", ours), ("oracle", oracle), ("mmpretrain", theirs)):
            model.train(train)
            xr = x.clone().requires_grad_(train)
            with torch.set_grad_enabled(train), OpRecorder() as recorder:
                y = model(xr)
                if train:
                    # Not randn_like: the same values whatever the output's memory format.
                    torch.manual_seed(0)
                    sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in y).backward()
            grads = [xr.grad] + [p.grad for p in model.parameters()] if train else []
            results[who] = (y, grads, list(model.buffers()), recorder.ops)
        mode = "train" if train else "eval"
        ops = results["fastres"][3]
        if backend in ("native", "triton"):
            assert any(op.startswith("fastres.") for op in ops), f"{mode}: nothing ran fused"
        if backend == "triton" and not train:
            assert "aten.convolution.default" not in ops, "eval: a convolution ran in PyTorch"
        y, grads, buffers, _ = results["fastres"]
        for ref in ("oracle", "mmpretrain"):
            y_ref, grads_ref, buffers_ref, _ = results[ref]
            for i, (a, b) in enumerate(zip(y, y_ref, strict=True)):
                assert_close(a, b, f"{mode} output {i} against {ref}")
            for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
                assert_close(a, b, f"gradient {i} against {ref}")
            for i, (a, b) in enumerate(zip(buffers, buffers_ref, strict=True)):
                if a.is_floating_point():
                    assert_close(a, b, f"{mode} buffer {i} against {ref}")
