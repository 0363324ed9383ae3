"""Checkpoint loading (docs/contract.md §4): every layout into a fresh model, and every failure.

Each layout's checkpoint is built here, without downloads, by renaming the keys of a random
model's own state_dict the way torchvision, timm, mmdet or mmpretrain name them. A load must
reproduce every tensor of the source and its forward outputs; a failed load must name the
offending keys and leave the model exactly as it was.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fastres
from fastres.checkpoint import CheckpointError, LoadReport
from fastres.testing import randomize_norms

# (model class, constructor arguments): the architectures a layout test loads.
R18 = (fastres.ResNet, dict(depth=18))
R50 = (fastres.ResNet, dict(depth=50))
R50D = (fastres.ResNetV1d, dict(depth=50))
R18D = (fastres.ResNetV1d, dict(depth=18))
RES2NET_PLAIN = (
    fastres.Res2Net,
    dict(depth=50, deep_stem=False, avg_down=False, pool_last_chunk="always"),
)
RES2NET_D = (fastres.Res2Net, dict(depth=50, pool_last_chunk="always"))
# Narrow models, where the width does not matter.
NARROW = dict(stem_channels=16, base_channels=16)


def build(arch, **extra) -> nn.Module:
    """A fresh model in eval mode on the oracle backend (exact, fast on CPU)."""
    cls, kwargs = arch
    return cls(backend="torch", **kwargs, **extra).eval()


def source_model(arch, **extra) -> nn.Module:
    """A model whose every tensor is random and distinct from a fresh model's."""
    model = randomize_norms(build(arch, zero_init_residual=False, **extra))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model


def cloned_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), f"{key} differs"


def assert_same_outputs(model: nn.Module, reference: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = model(x), reference(x)
    if isinstance(ref, torch.Tensor):
        out, ref = (out,), (ref,)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref, strict=True)):
        assert torch.equal(a, b), f"output {i} differs"


def renamed(state: dict, table: dict[str, str], prefix: str = "") -> dict:
    """Renames module prefixes per `table` (first match wins) and prepends `prefix`."""
    out = {}
    for key, value in state.items():
        for ours, theirs in table.items():
            if key.startswith(ours + "."):
                key = theirs + key[len(ours) :]
                break
        out[prefix + key] = value
    return out


# How the other libraries name the modules of a deep stem (ours: stem.{0,1,3,4,6,7}).
TIMM_NAMES = {
    "stem.0": "conv1.0",
    "stem.1": "conv1.1",
    "stem.3": "conv1.3",
    "stem.4": "conv1.4",
    "stem.6": "conv1.6",
    "stem.7": "bn1",
}
MMPRETRAIN_NAMES = {
    "stem.0": "stem.0.conv",
    "stem.1": "stem.0.bn",
    "stem.3": "stem.1.conv",
    "stem.4": "stem.1.bn",
    "stem.6": "stem.2.conv",
    "stem.7": "stem.2.bn",
}


def load_and_check(arch, checkpoint, source, tmp_path=None, **extra) -> LoadReport:
    """Loads `checkpoint` (through a file when tmp_path is given) into a fresh model and checks
    it against `source` tensor by tensor and output by output."""
    if tmp_path is not None:
        path = tmp_path / "checkpoint.pth"
        torch.save(checkpoint, path)
        checkpoint = str(path)
    model = build(arch, **extra)
    report = fastres.load_checkpoint(model, checkpoint)
    assert isinstance(report, LoadReport)
    assert not report.missing and not report.unexpected and not report.mismatched
    assert_state_equal(model, source.state_dict())
    assert_same_outputs(model, source)
    return report


# -- layouts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [R18, R50], ids=["resnet18", "resnet50"])
def test_torchvision_classifier(arch, tmp_path):
    source = source_model(arch, num_classes=10)
    report = load_and_check(arch, source.state_dict(), source, tmp_path, num_classes=10)
    assert "fc.weight" in report.loaded and not report.ignored


def test_torchvision_into_backbone_drops_fc(tmp_path):
    source = source_model(R18)
    checkpoint = dict(source.state_dict())
    checkpoint["fc.weight"], checkpoint["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    report = load_and_check(R18, checkpoint, source, tmp_path)
    assert report.ignored == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize(
    "arch, deep_stem",
    [(R50, False), (R50D, True), (RES2NET_PLAIN, False), (RES2NET_D, True)],
    ids=["resnet50", "resnet50d", "res2net50_26w_4s", "res2net50d"],
)
def test_timm(arch, deep_stem, tmp_path):
    source = source_model(arch, num_classes=5)
    checkpoint = renamed(source.state_dict(), TIMM_NAMES)
    if deep_stem:
        assert "conv1.0.weight" in checkpoint and "bn1.weight" in checkpoint
    report = load_and_check(arch, checkpoint, source, tmp_path, num_classes=5)
    assert report.layout.startswith("timm") == deep_stem


@pytest.mark.parametrize(
    "arch, ddp",
    [(R18, False), ((fastres.Res2Net, dict(depth=50)), True)],
    ids=["resnet18", "res2net50-deep-stem-ddp"],
)
def test_mmdet_detector(arch, ddp, tmp_path):
    source = source_model(arch)
    prefix = "module.backbone." if ddp else "backbone."
    state = {prefix + k: v for k, v in source.state_dict().items()}
    others = {
        "neck.lateral_convs.0.conv.weight": torch.randn(256, 64, 1, 1),
        "rpn_head.rpn_conv.weight": torch.randn(256, 256, 3, 3),
        "roi_head.bbox_head.fc_cls.weight": torch.randn(81, 1024),
    }
    state.update({("module." if ddp else "") + k: v for k, v in others.items()})
    checkpoint = {"meta": {"epoch": 12, "classes": ("cat", "dog")}, "state_dict": state}
    report = load_and_check(arch, checkpoint, source, tmp_path)
    assert sorted(report.ignored) == sorted(others)


@pytest.mark.parametrize("arch", [R18, R50D], ids=["resnet18", "resnet50-v1d"])
def test_mmpretrain_classifier(arch, tmp_path):
    source = source_model(arch, num_classes=7)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state = renamed(backbone, MMPRETRAIN_NAMES, prefix="backbone.")
    # mmpretrain's classifier head lives beside the backbone, not inside it.
    state["head.fc.weight"], state["head.fc.bias"] = source.fc.weight, source.fc.bias
    if arch is R50D:
        assert "backbone.stem.2.bn.running_var" in state
    checkpoint = {"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": state}
    report = load_and_check(arch, checkpoint, source, tmp_path, num_classes=7)
    assert report.layout.startswith("mmpretrain") == (arch is R50D)


@pytest.mark.parametrize("target_tree", ["mmdet", "mmpretrain"])
@pytest.mark.parametrize("source_tree", ["mmdet", "mmpretrain"])
@pytest.mark.parametrize(
    "arch",
    [
        (fastres.ResNetV1d, dict(depth=50, **NARROW)),
        (fastres.ResNetV1c, dict(depth=18, norm_cfg=dict(type="GN", num_groups=4), **NARROW)),
        (fastres.Res2Net, dict(depth=50, base_width=6, pool_last_chunk="always", **NARROW)),
    ],
    ids=["resnet50-v1d", "resnet18-v1c-gn", "res2net50-d"],
)
def test_either_module_tree_into_either(arch, source_tree, target_tree, tmp_path):
    """A checkpoint of either module tree (module_tree='mmdet' / 'mmpretrain') loads strictly
    into a model of either, every tensor in its place."""
    source = source_model(arch, module_tree=source_tree)
    path = tmp_path / "checkpoint.pth"
    torch.save(source.state_dict(), path)
    model = build(arch, module_tree=target_tree)
    report = fastres.load_checkpoint(model, str(path))
    assert not (report.missing or report.unexpected or report.ignored or report.filled)
    # Both trees register the same tensors in the same order, under other names.
    state, expected = model.state_dict(), source.state_dict()
    assert len(state) == len(expected)
    for (key, value), (source_key, source_value) in zip(state.items(), expected.items()):
        assert torch.equal(value, source_value), f"{key} holds other values than {source_key}"
    assert_same_outputs(model, source)


def test_plain_shortcuts_into_mmpretrain_tree_avg_down_model():
    # mmpretrain's tree names layer1.0's avg_down shortcut as a plain one (downsample.{0,1}):
    # only the strided shortcuts tell the layouts apart.
    source = source_model(R50)
    model = build(R50D, module_tree="mmpretrain")
    message = expect_failure(model, source.state_dict(), strict=False)
    assert "the checkpoint has plain shortcuts" in message
    assert "layer2.0.downsample.1.weight: model (512, 256, 1, 1), checkpoint (512,)" in message


@pytest.mark.parametrize(
    "wrapper, arch",
    [(None, (fastres.Res2Net, dict(depth=50))), ("state_dict", R18), ("model", R18)],
    ids=["res2net50", "state_dict-resnet18", "model-resnet18"],
)
def test_fastres_own(wrapper, arch, tmp_path):
    source = source_model(arch)
    checkpoint = source.state_dict() if wrapper is None else {wrapper: source.state_dict()}
    load_and_check(arch, checkpoint, source, tmp_path)


def test_module_as_source():
    source = source_model(R18)
    load_and_check(R18, source, source)


def test_missing_num_batches_tracked_keeps_model_value():
    source = source_model(R18)
    checkpoint = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    model = build(R18)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(7)
    report = fastres.load_checkpoint(model, checkpoint)
    counters = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    assert report.filled == counters and counters
    for key, value in model.state_dict().items():
        expected = torch.tensor(7) if key in counters else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert_same_outputs(model, source)


def test_values_take_the_model_dtype_and_device(device):
    source = source_model(R18)
    checkpoint = {
        k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()
    }
    model = build(R18).to(device)
    pointers = {k: v.data_ptr() for k, v in model.state_dict().items()}
    fastres.load_checkpoint(model, checkpoint)
    for key, value in model.state_dict().items():
        assert value.device.type == device.type and value.dtype == source.state_dict()[key].dtype
        assert torch.equal(value.cpu(), checkpoint[key].to(value.dtype)), key
        assert value.data_ptr() == pointers[key], f"{key} was replaced, not copied into"


def test_stages_beyond_num_stages_are_ignored():
    source = source_model(R18)
    model = build(R18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2,))
    report = fastres.load_checkpoint(model, source.state_dict())
    assert report.ignored and all(k.startswith("layer4.") for k in report.ignored)
    assert not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_timm_res2net_warns_about_the_pool_rule():
    source = source_model(RES2NET_D)
    model = build((fastres.Res2Net, dict(depth=50)))  # pool_last_chunk='strided'
    with pytest.warns(UserWarning, match="pool_last_chunk='always'"):
        fastres.load_checkpoint(model, renamed(source.state_dict(), TIMM_NAMES))


def test_safetensors(tmp_path):
    source = source_model(R18)
    path = tmp_path / "model.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"\0" * 16)
        with pytest.raises(CheckpointError, match="pip install safetensors"):
            fastres.load_checkpoint(build(R18), str(path))
        return
    save_file(source.state_dict(), str(path))
    load_and_check(R18, str(path), source)


# -- constructor paths -------------------------------------------------------------------------


def test_pretrained_and_init_cfg(tmp_path):
    source = source_model(R18D)
    path = tmp_path / "v1d.pth"
    torch.save({"meta": {}, "state_dict": renamed(source.state_dict(), TIMM_NAMES)}, path)
    by_pretrained = fastres.ResNetV1d(depth=18, pretrained=str(path), backend="torch").eval()
    by_init_cfg = fastres.ResNetV1d(
        depth=18, init_cfg=dict(type="Pretrained", checkpoint=str(path)), backend="torch"
    ).eval()
    for model in (by_pretrained, by_init_cfg):
        assert_state_equal(model, source.state_dict())
    assert_same_outputs(by_init_cfg, source)
    with pytest.raises(ValueError, match="not both"):
        fastres.ResNetV1d(
            depth=18, pretrained=str(path), init_cfg=dict(type="Pretrained", checkpoint=str(path))
        )


def test_init_cfg_prefix_and_unknown_keys(tmp_path):
    source = source_model(R18)
    path = tmp_path / "detector.pth"
    state = {f"detector.backbone.{k}": v for k, v in source.state_dict().items()}
    state["detector.neck.weight"] = torch.randn(3)
    torch.save({"state_dict": state}, path)
    init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="detector.backbone.")
    model = fastres.ResNet(depth=18, init_cfg=dict(init_cfg, map_location="cpu")).eval()
    assert_state_equal(model, source.state_dict())
    report = fastres.load_checkpoint(build(R18), str(path), prefix="detector.backbone")
    assert report.ignored == ["detector.neck.weight"] and "prefix" in report.layout
    with pytest.raises(CheckpointError, match="no key of the checkpoint starts with 'head.'"):
        fastres.load_checkpoint(build(R18), str(path), prefix="head")
    with pytest.raises(ValueError, match=r"unknown keys \['strict'\]"):
        fastres.ResNet(depth=18, init_cfg=dict(init_cfg, strict=True))


URL = "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth"


def test_url_is_read_from_the_torch_hub_folder(tmp_path, monkeypatch):
    """What torch.hub and OpenMMLab downloaded before is used; nothing is downloaded."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    arch = (fastres.ResNetV1c, dict(depth=50, base_channels=16))
    with pytest.raises(FileNotFoundError) as info:
        build(arch, pretrained=URL)
    cached = tmp_path / "hub" / "checkpoints" / "resnet50_v1c-2cccc1ad.pth"
    assert "does not download" in str(info.value) and URL in str(info.value)
    assert str(cached) in str(info.value)
    source = source_model(arch)
    cached.parent.mkdir(parents=True)
    torch.save(renamed(source.state_dict(), MMPRETRAIN_NAMES), cached)
    names = [URL]
    try:
        import mmengine  # noqa: F401  (resolves open-mmlab:// names)

        names += ["open-mmlab://resnet50_v1c", "openmmlab://resnet50_v1c"]
    except ImportError:
        pass
    for name in names:
        model = build(arch, init_cfg=dict(type="Pretrained", checkpoint=name))
        assert_state_equal(model, source.state_dict())


@pytest.mark.parametrize(
    "name, match",
    [
        ("open-mmlab://no_such_model", "not among the .* models OpenMMLab knows"),
        ("torchvision://resnet50", "torchvision"),
        ("s3://bucket/r50.pth", "no local file"),
    ],
)
def test_unresolvable_names_fail_clearly(name, match, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    if name.startswith(("open-mmlab", "torchvision")):
        pytest.importorskip("mmengine")
    with pytest.raises(FileNotFoundError, match=match):
        fastres.load_checkpoint(build(R18), name)


def test_pretrained_mismatch_fails_construction(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(source_model(R18).state_dict(), path)
    with pytest.raises(CheckpointError, match="another depth"):
        fastres.ResNet(depth=50, pretrained=str(path))


# -- failures: the message names the keys, the model is unchanged ------------------------------


def expect_failure(model: nn.Module, checkpoint, strict: bool = True) -> str:
    """Loads, expects a CheckpointError, checks the model is untouched, returns the message."""
    before = cloned_state(model)
    with pytest.raises(CheckpointError) as info:
        fastres.load_checkpoint(model, checkpoint, strict=strict)
    assert_state_equal(model, before)
    message = str(info.value)
    assert "left unchanged" in message
    return message


@pytest.mark.parametrize("strict", [True, False])
def test_wrong_depth(strict):
    message = expect_failure(build(R50), source_model(R18).state_dict(), strict)
    assert "(2, 2, 2, 2) blocks per stage, the model (3, 4, 6, 3)" in message
    assert "layer1.0.conv1.weight: model (64, 64, 1, 1), checkpoint (64, 64, 3, 3)" in message
    if strict:
        assert "layer1.0.conv3.weight" in message
    # Long lists are cut and counted.
    shown = re.search(r"(\d+) wrongly shaped keys", message)
    more = re.search(r"\.\.\. and (\d+) more", message)
    assert shown and more and int(more.group(1)) < int(shown.group(1))


@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape(strict):
    source = source_model(R18)
    checkpoint = dict(source.state_dict())
    checkpoint["layer2.1.conv1.weight"] = torch.randn(128, 128, 1, 1)
    message = expect_failure(build(R18), checkpoint, strict)
    assert "layer2.1.conv1.weight: model (128, 128, 3, 3), checkpoint (128, 128, 1, 1)" in message
    assert "1 wrongly shaped" in message and "0 missing" in message


def test_missing_keys():
    source = source_model(R18)
    checkpoint = dict(source.state_dict())
    gone = ["layer3.0.conv2.weight", "layer4.1.bn1.running_var"]
    for key in gone:
        del checkpoint[key]
    model = build(R18)
    message = expect_failure(model, checkpoint)
    assert "2 missing keys" in message and all(key in message for key in gone)

    before = cloned_state(model)
    report = fastres.load_checkpoint(model, checkpoint, strict=False)
    assert report.missing == gone
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key] if key in gone else source.state_dict()[key]), key


def test_unexpected_keys():
    source = source_model(R18)
    checkpoint = dict(source.state_dict())
    extra = {"layer1.0.extra.weight": torch.randn(3), "proj.weight": torch.randn(2, 2)}
    checkpoint.update(extra)
    model = build(R18)
    message = expect_failure(model, checkpoint)
    assert "2 unexpected keys" in message and all(key in message for key in extra)

    report = fastres.load_checkpoint(model, checkpoint, strict=False)
    assert sorted(report.unexpected) == sorted(extra)
    assert_state_equal(model, source.state_dict())


def test_timm_deep_stem_bn1_is_not_the_plain_stem_bn1():
    # timm's deep-stem bn1 has the plain stem's bn1 shape: only the layout tells them apart.
    source = source_model(R50D)
    checkpoint = renamed(source.state_dict(), TIMM_NAMES)
    message = expect_failure(build(R50), checkpoint, strict=False)
    assert "the checkpoint has a deep stem (stem.*), the model a plain 7x7 stem" in message
    assert "avg_down shortcuts" in message
    assert "layer1.0.downsample.1.weight: model (256,), checkpoint (256, 64, 1, 1)" in message


def test_plain_shortcuts_into_avg_down_model():
    # The same key, layer1.0.downsample.1.weight, is a BN weight here and a conv weight there.
    source = source_model(R50)
    model = build(R50D)
    message = expect_failure(model, source.state_dict(), strict=False)
    assert "layer1.0.downsample.1.weight: model (256, 64, 1, 1), checkpoint (256,)" in message
    assert "the checkpoint has plain shortcuts" in message


def test_nothing_matches():
    message = expect_failure(build(R18), {"encoder.weight": torch.randn(4)}, strict=False)
    assert "no tensor of the checkpoint fits" in message and "encoder.weight" in message


# -- files and objects that are no checkpoint --------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        fastres.load_checkpoint(build(R18), str(tmp_path / "nothere.pth"))


def test_not_a_checkpoint(tmp_path):
    model = build(R18)
    before = cloned_state(model)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    listing = tmp_path / "list.pth"
    torch.save([torch.ones(2)], listing)
    mixed = tmp_path / "mixed.pth"
    torch.save({"conv1.weight": torch.ones(2), "epoch": 3}, mixed)
    for path, match in [
        (text, "not a PyTorch checkpoint"),
        (listing, "got list"),
        (mixed, "'epoch' are not tensors"),
        (tmp_path, "is a directory"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            fastres.load_checkpoint(model, str(path))
    with pytest.raises(CheckpointError, match="holds no tensors"):
        fastres.load_checkpoint(model, {})
    assert_state_equal(model, before)


def test_pickled_model_needs_weights_only_false(tmp_path):
    source = source_model(R18)
    path = tmp_path / "whole_model.pth"
    torch.save(source, path)
    model = build(R18)
    before = cloned_state(model)
    with pytest.raises(CheckpointError, match=r"weights_only=False") as info:
        fastres.load_checkpoint(model, str(path))
    assert "fastres.models.resnet.ResNet" in str(info.value)
    assert_state_equal(model, before)
    report = fastres.load_checkpoint(model, str(path), weights_only=False)
    assert not report.missing
    assert_state_equal(model, source.state_dict())
