"""The two ways to remove host cost entirely, checked and timed (issue 25; README, "Removing
host cost"): `torch.compile(model, mode="reduce-overhead")` and
`torch.cuda.make_graphed_callables`, each against the float64 oracle and beside eager
channels_last (the 'torch' backend: PyTorch's own modules).

    python scripts/cuda_graphs.py                       # ResNet-50, b32 bf16 224 px, native
    python scripts/cuda_graphs.py --backend auto --batch 8 --mode train
    python scripts/cuda_graphs.py --dry-run             # CPU, tiny: the logic, nothing captured

Per mode (inference; a training step: forward and backward), each way is built, warmed up
(fastres tunes and chooses in the warm-up, before any capture), checked once against the float64
oracle (the output, and in training the gradient of the first conv's weight; docs/contract.md
§3) and timed: the median of CUDA-event timings of single steps, which count the host's launch
gaps. One row per way: ms per step, speedup over eager-cl, and whether it agreed. A way that
fails is a row with its error, not the end of the run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch

import fastres
from fastres.testing import assert_matches_oracle, randomize_norms

CL = torch.channels_last
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _model(args) -> torch.nn.Module:
    if args.model == "resnet":
        model = fastres.ResNet(depth=50, num_classes=1000, base_channels=args.base_channels)
    else:
        model = fastres.Res2Net(depth=50, num_classes=1000, base_channels=args.base_channels)
    torch.manual_seed(0)
    return randomize_norms(model, seed=0)


class Step:
    """One way of running a model: `run(x)` returns what is compared (the output; in training
    also the first conv weight's gradient)."""

    def __init__(self, model: torch.nn.Module, train: bool, autocast: Callable):
        self.model, self.train, self.autocast = model, train, autocast
        self.forward: Callable = model

    def run(self, x: torch.Tensor) -> list[torch.Tensor]:
        weight = next(self.model.parameters())
        with self.autocast(), torch.set_grad_enabled(self.train):
            out = self.forward(x)
        if not self.train:
            return [out.detach()]
        weight.grad = None
        out.float().square().mean().backward()
        return [out.detach(), weight.grad.detach().clone()]


def _build(way: str, model, x: torch.Tensor, train: bool, autocast, dry: bool) -> Step:
    step = Step(model, train, autocast)
    if dry or way in ("eager-cl", "fastres"):
        return step  # dry: the way's checks and timing, nothing compiled or captured
    if way == "reduce-overhead":
        step.forward = torch.compile(model, mode="reduce-overhead")
    elif way == "graphed":
        if not train:
            model.requires_grad_(False)  # inference: a forward graph only
        sample = x.detach().requires_grad_(False)
        with autocast():
            step.forward = torch.cuda.make_graphed_callables(model, (sample,))
    return step


def _time_ms(step: Step, x: torch.Tensor, device: torch.device, iters: int) -> float:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.run(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step.run(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _agrees(results, base, gold, dtype) -> str:
    try:
        for name, r, b, g in zip(("output", "conv1 grad"), results, base, gold):
            assert_matches_oracle(r, b, g, dtype, name)
    except AssertionError as failure:
        return "DISAGREES: " + str(failure).splitlines()[0]
    return "agrees"


WAYS = ("eager-cl", "fastres", "reduce-overhead", "graphed")


def run(args) -> int:
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = DTYPES[args.dtype]

    def autocast():
        # make_graphed_callables refuses autocast's weight cache
        return torch.autocast(device.type, dtype, enabled=dtype != torch.float32,
                              cache_enabled=False)  # fmt: skip

    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=CL)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    failures = 0
    for mode in args.modes:
        train = mode == "train"
        model = _model(args).train(train).to(device, memory_format=CL)
        gold = copy.deepcopy(model).double().set_backend("torch")
        base = copy.deepcopy(model).set_backend("torch")
        gold_results = Step(gold, train, lambda: torch.autocast(device.type, enabled=False))
        gold_results = gold_results.run(x.double())
        base_results = Step(base, train, autocast).run(x)
        print(
            f"{args.model}50 {mode}, b{args.batch} {args.dtype} {args.image_size} px, backend "
            f"{args.backend}, on {name}{' (dry run: nothing captured)' if args.dry_run else ''}"
        )
        print(f"  {'way':16s} {'build s':>8s} {'ms/step':>8s} {'vs eager-cl':>11s}  check")
        eager_ms = None
        for way in WAYS:
            # Each way on a fresh copy of the same weights and statistics; training's first step
            # (the one checked) sees the statistics the oracle saw.
            copy_ = copy.deepcopy(model).set_backend("torch" if way == "eager-cl" else args.backend)
            t0 = time.perf_counter()
            try:
                step = _build(way, copy_, x, train, autocast, args.dry_run)
                check = _agrees(step.run(x), base_results, gold_results, dtype)
                for _ in range(args.warmup):
                    step.run(x)
                built = time.perf_counter() - t0
                ms = _time_ms(step, x, device, args.iters)
            except Exception as failure:  # one way's failure is a row, not the end
                failures += 1
                print(f"  {way:16s} failed: {type(failure).__name__}: {failure}", flush=True)
                continue
            failures += check != "agrees"
            eager_ms = eager_ms or ms
            print(f"  {way:16s} {built:8.1f} {ms:8.3f} {eager_ms / ms:10.2f}x  {check}",
                  flush=True)  # fmt: skip
            del step, copy_
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet", "res2net"), default="resnet")
    parser.add_argument("--backend", default="native", help="the fastres backend (native)")
    parser.add_argument("--mode", dest="modes", action="append", choices=("infer", "train"),
                        help="infer and/or train (default both)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny, nothing captured")
    args = parser.parse_args(argv)
    args.modes = args.modes or ["infer", "train"]
    if args.dry_run:
        args.batch, args.image_size, args.dtype, args.base_channels = 2, 32, "fp32", 8
        args.iters, args.warmup = 2, 1
    elif not torch.cuda.is_available():
        parser.error("no CUDA device (--dry-run rehearses on CPU)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
