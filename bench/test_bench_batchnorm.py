"""Op-level benchmarks of the fused BatchNorm ops (`fastres::bn_*`) against PyTorch eager.

At the BN shapes of ResNet-50 (batch 8 on CPU, 64 on CUDA; fp32; channels_last), each op runs
against the PyTorch eager sequence it replaces:

- `apply` (BN eval + ReLU) vs batch_norm(eval) + relu_;
- `apply_residual` (BN eval + add + ReLU, a block tail) vs batch_norm + add_ + relu_;
- `apply_two_bn` (the downsample tail) vs two batch_norms + add_ + relu_;
- `train_forward` (bn_stats + bn_finalize + bn_apply with ReLU) vs batch_norm(train) + relu_;
- `train_backward` (one bn_backward, ReLU mask recomputed) vs the
  autograd backward of batch_norm(train) + relu.

Group names are `<op>-<shape>-fp32-<mode>`; each benchmark first checks the fused result once
against the float64 reference (docs/contract.md §3) and records GB/s of compulsory traffic in
extra_info.

    pytest bench/test_bench_batchnorm.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastres.extension import EXTENSION_ERROR
from fastres.ops import batchnorm as bn_ops
from fastres.testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 64 if DEVICE == "cuda" else 8
# (channels, spatial size) of ResNet-50's BN layers at 224x224
SHAPES = {"c64-56": (64, 56), "c256-56": (256, 56), "c512-28": (512, 28), "c2048-7": (2048, 7)}
OPS = ("apply", "apply_residual", "apply_two_bn", "train_forward", "train_backward")
SYSTEMS = ("fused", "eager")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _tensors(c: int, hw: int, dtype=torch.float32) -> dict:
    def act():
        x = torch.randn(BATCH, c, hw, hw, device=DEVICE, dtype=torch.float64)
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    def vec(lo=0.5):
        return (torch.rand(c, device=DEVICE, dtype=torch.float64) + lo).to(dtype)

    return {
        "x": act(),
        "r": act(),
        "grad": act(),
        "weight": vec(),
        "bias": vec(-0.5),
        "running_mean": vec(-0.5),
        "running_var": vec(),
        "weight_r": vec(),
        "bias_r": vec(-0.5),
    }


def _eval_affine(t: dict, suffix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    invstd = torch.rsqrt(t["running_var"] + 1e-5)
    scale = t["weight" + suffix] * invstd
    return scale, t["bias" + suffix] - t["running_mean"] * scale


def _away_from_relu_kink(op: str, t: dict, margin: float = 1e-3) -> None:
    """Moves the few x values whose pre-activation lies within `margin` of the ReLU's kink.

    There the fused op (x * scale + shift) and eager ((x - mean) * invstd * w + b) may round to
    different sides of zero: that element is then off by a whole value, and in the backward it
    moves a per-channel sum by a whole upstream gradient (seen in 3 of 40 random draws).
    """
    x, per_channel = t["x"].double(), (1, -1, 1, 1)
    if op.startswith("train"):
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        scale = t["weight"].double() * torch.rsqrt(var + 1e-5)
        shift = t["bias"].double() - mean * scale
    else:
        scale, shift = (v.double() for v in _eval_affine(t))
    z = x * scale.view(per_channel) + shift.view(per_channel)
    if op == "apply_residual":
        z = z + t["r"].double()
    elif op == "apply_two_bn":
        scale_r, shift_r = (v.double().view(per_channel) for v in _eval_affine(t, "_r"))
        z = z + t["r"].double() * scale_r + shift_r
    x = torch.where(z.abs() < margin, x + 2 * margin / scale.view(per_channel), x)
    t["x"] = x.to(t["x"].dtype).contiguous(memory_format=torch.channels_last)


def _eager(op: str, t: dict):
    """The PyTorch eager sequence the fused op replaces: a callable and its result."""
    bn = lambda x, w, b: F.batch_norm(x, t["running_mean"], t["running_var"], w, b, False)
    if op == "apply":
        return lambda: torch.relu_(bn(t["x"], t["weight"], t["bias"]))
    if op == "apply_residual":
        return lambda: torch.relu_(bn(t["x"], t["weight"], t["bias"]).add_(t["r"]))
    if op == "apply_two_bn":
        return lambda: torch.relu_(
            bn(t["x"], t["weight"], t["bias"]).add_(bn(t["r"], t["weight_r"], t["bias_r"]))
        )
    if op == "train_forward":
        return lambda: torch.relu_(F.batch_norm(t["x"], None, None, t["weight"], t["bias"], True))
    x = t["x"].detach().requires_grad_(True)
    w = t["weight"].detach().requires_grad_(True)
    b = t["bias"].detach().requires_grad_(True)
    y = torch.relu(F.batch_norm(x, None, None, w, b, True))
    return lambda: torch.autograd.grad(y, (x, w, b), t["grad"], retain_graph=True)


def _fused(op: str, t: dict):
    x, count = t["x"], t["x"].numel() // t["x"].shape[1]
    if op.startswith("apply"):
        scale, shift = _eval_affine(t)
        if op == "apply":
            return lambda: bn_ops.bn_apply(x, scale, shift)
        if op == "apply_residual":
            return lambda: bn_ops.bn_apply(x, scale, shift, t["r"])
        scale_r, shift_r = _eval_affine(t, "_r")
        return lambda: bn_ops.bn_apply(x, scale, shift, t["r"], scale_r, shift_r)
    if op == "train_forward":
        weight, bias = t["weight"], t["bias"]
        return lambda: bn_ops.bn_train_act(x, (*bn_ops.bn_stats(x), count), weight, bias, 1e-5)
    mean, m2 = bn_ops.bn_stats(x)
    scale, shift, invstd = bn_ops.bn_finalize(mean, m2, count, t["weight"], t["bias"], 1e-5)

    def backward():  # what the native backend runs: one op
        grad_x, _, grad_w, grad_b, _, _ = bn_ops.bn_backward(
            t["grad"], x, scale, shift, None, None, None, True, mean, invstd, None, None, count,
            False,
        )  # fmt: skip
        return grad_x, grad_w, grad_b

    return backward


def _traffic_bytes(op: str, t: dict) -> int:
    """Compulsory bytes of the fused op: every activation read or written once per pass."""
    n = t["x"].numel() * t["x"].element_size()
    return (
        n
        * {
            "apply": 2,
            "apply_residual": 3,
            "apply_two_bn": 3,
            "train_forward": 3,  # stats pass + apply pass
            "train_backward": 5,  # reduce (grad, x) + elemt (grad, x, out)
        }[op]
    )


def _as_tuple(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _check(op: str, t: dict) -> None:
    """The fused result against the eager one recomputed in float64 (the gold)."""
    t64 = {k: v.double() for k, v in t.items()}
    actual, base, gold = (
        _as_tuple(f(op, d)()) for f, d in ((_fused, t), (_eager, t), (_eager, t64))
    )
    for i, (a, b, g) in enumerate(zip(actual, base, gold, strict=True)):
        assert_matches_oracle(a, b, g, torch.float32, f"{op} result {i}")


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_bench_batchnorm(benchmark, op: str, shape: str, system: str) -> None:
    c, hw = SHAPES[shape]
    t = _tensors(c, hw)
    _away_from_relu_kink(op, t)
    mode = "train" if op.startswith("train") else "infer"
    benchmark.group = f"{op}-{shape}x{BATCH}-fp32-{mode}"
    if system == "fused":
        _check(op, t)
    fn = _fused(op, t) if system == "fused" else _eager(op, t)

    def run():
        fn()
        _sync()

    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        gb_per_s=_traffic_bytes(op, t) / seconds / 1e9,
    )
