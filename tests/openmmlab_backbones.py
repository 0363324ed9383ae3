"""OpenMMLab's own backbones (mmdet 3.x, mmpretrain 1.x), to test fastres against.

Their `models` packages import mmcv's compiled ops on import, which the pure-Python mmcv-lite
lacks; the backbone modules themselves need only mmcv.cnn and mmengine. So the parent packages
are stood in for by empty ones (with the real folder as their path) and the backbone modules
are imported directly, registering themselves in the libraries' MODELS registries as usual.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import SimpleNamespace

import torch
from torch import nn

from fastres.testing import TOLERANCE, randomize_norms, relative_error


def _empty_package(name: str) -> types.ModuleType:
    """`name` as a package without its __init__ (submodules still import from its folder)."""
    if name in sys.modules:
        return sys.modules[name]
    parent, _, leaf = name.rpartition(".")
    module = types.ModuleType(name)
    module.__path__ = [f"{sys.modules[parent].__path__[0]}/{leaf}"]
    module.__package__ = name
    sys.modules[name] = module
    setattr(sys.modules[parent], leaf, module)
    return module


def _installed(*names: str) -> bool:
    try:
        for name in names:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


def mmdet_backbones() -> SimpleNamespace | None:
    """mmdet's ResNet, ResNetV1d and Res2Net classes, or None where mmdet is not installed."""
    if not _installed("mmengine", "mmcv.cnn", "mmdet"):
        return None
    for name in ("mmdet.models", "mmdet.models.backbones", "mmdet.models.layers", "mmdet.utils"):
        _empty_package(name)
    typing_utils = importlib.import_module("mmdet.utils.typing_utils")
    vars(sys.modules["mmdet.utils"]).update(
        {k: v for k, v in vars(typing_utils).items() if not k.startswith("_")}
    )
    res_layer = importlib.import_module("mmdet.models.layers.res_layer")
    sys.modules["mmdet.models.layers"].ResLayer = res_layer.ResLayer
    resnet = importlib.import_module("mmdet.models.backbones.resnet")
    res2net = importlib.import_module("mmdet.models.backbones.res2net")
    return SimpleNamespace(
        ResNet=resnet.ResNet, ResNetV1d=resnet.ResNetV1d, Res2Net=res2net.Res2Net
    )


def mmpretrain_backbones() -> SimpleNamespace | None:
    """mmpretrain's ResNet, ResNetV1c, ResNetV1d and Res2Net, or None where not installed."""
    if not _installed("mmengine", "mmcv.cnn", "mmpretrain"):
        return None
    for name in ("mmpretrain.models", "mmpretrain.models.backbones"):
        _empty_package(name)
    resnet = importlib.import_module("mmpretrain.models.backbones.resnet")
    res2net = importlib.import_module("mmpretrain.models.backbones.res2net")
    return SimpleNamespace(
        ResNet=resnet.ResNet,
        ResNetV1c=resnet.ResNetV1c,
        ResNetV1d=resnet.ResNetV1d,
        Res2Net=res2net.Res2Net,
    )


def randomize_weights(model: nn.Module) -> nn.Module:
    """Every parameter and statistic random, so that each one shows where it goes."""
    randomize_norms(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn_like(m.weight) * (2 / m.weight[0].numel()) ** 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """The float64 rule of fastres.testing: the two compute the same math."""
    err = relative_error(a, b)
    assert err <= TOLERANCE[torch.float64], f"{what}: relative error {err:.2e}"
