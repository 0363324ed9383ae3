"""Host (Python) cost of the triton backend per kernel launch, on a machine without a GPU.

    .venv/bin/python scripts/host_cost.py [--workload resnet50 --workload res2net50]
        [--mode infer --mode train] [--forwards 5] [--repeats 3] [--no-backward] [--json FILE]

Every Triton kernel is compiled for sm_90 and launched nowhere: the stand-in driver of
`scripts/compile_report.py` (`Recorder.patched`) answers the JIT for a GPU that is not here, so
a forward runs the triton backend's whole Python path (plan, folds, launch configuration,
argument binding, custom-op dispatch, BatchNorm statistics ops on CPU tensors) but no kernel.
What a forward costs there is the host time a GPU forward would cost the CPU that drives it.

Configuration (the issue-25 figures): ResNet-50 and Res2Net-50 with base_channels=16 and
stem_channels=16, input 2x3x64x64 channels_last, bf16 CPU autocast, tuning off
(FASTRES_TRITON_TUNE=0), one thread. Measured, after one warm-up forward (which compiles, or
reads Triton's on-disk cache): the best of `--repeats` rounds of `--forwards` forwards each,

- inference: model.eval() under torch.no_grad();
- training forward: model.train() with autograd; with batch statistics ('train-bn') also
  `weight_casts_us_per_launch`, the share of it that its casts of weights to bf16 take
  (recorded in one forward, replayed alone: the stand-in computes them on the CPU; on a GPU
  each is a launch, as in eager autocast; Res2Net's padded weights are Triton launches);
- training backward: `sum(out.float().mean()).backward()` after each training forward, beside
  the same backward of the 'torch' backend (eager PyTorch) on the same model: both run their
  gradient kernels for real on CPU tensors (the triton backend's backward is PyTorch's
  convolution_backward and the extension's BatchNorm ops); `backward_vs_eager` is the ratio.

Times are the process's CPU time (`time.process_time`, one thread), not wall time: on a shared
machine the time other processes hold the cores is not counted.
`--ops` counts instead what one step launches (`KernelCounter`: ops but views and allocations,
and Triton launches) on the triton and the torch backend: the kernels a GPU step would run.

Launches per forward count the launches of the convolution and Res2Net pool kernels
(`LAUNCH_KERNELS`: not the small per-channel kernels beside them, the statistics merge and the
frozen-BN fold, whose host cost is counted in the forward's), through the JIT or directly
(`fastres.ops.launcher`). Prints one JSON line per workload and mode: ms per forward, launches,
us per launch.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ["FASTRES_TRITON_TUNE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from compile_report import Recorder  # noqa: E402  (pops TRITON_INTERPRET before triton loads)
from torch._library.custom_ops import OPDEFS  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastres  # noqa: E402
from fastres.ops import launcher  # noqa: E402

ARCH = 90
# train: model.train() as built (norm_eval: BatchNorms on running statistics, the detection
# default); train-bn: norm_eval off, every BatchNorm on batch statistics.
MODES = ("infer", "train", "train-bn")
DEFAULT_MODES = ("infer", "train")
WORKLOADS = {
    "resnet50": lambda: fastres.ResNet(depth=50, base_channels=16, stem_channels=16),
    "res2net50": lambda: fastres.Res2Net(depth=50, base_channels=16, stem_channels=16),
}


def _set_mode(model, mode: str) -> None:
    model.norm_eval = mode != "train-bn"
    model.train(mode != "infer")


def _outputs_loss(outs) -> torch.Tensor:
    return sum(o.float().mean() for o in outs)


# The kernels whose launches "us per launch" divides by: one per convolution (and Res2Net pool).
LAUNCH_KERNELS = ("conv2d_fused_kernel", "res2net_pool_kernel")


@contextlib.contextmanager
def _counting_launches(kernels: tuple[str, ...] | None = None):
    """Counts the launches inside the context of the kernels named `kernels` (None: all): the
    JIT's launching runs (not its compile-only warm-ups) and the direct launches of kernels it
    compiled (`launcher.launch_compiled`)."""
    patched_run, patched_launch, counter = JITFunction.run, launcher.launch_compiled, [0]

    def run(fn, *args, **kwargs):
        counter[0] += not kwargs.get("warmup") and (kernels is None or fn.__name__ in kernels)
        return patched_run(fn, *args, **kwargs)

    def launch_compiled(kernel, *args):
        counter[0] += kernels is None or kernel.src.fn.__name__ in kernels
        return patched_launch(kernel, *args)

    JITFunction.run, launcher.launch_compiled = run, launch_compiled
    try:
        yield counter
    finally:
        JITFunction.run, launcher.launch_compiled = patched_run, patched_launch


def _best_ms(step, forwards: int, repeats: int) -> float:
    """Best over `repeats` rounds of the mean ms of `step` over `forwards` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(forwards):
            step()
        best = min(best, (time.process_time() - start) * 1e3 / forwards)
    return best


def _backward_ms(model, x, forwards: int, repeats: int) -> float:
    """Best mean ms of the backward alone (each after its own training forward)."""
    best = float("inf")
    for _ in range(repeats):
        total = 0.0
        for _ in range(forwards):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _outputs_loss(model(x))
            start = time.process_time()
            loss.backward()
            total += time.process_time() - start
        best = min(best, total * 1e3 / forwards)
    return best


class _CastRecorder(TorchDispatchMode):
    """Records the casts (`aten._to_copy`: the weights' bf16 casts) dispatched under it."""

    def __init__(self):
        super().__init__()
        self.casts: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts.append((args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _weight_cast_ms(forward, forwards: int, repeats: int) -> float:
    """Best mean ms of the casts one forward makes (recorded, then replayed alone): the
    weights' bf16 casts, which the stand-in computes on the CPU, on a GPU each one launch.
    The part of a training forward that is not host cost on a GPU."""
    recorder = _CastRecorder()
    with recorder:
        forward()

    def casts():
        for args, kwargs in recorder.casts:
            torch.ops.aten._to_copy.default(*args, **kwargs)

    return _best_ms(casts, forwards, repeats)


def measure(
    name: str, forwards: int, repeats: int, modes=DEFAULT_MODES, backward: bool = True
) -> list[dict]:
    """The rows of one workload: inference, training forward (and backward) host cost."""
    torch.manual_seed(0)
    model = WORKLOADS[name]().to(memory_format=torch.channels_last).set_backend("triton")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    rows = []
    for mode in modes:
        _set_mode(model, mode)

        def forward(grad: bool = mode != "infer"):
            with torch.set_grad_enabled(grad), autocast:
                return model(x)

        forward()  # compiles (or reads Triton's cache), folds, picks the configurations
        with _counting_launches(LAUNCH_KERNELS) as launches:
            forward()
        ms = _best_ms(forward, forwards, repeats)
        per_launch = round(ms * 1e3 / launches[0], 1)
        row = {"workload": name, "mode": mode, "ms_per_forward": round(ms, 2),
               "launches": launches[0], "us_per_launch": per_launch}  # fmt: skip
        if mode == "train-bn":
            cast_ms = _weight_cast_ms(forward, forwards, repeats)
            row["weight_casts_us_per_launch"] = round(cast_ms * 1e3 / launches[0], 1)
        if mode != "infer" and backward:
            row["backward_ms"] = round(_backward_ms(model, x, forwards, repeats), 2)
            model.set_backend("torch")
            _backward_ms(model, x, 1, 1)  # warm-up
            row["eager_backward_ms"] = round(_backward_ms(model, x, forwards, repeats), 2)
            row["backward_vs_eager"] = round(row["backward_ms"] / row["eager_backward_ms"], 2)
            model.set_backend("triton")
        rows.append(row)
    return rows


class KernelCounter(TorchDispatchMode):
    """Counts what a step launches on a GPU: every PyTorch / extension op dispatched at any
    depth but views and allocations, and every Triton launch. The fastres ops written in
    Python (the Triton launchers, `bn_train_act`) are looked into: their own ops and launches
    count, not the op itself; fastres runs under it as without a mode (`SEES_THROUGH_FASTRES`)."""

    SEES_THROUGH_FASTRES = True
    ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        # The Python bodies of those ops (run with this mode on, so their ops are seen).
        self.bodies = {
            name.removeprefix("fastres::"): opdef._init_fn
            for name, opdef in OPDEFS.items()
            if name.startswith("fastres::")
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func.namespace == "fastres" and name in self.bodies:
            with self:
                return self.bodies[name](*args, **(kwargs or {}))
        if not (func.is_view or name in self.ALLOCATIONS):
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def counting_launches(self):
        with _counting_launches() as launches, self:
            yield
        self.ops["triton launches"] += launches[0]


def count_kernels(name: str, mode: str, backend: str) -> collections.Counter:
    """Ops and launches (`KernelCounter`) of one step: an inference forward, or a training
    forward and backward; after a warm-up step (and, training, an optimizer step: what a
    backend keeps per weight version is rebuilt, as in every real training step)."""
    torch.manual_seed(0)
    model = WORKLOADS[name]().to(memory_format=torch.channels_last).set_backend(backend)
    _set_mode(model, mode)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.set_grad_enabled(mode != "infer"), torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model(x)
        if mode != "infer":
            _outputs_loss(outs).backward()

    step()
    if mode != "infer":  # the weights change between training steps, as in a real loop
        torch.optim.SGD(model.parameters(), lr=1e-3).step()
    counter = KernelCounter()
    with counter.counting_launches():
        step()
    return counter.ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=tuple(WORKLOADS))
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--forwards", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--ops", action="store_true", help="count the kernels of a step "
                        "(`KernelCounter`) on the triton and torch backends instead")  # fmt: skip
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # the stand-in launches nothing: outputs are garbage
    rows = []
    with Recorder(all_candidates=False).patched(ARCH):
        for name in args.workload or WORKLOADS:
            if args.ops:
                for mode in args.mode or DEFAULT_MODES:
                    counts = {b: count_kernels(name, mode, b) for b in ("torch", "triton")}
                    row = {"workload": name, "mode": mode, "step_kernels": {
                        b: sum(c.values()) for b, c in counts.items()}}  # fmt: skip
                    row["by_op"] = {b: dict(c.most_common()) for b, c in counts.items()}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                continue
            for row in measure(
                name, args.forwards, args.repeats, args.mode or DEFAULT_MODES, not args.no_backward
            ):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
