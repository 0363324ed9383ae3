"""The oracle against an independent, functional transcription of the blocks of
docs/contract.md §1, in float64.

The oracle is what every fused path is judged by, so it is checked here against the contract's
words written out with torch.nn.functional: a different code path that shares nothing but the
weights.
"""

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres.testing import randomize_norms


def bn(x, m):  # eval-mode BatchNorm from the module's tensors
    scale = m.weight / torch.sqrt(m.running_var + m.eps)
    return x * scale[None, :, None, None] + (m.bias - m.running_mean * scale)[None, :, None, None]


def conv(x, c):
    return F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation)


def shortcut(block, x, avg_down):
    if block.downsample is None:
        return x
    if avg_down:
        pool, cv, norm = block.downsample
        k = pool.kernel_size
        x = F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
        return bn(conv(x, cv), norm)
    cv, norm = block.downsample
    return bn(conv(x, cv), norm)


def basic(block, x, avg_down):
    out = F.relu(bn(conv(x, block.conv1), block.bn1))
    return F.relu(bn(conv(out, block.conv2), block.bn2) + shortcut(block, x, avg_down))


def bottleneck(block, x, avg_down):
    out = F.relu(bn(conv(x, block.conv1), block.bn1))
    out = F.relu(bn(conv(out, block.conv2), block.bn2))
    return F.relu(bn(conv(out, block.conv3), block.bn3) + shortcut(block, x, avg_down))


def bottle2neck(block, x, avg_down, first, stride, pool_rule):
    out = F.relu(bn(conv(x, block.conv1), block.bn1))
    w, s = block.width, block.scales
    chunks = [out[:, i * w : (i + 1) * w] for i in range(s)]
    outs, prev = [], None
    for i in range(s - 1):
        inp = chunks[i] if (first or i == 0) else prev + chunks[i]
        prev = F.relu(bn(conv(inp, block.convs[i]), block.bns[i]))
        outs.append(prev)
    last = chunks[-1]
    if first and (pool_rule == "always" or stride != 1):
        last = F.avg_pool2d(last, 3, stride, 1, count_include_pad=True)
    out = bn(conv(torch.cat(outs + [last], 1), block.conv3), block.bn3)
    return F.relu(out + shortcut(block, x, avg_down))


def functional_forward(model, x, pool_rule="strided"):
    if model.deep_stem:
        for i in (0, 3, 6):
            x = F.relu(bn(conv(x, model.stem[i]), model.stem[i + 1]))
    else:
        x = F.relu(bn(conv(x, model.conv1), model.bn1))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for s, name in enumerate(model.res_layers):
        for b, block in enumerate(getattr(model, name)):
            if isinstance(block, fastres.models.Bottle2neck):
                # the chunk convs and the last-chunk pool carry the stride only in 'pytorch' style
                stride = model.strides[s] if b == 0 and model.style == "pytorch" else 1
                x = bottle2neck(block, x, model.avg_down, b == 0, stride, pool_rule)
            elif isinstance(block, fastres.models.Bottleneck):
                x = bottleneck(block, x, model.avg_down)
            else:
                x = basic(block, x, model.avg_down)
        outs.append(x)
    return [out for i, out in enumerate(outs) if i in model.out_indices]


CASES = {
    "resnet18": (fastres.ResNet, dict(depth=18)),
    "resnet34-v1d": (fastres.ResNetV1d, dict(depth=34)),
    "resnet50": (fastres.ResNet, dict(depth=50)),
    "resnet50-v1c-caffe": (fastres.ResNetV1c, dict(depth=50, style="caffe")),
    "resnet50-dilated": (
        fastres.ResNet,
        dict(depth=50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4)),
    ),
    "res2net50": (fastres.Res2Net, dict(depth=50)),
    "res2net50-always-plain": (
        fastres.Res2Net,
        dict(depth=50, pool_last_chunk="always", deep_stem=False, avg_down=False),
    ),
    "res2net50-w14s8-caffe": (
        fastres.Res2Net,
        dict(depth=50, base_width=14, scales=8, style="caffe"),
    ),
    "res2net50-dilated": (
        fastres.Res2Net,
        dict(depth=50, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_matches_functional_spec(case):
    cls, kwargs = CASES[case]
    model = cls(base_channels=16, zero_init_residual=False, backend="torch", **kwargs)
    randomize_norms(model).double().eval()
    x = torch.randn(2, 3, 41, 35, dtype=torch.float64)  # odd, not a multiple of 32
    got = model(x)
    want = functional_forward(model, x, kwargs.get("pool_last_chunk", "strided"))
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_classifier_head_is_global_pool_then_fc():
    model = fastres.ResNet(depth=18, num_classes=5, zero_init_residual=False, backend="torch")
    randomize_norms(model).double().eval()
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    features = functional_forward(model, x)[-1]
    torch.testing.assert_close(
        model(x), F.linear(features.mean((2, 3)), model.fc.weight, model.fc.bias)
    )
