"""Times fastres ResNet-50 alone (b8 224 fp32, channels_last), one mode per process.

    FASTRES_BACKEND=native PYTHONPATH=<tree> python time_native.py {infer,train} <label>

(any backend through FASTRES_BACKEND: `cpu-select/ab-native-auto.txt` ran it with auto too).

infer: 15 no-grad forwards after 3 warm-up ones; train: 7 steps (forward, backward, SGD) after
2. Prints the minimum and the median in ms.
"""

import sys
import time

import torch

import fastres


def main(mode: str, label: str) -> None:
    torch.manual_seed(0)
    model = fastres.ResNet(depth=50).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    if mode == "infer":
        model.eval()
        warmup, steps = 3, 15

        @torch.no_grad()
        def step() -> None:
            model(x)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        warmup, steps = 2, 7

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            model(x)[-1].float().mean().backward()
            optimizer.step()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"{label} {mode}: min {times[0] * 1e3:.1f} ms, median {times[steps // 2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
