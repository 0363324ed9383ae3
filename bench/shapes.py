"""Layer shapes shared by the per-layer benchmarks (bench/test_bench_conv2d_*.py)."""

from __future__ import annotations

import functools

import torch

import fastres


@functools.cache
def resnet50_layers(image_size: int = 224) -> dict[str, dict]:
    """Every distinct conv of ResNet-50 at `image_size`: name -> shape and inference epilogue.

    Found by running the oracle once on one image with hooks on every nn.Conv2d. The name is
    `<first module>-<C_in>x<H>-<K>x<K>s<stride>-<C_out>-<epilogue>`; the epilogue is what the
    triton backend fuses after the conv in inference: 'bias_relu' (conv + BN + ReLU),
    'bias_add_relu' (a block's conv3: + the shortcut, ReLU) or 'bias' (the downsample conv + BN).
    A shape that occurs with two epilogues (layer1's conv3 and downsample) is listed twice.
    """
    model = fastres.ResNet(depth=50, backend="torch").eval()
    seen, layers = set(), {}

    def hook(name):
        def record(conv, inputs, _output):
            h, w = inputs[0].shape[2:]
            if name.endswith("conv3"):
                epilogue = "bias_add_relu"
            elif "downsample" in name:
                epilogue = "bias"
            else:
                epilogue = "bias_relu"
            key = (
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size[0],
                conv.stride[0],
                h,
                epilogue,
            )
            if key in seen:
                return
            seen.add(key)
            k, s = conv.kernel_size[0], conv.stride[0]
            label = f"{name}-{conv.in_channels}x{h}-{k}x{k}s{s}-{conv.out_channels}-{epilogue}"
            layers[label] = dict(
                c_in=conv.in_channels, c_out=conv.out_channels, kernel=k, stride=s,
                padding=conv.padding[0], h=h, w=w, epilogue=epilogue,
            )  # fmt: skip

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return layers
