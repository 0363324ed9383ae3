"""The OpenMMLab registry plugin (`fastres.openmmlab`): a config that switches one `type`.

Built as mmdet's and mmpretrain's tools build a model: mmengine's Config, its custom_imports,
the library's MODELS registry under the library's default scope. The model must be the one the
library builds from the same config: same defaults, same outputs once given the same weights.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from openmmlab_backbones import (
    assert_close,
    mmdet_backbones,
    mmpretrain_backbones,
    randomize_weights,
)

import fastres

MMDET, MMPRETRAIN = mmdet_backbones(), mmpretrain_backbones()
if MMDET is None or MMPRETRAIN is None:
    pytest.skip(
        "mmdet / mmpretrain not installed (scripts/setup_env.sh installs them)",
        allow_module_level=True,
    )

from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import BaseModule  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402
from mmengine.utils import import_modules_from_strings  # noqa: E402
from mmpretrain.registry import MODELS as MMPRETRAIN_MODELS  # noqa: E402

REGISTRIES = {"mmdet": MMDET_MODELS, "mmpretrain": MMPRETRAIN_MODELS}

# What the two libraries' configs write for their backbones (narrowed to keep the test fast),
# and the fastres type that replaces each.
CONFIGS = {
    "mmdet-faster-rcnn-r50": (
        "mmdet",
        dict(
            type="ResNet",
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            frozen_stages=1,
            norm_cfg=dict(type="BN", requires_grad=True),
            norm_eval=True,
            style="pytorch",
            base_channels=16,
        ),
        "fastres.ResNet",
    ),
    "mmdet-res2net50": (
        "mmdet",
        dict(type="Res2Net", depth=50, scales=4, base_width=6, base_channels=16),
        "fastres.Res2Net",
    ),
    "mmpretrain-resnet50": (
        "mmpretrain",
        dict(
            type="ResNet",
            depth=50,
            num_stages=4,
            style="pytorch",
            base_channels=16,
            stem_channels=16,
        ),
        "fastres.ResNet",
    ),
    "mmpretrain-resnetv1d50": (
        "mmpretrain",
        dict(type="ResNetV1d", depth=50, base_channels=16, stem_channels=16),
        "fastres.ResNetV1d",
    ),
    "mmpretrain-res2net50": (
        "mmpretrain",
        dict(type="Res2Net", depth=50, scales=4, base_width=6, base_channels=16, stem_channels=16),
        "fastres.Res2Net",
    ),
}


def build(library: str, backbone: dict) -> torch.nn.Module:
    """Builds `backbone` from a config as the library's tools do."""
    cfg = Config(
        dict(
            default_scope=library,
            custom_imports=dict(imports=["fastres.openmmlab"], allow_failed_imports=False),
            model=backbone,
        )
    )
    import_modules_from_strings(**cfg.custom_imports)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return REGISTRIES[library].build(cfg.model)


@pytest.mark.parametrize("config", CONFIGS)
def test_one_changed_type_builds_the_same_model(config):
    library, backbone, fastres_type = CONFIGS[config]
    theirs = build(library, backbone)
    ours = build(library, dict(backbone, type=fastres_type))
    assert isinstance(ours, fastres.ResNet)
    for name in ("depth", "out_indices", "norm_eval", "frozen_stages", "deep_stem", "avg_down"):
        assert getattr(ours, name) == getattr(theirs, name), name
    # The same module tree: checkpoints go both ways through strict load_state_dict (as the
    # runner loads and resumes them), and an optimizer state maps by index.
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.load_state_dict(randomize_weights(ours).state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    randomize_weights(theirs).double()
    ours.double().load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (False, True):
        ours.train(train), theirs.train(train)
        assert [m.training for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d)] == [
            m.training for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d)
        ]
        with torch.no_grad():
            outs, refs = ours(x), theirs(x)
        assert len(outs) == len(refs)
        for i, (a, b) in enumerate(zip(outs, refs, strict=True)):
            assert_close(a, b, f"{'train' if train else 'eval'} output {i}")


def test_without_a_scope_fastres_defaults_apply():
    import_modules_from_strings("fastres.openmmlab")
    model = MMPRETRAIN_MODELS.build(dict(type="fastres.Res2Net", depth=50, base_channels=16))
    assert model.out_indices == (0, 1, 2, 3) and model.norm_eval
    assert model.pool_last_chunk == "strided" and model.module_tree == "mmdet"


def test_mmpretrain_only_arguments():
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        import_modules_from_strings("fastres.openmmlab")
        config = dict(type="fastres.ResNet", depth=18, base_channels=16)
        model = MMPRETRAIN_MODELS.build(dict(config, drop_path_rate=0.0, expansion=1))
        assert model.out_indices == (3,) and model.module_tree == "mmpretrain"
        model = MMPRETRAIN_MODELS.build(dict(config, module_tree="mmdet"))
        assert model.module_tree == "mmdet"
        with pytest.raises(NotImplementedError, match=r"drop_path_rate=0.1 .*only 0"):
            MMPRETRAIN_MODELS.build(dict(config, drop_path_rate=0.1))
        with pytest.raises(NotImplementedError, match=r"expansion=2 .*only 1"):
            MMPRETRAIN_MODELS.build(dict(config, expansion=2))


def test_a_detector_keeps_the_pretrained_backbone_through_init_weights(tmp_path):
    """mmengine's runner calls the detector's init_weights() after building it; the backbone's
    Pretrained weights, loaded when it was built, must survive that."""
    source = fastres.ResNet(depth=18, base_channels=16)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "detector.pth"
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.conv.weight"] = torch.randn(4, 4, 1, 1)
    torch.save({"meta": {}, "state_dict": state}, path)

    class Detector(BaseModule):
        def __init__(self, backbone: dict):
            super().__init__(init_cfg=dict(type="Kaiming", layer="Conv2d"))
            self.backbone = MMDET_MODELS.build(backbone)
            self.neck = torch.nn.Conv2d(4, 4, 1)

    init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")
    import_modules_from_strings("fastres.openmmlab")
    with DefaultScope.overwrite_default_scope("mmdet"):
        detector = Detector(
            dict(type="fastres.ResNet", depth=18, base_channels=16, init_cfg=init_cfg)
        )
    detector.init_weights()
    for key, value in source.state_dict().items():
        assert torch.equal(detector.backbone.state_dict()[key], value), key


def test_importing_fastres_imports_no_openmmlab():
    code = (
        "import sys, fastres; libraries = {'mmengine', 'mmcv', 'mmdet', 'mmpretrain'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in libraries))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
