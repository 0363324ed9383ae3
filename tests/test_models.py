"""The oracle models: construction, module tree, parameter counts, shapes, initialisation."""

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fastres
from fastres.models import BasicBlock, Bottle2neck, Bottleneck

PLAIN = dict(deep_stem=False, avg_down=False)

# The canonical parameter counts (OpenMMLab's, torchvision's, timm's): (constructor, kwargs,
# backbone params, classifier params).
PARAM_COUNTS = [
    ("resnet18", fastres.ResNet, dict(depth=18), 11_176_512, 11_689_512),
    ("resnet34", fastres.ResNet, dict(depth=34), 21_284_672, 21_797_672),
    ("resnet50", fastres.ResNet, dict(depth=50), 23_508_032, 25_557_032),
    ("resnet101", fastres.ResNet, dict(depth=101), 42_500_160, 44_549_160),
    ("resnet152", fastres.ResNet, dict(depth=152), 58_143_808, 60_192_808),
    ("resnet50v1d", fastres.ResNetV1d, dict(depth=50), 23_527_264, 25_576_264),
    ("res2net50-plain", fastres.Res2Net, dict(depth=50, **PLAIN), 23_650_120, 25_699_120),
    ("res2net50-v1d", fastres.Res2Net, dict(depth=50), 23_669_352, 25_718_352),
    ("res2net101-plain", fastres.Res2Net, dict(depth=101, **PLAIN), 43_157_688, 45_206_688),
]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "cls,kwargs,backbone,classifier",
    [p[1:] for p in PARAM_COUNTS],
    ids=[p[0] for p in PARAM_COUNTS],
)
def test_parameter_counts(cls, kwargs, backbone, classifier):
    with torch.device("meta"):
        assert count(cls(**kwargs)) == backbone
        assert count(cls(num_classes=1000, **kwargs)) == classifier


# The canonical multiply-adds at 224x224, convs + fc, in G (two decimals).
MACS = [
    (fastres.ResNet, dict(depth=18), 1.81),
    (fastres.ResNet, dict(depth=34), 3.66),
    (fastres.ResNet, dict(depth=50), 4.09),
    (fastres.ResNet, dict(depth=101), 7.80),
    (fastres.ResNet, dict(depth=152), 11.51),
    (fastres.Res2Net, dict(depth=50, **PLAIN), 4.26),
]


@pytest.mark.parametrize("cls,kwargs,gmacs", MACS, ids=lambda v: str(v))
def test_forward_cost(cls, kwargs, gmacs):
    with torch.device("meta"):
        model = cls(num_classes=1000, backend="torch", **kwargs).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    assert round(counter.get_total_flops() / 2e9, 2) == gmacs


def test_variants_are_resnet_with_flags():
    v1c, v1d = fastres.ResNetV1c(depth=50), fastres.ResNetV1d(depth=50)
    assert v1c.deep_stem and not v1c.avg_down
    assert v1d.deep_stem and v1d.avg_down
    r2 = fastres.Res2Net(depth=50)
    assert r2.deep_stem and r2.avg_down and isinstance(r2.layer1[0], Bottle2neck)


def test_plain_stem_keys_are_torchvision_keys():
    keys = set(fastres.ResNet(depth=50, num_classes=10).state_dict())
    for key in [
        "conv1.weight",
        "bn1.weight",
        "bn1.running_var",
        "bn1.num_batches_tracked",
        "layer1.0.conv3.weight",
        "layer1.0.bn3.bias",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_mean",
        "layer4.2.conv2.weight",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in keys
    assert not any(k.startswith("stem.") for k in keys)
    assert "layer1.1.downsample.0.weight" not in keys


def test_deep_stem_and_avg_down_keys():
    keys = set(fastres.ResNetV1d(depth=18).state_dict())
    stem = {k.rsplit(".", 1)[0] for k in keys if k.startswith("stem.")}
    assert stem == {f"stem.{i}" for i in (0, 1, 3, 4, 6, 7)}
    assert "conv1.weight" not in keys
    for stage in (2, 3, 4):  # BasicBlock layer1 keeps its channel count and stride: no shortcut
        assert f"layer{stage}.0.downsample.1.weight" in keys  # conv after the pool
        assert f"layer{stage}.0.downsample.2.running_var" in keys
    keys50 = set(fastres.ResNetV1d(depth=50).state_dict())
    assert "layer1.0.downsample.1.weight" in keys50  # the pool is there at stride 1 too
    assert isinstance(fastres.ResNetV1d(depth=50).layer1[0].downsample[0], nn.AvgPool2d)


def test_res2net_keys_and_widths():
    model = fastres.Res2Net(depth=50, scales=4, base_width=26)
    block = model.layer1[0]
    assert block.width == 26 and len(block.convs) == 3 and len(block.bns) == 3
    assert block.conv1.out_channels == 104 and block.conv3.in_channels == 104
    assert model.layer4[0].width == 208
    keys = set(model.state_dict())
    assert "layer3.5.convs.2.weight" in keys and "layer3.5.bns.2.running_mean" in keys
    assert "layer1.0.conv2.weight" not in keys and "layer1.0.bn2.weight" not in keys


def test_res2net_pool_rules():
    strided = fastres.Res2Net(depth=50)
    always = fastres.Res2Net(depth=50, pool_last_chunk="always")
    assert not hasattr(strided.layer1[0], "pool")  # stride-1 stage block: no pool
    assert hasattr(strided.layer2[0], "pool") and not hasattr(strided.layer2[1], "pool")
    assert always.layer1[0].pool.stride == 1 and always.layer2[0].pool.stride == 2
    assert not hasattr(always.layer1[1], "pool")


@pytest.mark.parametrize("depth,block", [(18, BasicBlock), (50, Bottleneck)])
def test_output_shapes_and_out_indices_order(depth, block):
    # OpenMMLab returns the selected stages in stage order, whatever the order given.
    model = fastres.ResNet(depth=depth, out_indices=(3, 0, 2, 0)).eval()
    assert isinstance(model.layer1[0], block)
    outs = model(torch.randn(2, 3, 64, 96))
    e = block.expansion
    assert [o.shape for o in outs] == [
        (2, 64 * e, 16, 24),
        (2, 256 * e, 4, 6),
        (2, 512 * e, 2, 3),
    ]
    assert model.out_channels == (64 * e, 256 * e, 512 * e)


def test_num_stages_strides_dilations():
    model = fastres.ResNet(
        depth=50, num_stages=3, strides=(1, 2, 1), dilations=(1, 1, 2), out_indices=(0, 1, 2)
    ).eval()
    assert not hasattr(model, "layer4")
    assert model.layer3[0].conv2.dilation == (2, 2) and model.layer3[0].conv2.padding == (2, 2)
    assert model.layer3[5].conv2.dilation == (2, 2)
    assert [o.shape[-1] for o in model(torch.randn(1, 3, 64, 64))] == [16, 8, 8]


def test_style_puts_the_stride_on_conv1_or_conv2():
    pytorch = fastres.ResNet(depth=50, style="pytorch").layer2[0]
    caffe = fastres.ResNet(depth=50, style="caffe").layer2[0]
    assert pytorch.conv1.stride == (1, 1) and pytorch.conv2.stride == (2, 2)
    assert caffe.conv1.stride == (2, 2) and caffe.conv2.stride == (1, 1)
    assert fastres.ResNet(depth=18, style="caffe").layer2[0].conv1.stride == (2, 2)
    assert fastres.Res2Net(depth=50, style="caffe").layer2[0].convs[0].stride == (1, 1)


def test_only_the_first_block_of_a_stage_strides():
    model = fastres.ResNet(depth=50)
    assert model.layer3[0].conv2.stride == (2, 2)
    assert all(b.conv2.stride == (1, 1) for b in model.layer3[1:])


def test_classifier_returns_logits():
    model = fastres.ResNet(depth=18, num_classes=7).eval()
    assert model(torch.randn(3, 3, 48, 48)).shape == (3, 7)


def test_stem_channels_and_base_channels():
    model = fastres.ResNetV1c(depth=18, stem_channels=32, base_channels=16)
    assert [model.stem[i].out_channels for i in (0, 3, 6)] == [16, 16, 32]
    assert model.layer1[0].conv1.in_channels == 32
    assert model.layer4[0].conv2.out_channels == 128


def test_initialisation():
    model = fastres.ResNet(depth=50, num_classes=10)
    conv = model.layer3[0].conv2  # 256 -> 256, 3x3
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert torch.all(model.layer1[0].bn1.weight == 1) and torch.all(model.layer1[0].bn1.bias == 0)
    for block in [*model.layer1, *model.layer4]:
        assert torch.all(block.bn3.weight == 0) and torch.all(block.bn3.bias == 0)
    assert model.fc.weight.abs().max() <= 1 / 2048**0.5  # PyTorch's default Linear init
    no_zero = fastres.ResNet(depth=18, zero_init_residual=False)
    assert torch.all(no_zero.layer1[0].bn2.weight == 1)
    assert torch.all(fastres.ResNet(depth=18).layer1[0].bn2.weight == 0)


def test_norm_cfg_types_and_options():
    gn = fastres.ResNet(depth=50, norm_cfg=dict(type="GN", num_groups=32))
    assert isinstance(gn.gn1, nn.GroupNorm) and isinstance(gn.layer1[0].gn3, nn.GroupNorm)
    assert "layer1.0.gn3.weight" in gn.state_dict()
    sync = fastres.ResNet(depth=18, norm_cfg=dict(type="SyncBN"))
    assert isinstance(sync.bn1, nn.SyncBatchNorm)
    custom = fastres.ResNet(depth=18, norm_cfg=dict(type="BN", eps=1e-3, momentum=0.03))
    assert custom.layer2[0].bn1.eps == 1e-3 and custom.layer2[0].bn1.momentum == 0.03
    frozen = fastres.ResNet(depth=18, norm_cfg=dict(type="BN", requires_grad=False))
    assert not any(p.requires_grad for n, p in frozen.named_parameters() if ".bn" in n)
    assert all(p.requires_grad for n, p in frozen.named_parameters() if ".conv" in n)


def test_deepcopy_and_pickle_keep_weights_and_outputs():
    model = fastres.Res2Net(depth=50, backend="torch").eval()
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.backend == "torch"
        for a, b in zip(clone(x), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_traces_without_graph_breaks():
    model = fastres.ResNetV1d(depth=18, with_cp=False, backend="torch").eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    for a, b in zip(compiled(x), model(x)):
        torch.testing.assert_close(a, b)
