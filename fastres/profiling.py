"""`python -m fastres profile`: one configuration, N iterations, named ranges, torch.profiler.

Every forward of the stem, each stage and each block is wrapped in a range named after its
module path (`stem`, `layer2`, `layer2.0`, ...): an NVTX range on CUDA (for Nsight Systems /
Nsight Compute filters) and a torch.profiler `record_function` range everywhere (for the Chrome
trace). The ranges come from forward hooks, so they cover the forward pass only; the backward
kernels appear under autograd's own names.

On a GPU the profile ends with the device's busy time per iteration (the union of its kernels'
and copies' intervals) against the wall time of an unprofiled iteration: where the device is
idle for much of the wall time, the host's launches, not the kernels, set the speed.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.profiler import record_function

from . import backends
from . import benchmark as bm
from .models.resnet import ResBlock


class BlockRanges:
    """Forward hooks that open a named range around the stem, every stage and every block.

    The stem is not always run through its submodules (a fused backend reads their weights
    directly), so its range opens in the model's pre-hook and closes in the first stage's.
    """

    def __init__(self, model: nn.Module, nvtx: bool):
        self.nvtx = nvtx
        self.open: list[record_function] = []
        self.handles = []
        first_stage = getattr(model, model.res_layers[0])
        self.handles.append(model.register_forward_pre_hook(self._push("forward")))
        self.handles.append(model.register_forward_pre_hook(self._push("stem")))
        self.handles.append(first_stage.register_forward_pre_hook(self._pop))
        for name in model.res_layers:
            stage = getattr(model, name)
            self.handles.append(stage.register_forward_pre_hook(self._push(name)))
            self.handles.append(stage.register_forward_hook(self._pop))
            for index, block in enumerate(stage):
                if isinstance(block, ResBlock):
                    self.handles.append(
                        block.register_forward_pre_hook(self._push(f"{name}.{index}"))
                    )
                    self.handles.append(block.register_forward_hook(self._pop))
        self.handles.append(model.register_forward_hook(self._pop))

    def _push(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if self.nvtx:
                torch.cuda.nvtx.range_push(name)
            scope = record_function(name)
            scope.__enter__()
            self.open.append(scope)

        return hook

    def _pop(self, module: nn.Module, args: tuple, output=None) -> None:
        if not self.open:
            return
        self.open.pop().__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The time covered by the union of (start, end) intervals: overlapping kernels (several
    streams) count once."""
    busy, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def device_busy_us(prof: torch.profiler.profile) -> float:
    """Microseconds during which the GPU ran a kernel, copy or fill in the profile."""
    return busy_us(
        [
            (e.time_range.start, e.time_range.end)
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    )


def run_profile(args: argparse.Namespace) -> int:
    """Runs the configuration in `args` (see `python -m fastres profile --help`)."""
    config = bm.config_from_args(args, args.model, args.mode)
    device = torch.device(args.device)
    backend = args.backend
    if backend == "auto":
        backend = backends.resolve("auto", device).name
    system = bm.System(
        f"fastres-{backend}",
        backend=backend,
        channels_last=args.layout == "channels_last",
        compiled=args.compile,
    )
    print(
        f"fastres profile: {config.group}, backend {backend}, {args.layout}"
        f"{', torch.compile' if args.compile else ''} on {bm.device_name(device)}"
    )
    case = bm.Case(config, seed=args.seed)
    runner = case.runner(system)
    # Python hooks inside a compiled model would break its graph: no ranges under compile.
    ranges = None if args.compile else BlockRanges(runner.model, nvtx=device.type == "cuda")
    try:
        times = bm.time_steps(runner.step, device, args.iters, args.warmup)
        median = statistics.median(times)
        print(
            f"{args.iters} iterations after {args.warmup} warmup: median {median * 1e3:.2f} ms, "
            f"min {min(times) * 1e3:.2f} ms, {config.batch / median:,.1f} img/s"
        )
        if args.profile_iters > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
                for _ in range(args.profile_iters):
                    with record_function("iteration"):
                        runner.step()
                    bm.synchronize(device)
            sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(f"top ops over {args.profile_iters} profiled iterations ({sort_by}):")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top))
            if device.type == "cuda":
                busy_ms = device_busy_us(prof) / args.profile_iters / 1e3
                print(
                    f"GPU busy {busy_ms:.2f} ms per iteration of {median * 1e3:.2f} ms wall "
                    f"(median, unprofiled): {100 * busy_ms / (median * 1e3):.0f}% busy, "
                    f"{max(median * 1e3 - busy_ms, 0):.2f} ms idle (host-bound where large)"
                )
            if args.trace:
                prof.export_chrome_trace(args.trace)
                print(f"Chrome trace written to {args.trace}")
        elif args.trace:
            print("--trace needs --profile-iters > 0: no trace written")
    finally:
        if ranges is not None:
            ranges.remove()
    return 0
