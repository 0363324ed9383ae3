"""Per-layer benchmarks of the fused convolution at every ResNet-50 conv shape (CUDA only).

For each distinct conv of ResNet-50 at 224x224 (batch 256, bf16, channels_last), with the
fusion the triton backend uses there (conv + BN + ReLU, the block tail conv + BN + add + ReLU,
the shortcut conv + BN), three systems are timed:

- `fused`: `fastres.ops.conv2d_fused` (the folded BN as bias, the rest in the epilogue);
- `eager`: PyTorch conv (cuDNN) + BatchNorm (eval) [+ add] + ReLU, channels_last;
- `conv`: the bare PyTorch convolution, the lower bound of any unfused pipeline.

Each reports TFLOP/s and the fraction of its roofline bound: max(FLOPs / measured bf16 matmul
rate, bytes / measured copy bandwidth), the bytes being the fused op's compulsory traffic
(input, weight, output, residual). The group is `conv2d_fused-<layer>-bf16-infer`; every
benchmark checks the fused output once against the float64 oracle (docs/contract.md §3) on a few
images, and its extra_info (saved with --benchmark-json) carries the rates, device and versions.

    pytest bench/test_bench_conv2d_fused.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch
from layer_bench import device_rates, resnet50_layers, time_ms

from fastres.ops.conv2d_fused import arrange_weight, conv2d_fused
from fastres.testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="per-layer Triton benchmarks need a CUDA GPU"
)

BATCH, IMAGE_SIZE, DTYPE = 256, 224, torch.bfloat16
CHECK_IMAGES = 4  # images compared with the float64 oracle
SYSTEMS = ("fused", "eager", "conv")


LAYERS = resnet50_layers(IMAGE_SIZE)


def make_layer(spec: dict, batch: int, device: str = "cuda") -> dict:
    """Random bf16 channels_last tensors and an eval BatchNorm for one layer."""
    c_in, c_out, k = spec["c_in"], spec["c_out"], spec["kernel"]
    x = torch.randn(batch, c_in, spec["h"], spec["w"], device=device).relu()
    x = x.to(DTYPE).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c_in, c_out, k, spec["stride"], spec["padding"], bias=False)
    bn = torch.nn.BatchNorm2d(c_out)
    with torch.no_grad():
        bn.weight.uniform_(0.75, 1.25)
        bn.bias.normal_(0, 0.1)
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.75, 1.25)
    conv, bn = conv.to(device).eval(), bn.to(device).eval()
    out_hw = (spec["h"] + 2 * spec["padding"] - k) // spec["stride"] + 1
    residual = None
    if spec["epilogue"] == "bias_add_relu":
        residual = torch.randn(batch, c_out, out_hw, out_hw, device=device).to(DTYPE)
        residual = residual.contiguous(memory_format=torch.channels_last)
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = arrange_weight((conv.weight * scale.view(-1, 1, 1, 1)).to(DTYPE))
    return dict(
        x=x, conv=conv, bn=bn, residual=residual, out_hw=out_hw,
        weight=weight.detach(), bias=(bn.bias - bn.running_mean * scale).detach().float(),
    )  # fmt: skip


def run_fused(spec: dict, t: dict, x: torch.Tensor | None = None, residual=None) -> torch.Tensor:
    x = t["x"] if x is None else x
    residual = t["residual"] if residual is None else residual
    return conv2d_fused(
        x, t["weight"], t["bias"], stride=spec["stride"], padding=spec["padding"],
        residual=residual, relu=spec["epilogue"] != "bias",
    )  # fmt: skip


def run_eager(spec: dict, t: dict, x=None, residual=None, conv=None, bn=None) -> torch.Tensor:
    x = t["x"] if x is None else x
    residual = t["residual"] if residual is None else residual
    y = (bn or t["bn"])((conv or t["conv"])(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if spec["epilogue"] != "bias" else y


def check_once(spec: dict, t: dict) -> None:
    """The fused output on the first CHECK_IMAGES images against the float64 / bf16 oracle."""
    x = t["x"][:CHECK_IMAGES]
    residual = None if t["residual"] is None else t["residual"][:CHECK_IMAGES]
    actual = run_fused(spec, t, x, residual)
    gold_modules = [copy.deepcopy(t[k]).double() for k in ("conv", "bn")]
    base_modules = [copy.deepcopy(t[k]).to(DTYPE) for k in ("conv", "bn")]
    gold_residual = None if residual is None else residual.double()
    gold = run_eager(spec, t, x.double(), gold_residual, *gold_modules)
    base = run_eager(spec, t, x, residual, *base_modules)
    assert_matches_oracle(actual, base, gold, DTYPE, "fused layer")


def flops_and_bytes(spec: dict, t: dict) -> tuple[float, float]:
    """The layer's FLOPs and its compulsory memory traffic in bytes (each tensor once)."""
    out_numel = BATCH * spec["c_out"] * t["out_hw"] ** 2
    flops = 2.0 * out_numel * spec["c_in"] * spec["kernel"] ** 2
    tensors = t["x"].numel() + t["weight"].numel() + out_numel
    if t["residual"] is not None:
        tensors += out_numel
    return flops, tensors * t["x"].element_size()


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("layer", LAYERS.keys())
def test_layer(benchmark, layer, system):
    spec = LAYERS[layer]
    torch.manual_seed(0)
    t = make_layer(spec, BATCH)
    with torch.no_grad():
        if system == "fused":
            check_once(spec, t)
            step = lambda: run_fused(spec, t)
        elif system == "eager":
            conv, bn = t["conv"].to(DTYPE), t["bn"].to(DTYPE)
            step = lambda: run_eager(spec, t, conv=conv, bn=bn)
        else:
            conv = t["conv"].to(DTYPE)
            step = lambda: conv(t["x"])
        ms = time_ms(step)

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark.group = f"conv2d_fused-{layer}-bf16-infer"
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
    rates = device_rates()
    flops, traffic = flops_and_bytes(spec, t)
    bound_s = max(flops / rates["matmul_flops"], traffic / rates["copy_bytes_per_s"])
    benchmark.extra_info.update(
        system=system,
        ms=ms,
        tflops=flops / (ms * 1e-3) / 1e12,
        roofline_fraction=bound_s / (ms * 1e-3),
        matmul_tflops_measured=rates["matmul_flops"] / 1e12,
        copy_gbps_measured=rates["copy_bytes_per_s"] / 1e9,
        device=rates["device"],
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
