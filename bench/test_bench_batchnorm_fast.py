"""GB/s of the CUDA BatchNorm kernels, variant 0 (batchnorm_kernels.cu) and 1
(batchnorm_fast_kernels.cu), and of ATen's own CUDA BatchNorm primitives, against targets set
by the device's measured copy bandwidth. CUDA only: skipped elsewhere.

Each kernel's expected bytes are its compulsory traffic, every tensor of x's shape read or
written once (element size e, numel n; per-channel vectors and partials left out):

- `stats`            x read:                                   n e
- `apply`            x read, out written:                      2 n e
- `apply_residual`   x and r read, out written:                3 n e
- `backward_reduce`  grad_out and x read:                      2 n e
- `backward_elemt`   grad_out and x read, grad_x written:      3 n e

GB/s = expected bytes / the median time of `_RUNS` CUDA-event-timed calls. The targets
(issue 24): at least 80% of the copy bandwidth (`x.copy_(y)`, 2 n e per copy, measured here)
at C >= 256, at least 60% at smaller C. bf16 at every shape, fp16 and fp32 at two. Each case
checks variant 1 against the float64 reference once (docs/contract.md §3), then prints one
line per system: kernel, shape, layout, dtype, system, ms, GB/s, the target and whether it is
met. A kernel below target is reported, not
failed: the figures are what the GPU session commits.

    pytest bench/test_bench_batchnorm_fast.py -s
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastres.extension import EXTENSION_ERROR, cuda_kernels_built
from fastres.ops import batchnorm_reference as ref
from fastres.testing import assert_matches_oracle

pytestmark = [
    pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR)),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernels: no GPU"),
    pytest.mark.skipif(
        EXTENSION_ERROR is None and not cuda_kernels_built(),
        reason="fastres._C built without CUDA kernels",
    ),
]

# The BN shapes of the GPU call (ResNet-50, batch 256, 224 px).
SHAPES = {
    "c64-112": (256, 64, 112, 112),
    "c64-56": (256, 64, 56, 56),
    "c256-56": (256, 256, 56, 56),
    "c128-28": (256, 128, 28, 28),
    "c1024-14": (256, 1024, 14, 14),
    "c2048-7": (256, 2048, 7, 7),
}
KERNELS = ("stats", "apply", "apply_residual", "backward_reduce", "backward_elemt")
# Tensors of x's shape each kernel reads or writes once.
TRAFFIC = {"stats": 1, "apply": 2, "apply_residual": 3, "backward_reduce": 2, "backward_elemt": 3}
LAYOUTS = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_OTHER_DTYPE_SHAPES = (SHAPES["c64-56"], SHAPES["c256-56"])
_RUNS = 20


def _median_ms(fn) -> float:
    fn()  # warm-up (first-call costs)
    torch.cuda.synchronize()
    times = []
    for _ in range(_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@functools.cache
def copy_gbps() -> float:
    """The device's copy bandwidth: 1 GiB copied, read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_ms(lambda: dst.copy_(src)) / 1e6


def target_gbps(c: int) -> float:
    return (0.8 if c >= 256 else 0.6) * copy_gbps()


def _inputs(shape, dtype, layout):
    def act():
        return torch.randn(shape, device="cuda", dtype=dtype).contiguous(memory_format=layout)

    c = shape[1]
    vec = {
        k: torch.rand(c, device="cuda") + 0.5
        for k in ("scale", "shift", "mean", "invstd", "weight")
    }
    return act(), act(), act(), vec


def _calls(kernel: str, shape, dtype, layout):
    """{system: (op args, fused call(variant) or ATen call)} for the kernel."""
    x, r, g, v = _inputs(shape, dtype, layout)
    count = x.numel() // shape[1]
    ops = torch.ops.fastres
    if kernel == "stats":
        args = (x,)
        fused = lambda variant: ops.bn_stats(x, variant)  # noqa: E731
        aten = lambda: torch.batch_norm_stats(x, 1e-5)  # noqa: E731
    elif kernel in ("apply", "apply_residual"):
        residual = r if kernel == "apply_residual" else None
        args = (x, v["scale"], v["shift"], residual, None, None, True)
        fused = lambda variant: ops.bn_apply(*args, variant)  # noqa: E731
        aten = None
        if residual is None:  # ATen's element-wise BN has no ReLU: left at its bytes
            aten = lambda: torch.batch_norm_elemt(  # noqa: E731
                x, v["weight"], v["shift"], v["mean"], v["invstd"], 1e-5
            )
    elif kernel == "backward_reduce":
        args = (g, x, v["scale"], v["shift"], None, None, None, False, v["mean"], None)
        fused = lambda variant: ops.bn_backward_reduce(*args, variant)  # noqa: E731
        aten = lambda: torch.batch_norm_backward_reduce(  # noqa: E731
            g, x, v["mean"], v["invstd"], v["weight"], True, True, True
        )
    else:
        sums = ref.bn_backward_reduce(g, x, v["scale"], v["shift"], None, None, None, False,
                                      v["mean"], None)  # fmt: skip
        args = (
            g, x, v["scale"], v["shift"], None, None, None, False, v["mean"], v["invstd"],
            sums[0], sums[1], None, None, None, count, False,
        )  # fmt: skip
        fused = lambda variant: ops.bn_backward_elemt(*args, variant)  # noqa: E731
        aten = lambda: torch.batch_norm_backward_elemt(  # noqa: E731
            g, x, v["mean"], v["invstd"], v["weight"], sums[0], sums[1],
            torch.tensor([count], device="cuda", dtype=torch.int32),
        )  # fmt: skip
    return args, fused, aten


def _check_against_reference(kernel, args, fused, dtype) -> None:
    name = {"apply_residual": "bn_apply"}.get(kernel, "bn_" + kernel)
    actual = fused(1)
    base = getattr(ref, name)(*args)
    gold = getattr(ref, name)(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    actual = actual if isinstance(actual, tuple) else (actual,)
    base = base if isinstance(base, tuple) else (base,)
    gold = gold if isinstance(gold, tuple) else (gold,)
    for i, (a, b, gd) in enumerate(zip(actual, base, gold)):
        assert_matches_oracle(a, b, gd, dtype, f"{kernel}[{i}] variant 1")


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kernel", KERNELS)
def test_bn_kernel_gbps(kernel, shape, layout, dtype):
    if dtype != torch.bfloat16 and shape not in _OTHER_DTYPE_SHAPES:
        pytest.skip("fp16 / fp32 at two shapes only (the GPU call's time)")
    args, fused, aten = _calls(kernel, shape, dtype, layout)
    _check_against_reference(kernel, args, fused, dtype)
    size = args[0].numel() * args[0].element_size()
    expected = TRAFFIC[kernel] * size
    target = target_gbps(shape[1])
    systems = {"variant0": lambda: fused(0), "variant1": lambda: fused(1)}
    if aten is not None:
        systems["aten"] = aten
    for system, fn in systems.items():
        ms = _median_ms(fn)
        gbps = expected / ms / 1e6
        verdict = "meets" if gbps >= target else "below"
        print(
            f"\nbn-gbps {kernel:16s} {'x'.join(map(str, shape)):18s} "
            f"{[k for k, v in LAYOUTS.items() if v == layout][0]:4s} {str(dtype)[6:]:9s} "
            f"{system:9s} {ms:8.3f} ms {gbps:7.0f} GB/s target {target:5.0f} "
            f"(copy {copy_gbps():.0f}) {verdict}"
        )
