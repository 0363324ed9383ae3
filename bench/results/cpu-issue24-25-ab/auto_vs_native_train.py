"""'auto' against native on the CPU bench's ResNet-50 training step, in one process.

    cd bench/results/cpu-issue24-25-ab
    FASTRES_CACHE_DIR=$(mktemp -d) ../../../.venv/bin/python auto_vs_native_train.py

b8x128 fp32 channels_last, the bench's model (seed 0); 'auto' tunes in its first step. Then six
steps of each, in alternating order; prints the median and min ms per step.
"""

import copy
import statistics
import time

import torch

from fastres.benchmark.case import build_model


def step(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).float().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    base = build_model("resnet", 50).to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 128, 128).contiguous(memory_format=torch.channels_last)
    models = {name: copy.deepcopy(base).set_backend(name) for name in ("native", "auto")}
    for name, model in models.items():
        print(name, "first step", round(step(model, x), 2), "s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(6):
        order = list(models.items()) if r % 2 == 0 else list(reversed(models.items()))
        for name, model in order:
            times[name].append(step(model, x))
    for name, ts in times.items():
        median, best = statistics.median(ts) * 1e3, min(ts) * 1e3
        print(name, "median ms", round(median, 1), "min", round(best, 1))


if __name__ == "__main__":
    main()
