"""What the per-layer and block benchmarks (bench/test_bench_conv2d_*.py,
bench/test_bench_res2net_fused.py) share: ResNet-50's conv shapes, the CUDA timer and the
device's measured matmul rate and copy bandwidth. The benchmark files
import from here, never from one another."""

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


def time_ms(fn, rep_ms: int = 50) -> float:
    """Median milliseconds of fn() on the current CUDA stream, repeated for about `rep_ms` ms."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


@functools.lru_cache(maxsize=1)
def device_rates() -> dict:
    """Measured bf16 matmul rate (FLOP/s) and device-to-device copy bandwidth (B/s)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b)
    src = torch.empty(2**30, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    return {
        "matmul_flops": 2 * 8192**3 / (mm_ms * 1e-3),
        "copy_bytes_per_s": 2 * src.numel() / (copy_ms * 1e-3),
        "device": torch.cuda.get_device_name(),
    }
