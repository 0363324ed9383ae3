"""Why fastres is as fast as it is on a GPU, op by op: the op-level figures of
`scripts/gpu_check.sh`'s first call (issue 24), each a table printed as soon as it is measured.

    python bench/gpu_why.py bn             # every BatchNorm op against ATen's, GB/s
    python bench/gpu_why.py cudnn-fused    # cuDNN's fused conv calls against conv + bn_apply
    python bench/gpu_why.py triton-conv    # the Triton convolution per ResNet-50 shape against
                                           # F.conv2d (FASTRES_TRITON_TUNE=0 / 1: tiles untuned
                                           # / tuned)
    ... --dry-run                          # tiny sizes on CPU tensors: the logic, no figures

Times are medians of CUDA-event timings after warm-up (`_time_ms`); each row also gives the
result's relative error against the reference system of its table (ATen's op, the unfused
conv + apply, F.conv2d + BN), so that a fast wrong variant shows. GB/s counts each op's
compulsory traffic (every activation read or written once per pass) and is set against the
device's measured copy bandwidth, the target of issue 24 (>= 80% of it at C >= 256, >= 60% at
C = 64).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # layer_bench, beside this file

from fastres.ops import batchnorm as bn_ops  # noqa: E402
from fastres.testing import relative_error  # noqa: E402

DTYPE = torch.bfloat16
CL = torch.channels_last
# [N, C, H, W] of ResNet-50's BatchNorms at b256 224 px (issue 24).
BN_SHAPES = [
    (256, 64, 112, 112),
    (256, 64, 56, 56),
    (256, 256, 56, 56),
    (256, 128, 28, 28),
    (256, 1024, 14, 14),
    (256, 2048, 7, 7),
]
BN_OPS = ("apply", "apply_residual", "train_forward", "train_backward")
# Passes over an activation-sized tensor each op must make (its compulsory traffic).
BN_PASSES = {"apply": 2, "apply_residual": 3, "train_forward": 3, "train_backward": 5}


class Sizes:
    """Where and how large: the GPU figures, or (`dry`) tiny CPU tensors."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.batch = 2 if dry else 256
        self.image_size = 32 if dry else 224
        self.reps = 2 if dry else 20

    def bn_shapes(self) -> list[tuple[int, int, int, int]]:
        if self.dry:
            return [(self.batch, c, max(h // 16, 2), max(w // 16, 2)) for _, c, h, w in BN_SHAPES]
        return BN_SHAPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable, device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, the host clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_call_ms(fn: Callable, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _error(result, reference) -> float:
    if isinstance(result, tuple):
        return max(_error(r, b) for r, b in zip(result, reference, strict=True))
    return relative_error(result.float(), reference.double())


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# -- (2) BatchNorm ops -------------------------------------------------------------------------


def _bn_tensors(shape, device) -> dict:
    n, c, h, w = shape

    def act():
        return torch.randn(n, c, h, w, device=device, dtype=DTYPE).contiguous(memory_format=CL)

    def vec(lo):
        return torch.rand(c, device=device) + lo

    return dict(x=act(), r=act(), grad=act(), weight=vec(0.5), bias=vec(-0.5),
                running_mean=vec(-0.5), running_var=vec(0.5))  # fmt: skip


def _eval_affine(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t["weight"] * torch.rsqrt(t["running_var"] + 1e-5)
    return scale, t["bias"] - t["running_mean"] * scale


def _bn_aten(op: str, t: dict) -> Callable:
    """ATen's BatchNorm (what nn.BatchNorm2d runs) with the ReLU / residual eager adds."""
    x = t["x"]
    if op == "apply":
        stats = t["running_mean"], t["running_var"], t["weight"], t["bias"]
        return lambda: torch.relu_(F.batch_norm(x, *stats, False))
    if op == "apply_residual":
        stats = t["running_mean"], t["running_var"], t["weight"], t["bias"]
        return lambda: torch.relu_(F.batch_norm(x, *stats, False).add_(t["r"]))
    if op == "train_forward":
        return lambda: torch.relu_(F.batch_norm(x, None, None, t["weight"], t["bias"], True))
    xg = x.detach().requires_grad_()
    wg, bg = t["weight"].detach().requires_grad_(), t["bias"].detach().requires_grad_()
    y = torch.relu(F.batch_norm(xg, None, None, wg, bg, True))
    return lambda: torch.autograd.grad(y, (xg, wg, bg), t["grad"], retain_graph=True)


def _bn_fastres(op: str, t: dict) -> Callable:
    """The extension's BatchNorm ops as the fused backends call them (`fastres.ops.batchnorm`)."""
    x, count = t["x"], t["x"].numel() // t["x"].shape[1]
    if op.startswith("apply"):
        scale, shift = _eval_affine(t)
        residual = t["r"] if op == "apply_residual" else None
        return lambda: bn_ops.bn_apply(x, scale, shift, residual)
    weight, bias = t["weight"], t["bias"]
    if op == "train_forward":
        return lambda: bn_ops.bn_train_act(x, (*bn_ops.bn_stats(x), count), weight, bias, 1e-5)
    mean, m2 = bn_ops.bn_stats(x)
    scale, shift, invstd = bn_ops.bn_finalize(mean, m2, count, weight, bias, 1e-5)

    def backward():  # what the native backend runs: one op
        grad_x, _, grad_w, grad_b, _, _ = bn_ops.bn_backward(
            t["grad"], x, scale, shift, None, None, None, True, mean, invstd, None, None, count,
            False,
        )  # fmt: skip
        return grad_x, grad_w, grad_b

    return backward


# The BatchNorm implementations timed against ATen: name -> (op, tensors) -> a callable, or None
# where it has no such op. New kernels enter here as variants (issue 24: a kernel checked only
# on a GPU is timed beside the current one, its error against ATen in the same row).
BN_VARIANTS: dict[str, Callable[[str, dict], Callable | None]] = {
    "fastres": _bn_fastres,
}


def copy_gb_per_s(sizes: Sizes) -> float:
    """The device's measured copy bandwidth (read + write), GB/s: the 100% of the BN table."""
    x = torch.empty(_copy_numel(sizes), device=sizes.device, dtype=DTYPE)
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), sizes.device, sizes.reps)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def _copy_numel(sizes: Sizes) -> int:
    return 1 << 16 if sizes.dry else 256 * 256 * 56 * 56


def run_bn(sizes: Sizes) -> None:
    copy_rate = copy_gb_per_s(sizes)
    print(f"BatchNorm ops, bf16 channels_last on {_device_name(sizes.device)}; copy bandwidth "
          f"{copy_rate:.0f} GB/s (= 100%)")  # fmt: skip
    print(f"  {'op':15s} {'shape':20s} {'system':12s} {'ms':>8s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'vs aten':>7s} {'err':>8s}")  # fmt: skip
    for shape in sizes.bn_shapes():
        t = _bn_tensors(shape, sizes.device)
        for op in BN_OPS:
            traffic = BN_PASSES[op] * t["x"].numel() * t["x"].element_size()
            aten = _bn_aten(op, t)
            reference = aten()
            aten_ms = _time_ms(aten, sizes.device, sizes.reps)
            rows = [("aten", aten_ms, 0.0)]
            for name, make in BN_VARIANTS.items():
                fn = make(op, t)
                if fn is None:
                    continue
                try:
                    error = _error(fn(), reference)
                    rows.append((name, _time_ms(fn, sizes.device, sizes.reps), error))
                except Exception as failure:  # one variant's failure is a row, not the end
                    print(f"  {op:15s} {'x'.join(map(str, shape)):20s} {name:12s} failed: "
                          f"{type(failure).__name__}: {failure}")  # fmt: skip
            for name, ms, error in rows:
                rate = traffic / (ms * 1e-3) / 1e9
                print(f"  {op:15s} {'x'.join(map(str, shape)):20s} {name:12s} {ms:8.3f} "
                      f"{rate:7.0f} {100 * rate / copy_rate:5.0f}% {aten_ms / ms:6.2f}x "
                      f"{error:8.1e}", flush=True)  # fmt: skip
        del t
        if sizes.device.type == "cuda":
            torch.cuda.empty_cache()


# -- (3) cuDNN's fused calls -------------------------------------------------------------------


def _fused_layers(sizes: Sizes) -> dict[str, dict]:
    """The stem's conv and the conv3 of each stage (with the shortcut added: a block tail)."""
    from layer_bench import resnet50_layers

    chosen = {}
    for name, spec in resnet50_layers(sizes.image_size).items():
        stage = name.split(".")[0]
        if name.startswith("conv1-") or (
            spec["epilogue"] == "bias_add_relu" and stage not in {n.split(".")[0] for n in chosen}
        ):
            chosen[name] = spec
    return chosen


def _layer_input(spec: dict, sizes: Sizes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, weight (bf16 channels_last) and bf16 bias of one conv layer."""
    k, device = spec["kernel"], sizes.device
    x = torch.randn(sizes.batch, spec["c_in"], spec["h"], spec["w"], device=device).relu()
    weight = torch.randn(spec["c_out"], spec["c_in"], k, k, device=device)
    weight = weight / (spec["c_in"] * k * k) ** 0.5
    bias = torch.randn(spec["c_out"], device=device) * 0.1
    as_cl = lambda t: t.to(DTYPE).contiguous(memory_format=CL)
    return as_cl(x), as_cl(weight), bias.to(DTYPE)


def _residual(spec: dict, sizes: Sizes) -> torch.Tensor | None:
    """The shortcut a block tail adds (None for other layers)."""
    if spec["epilogue"] != "bias_add_relu":
        return None
    out_hw = (spec["h"] + 2 * spec["padding"] - spec["kernel"]) // spec["stride"] + 1
    z = torch.randn(sizes.batch, spec["c_out"], out_hw, out_hw, device=sizes.device)
    return z.to(DTYPE).contiguous(memory_format=CL)


def _cudnn_systems(spec: dict, sizes: Sizes) -> dict[str, Callable]:
    """conv + bn_apply (what native runs: the BN folded into weight and bias, then one
    elementwise pass) and, where cuDNN runs, its fused call; the first is the reference."""
    x, weight, bias = _layer_input(spec, sizes)
    z = _residual(spec, sizes)
    ones = torch.ones(spec["c_out"], device=sizes.device)
    s, p = spec["stride"], spec["padding"]
    geometry = ((s, s), (p, p), (1, 1), 1)

    def conv_apply():
        return bn_ops.bn_apply(F.conv2d(x, weight, None, *geometry), ones, bias.float(), z)

    systems = {"conv+apply": conv_apply}
    if sizes.device.type == "cuda" and torch.backends.cudnn.is_available():
        if z is not None:
            systems["cudnn-fused"] = lambda: torch.cudnn_convolution_add_relu(
                x, weight, z, 1.0, bias, *geometry
            )
        else:
            systems["cudnn-fused"] = lambda: torch.cudnn_convolution_relu(
                x, weight, bias, *geometry
            )
    return systems


def run_cudnn_fused(sizes: Sizes) -> None:
    device = sizes.device
    print(f"cuDNN fused conv calls against conv + bn_apply, b{sizes.batch} bf16 channels_last on "
          f"{_device_name(device)} (first: the first call, plans and all)")  # fmt: skip
    print(f"  {'layer':42s} {'system':14s} {'first ms':>9s} {'ms':>8s} {'vs conv+apply':>13s} "
          f"{'err':>8s}")  # fmt: skip
    for name, spec in _fused_layers(sizes).items():
        systems = _cudnn_systems(spec, sizes)
        reference, base_ms = None, None
        for system, fn in systems.items():
            try:
                first = _first_call_ms(fn, device)
                result = fn()
                ms = _time_ms(fn, device, sizes.reps)
            except Exception as failure:
                print(f"  {name:42s} {system:14s} failed: {type(failure).__name__}: {failure}")
                continue
            if reference is None:
                reference, base_ms = result, ms
            print(f"  {name:42s} {system:14s} {first:9.2f} {ms:8.3f} {base_ms / ms:12.2f}x "
                  f"{_error(result, reference):8.1e}", flush=True)  # fmt: skip
        if "cudnn-fused" not in systems:
            print(f"  {name:42s} {'cudnn-fused':14s} not timed: no cuDNN on {device.type}")


# -- (4) the Triton convolution per shape ------------------------------------------------------


def run_triton_conv(sizes: Sizes) -> None:
    from layer_bench import resnet50_layers

    from fastres.ops import tuning

    device = sizes.device
    state = "tuned" if tuning.tuning_enabled() else f"untuned ({tuning.TUNE_ENV_VAR}=0)"
    print(
        f"Triton conv2d_fused per ResNet-50 shape, tiles {state}, against F.conv2d + BN "
        f"(+ add) + ReLU, b{sizes.batch} bf16 channels_last on {_device_name(device)}"
    )
    print(f"  {'layer':42s} {'first ms':>9s} {'triton ms':>9s} {'eager ms':>9s} "
          f"{'speedup':>7s} {'err':>8s}")  # fmt: skip
    layers = resnet50_layers(sizes.image_size)
    if sizes.dry:  # the interpreter: two shapes show the logic
        layers = dict(list(layers.items())[:2])
    for name, spec in layers.items():
        triton_conv, eager = _triton_pair(spec, sizes)
        try:
            first = _first_call_ms(triton_conv, device)
            error = _error(triton_conv(), eager())
            fused_ms = _time_ms(triton_conv, device, sizes.reps)
        except Exception as failure:
            print(f"  {name:42s} failed: {type(failure).__name__}: {failure}", flush=True)
            continue
        eager_ms = _time_ms(eager, device, sizes.reps)
        print(f"  {name:42s} {first:9.1f} {fused_ms:9.3f} {eager_ms:9.3f} "
              f"{eager_ms / fused_ms:6.2f}x {error:8.1e}", flush=True)  # fmt: skip


def _triton_pair(spec: dict, sizes: Sizes) -> tuple[Callable, Callable]:
    """The layer as the triton backend runs it in inference (conv2d_fused, the folded BN as
    bias and the epilogue fused) and as eager does (F.conv2d with the bias, add, ReLU)."""
    from fastres.ops.conv2d_fused import arrange_weight, conv2d_fused

    x, weight, bias = _layer_input(spec, sizes)
    residual = _residual(spec, sizes)
    relu = spec["epilogue"] != "bias"
    stride, padding = (spec["stride"],) * 2, (spec["padding"],) * 2
    arranged = arrange_weight(weight)

    def triton_conv():
        return conv2d_fused(
            x, arranged, bias.float(), stride=stride, padding=padding, residual=residual,
            relu=relu,
        )  # fmt: skip

    def eager():
        y = F.conv2d(x, weight, bias, stride, padding)
        y = y + residual if residual is not None else y
        return torch.relu(y) if relu else y

    return triton_conv, eager


SECTIONS = {"bn": run_bn, "cudnn-fused": run_cudnn_fused, "triton-conv": run_triton_conv}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=SECTIONS)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU tensors")
    args = parser.parse_args(argv)
    with torch.no_grad() if args.section != "bn" else torch.enable_grad():
        SECTIONS[args.section](Sizes(args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
