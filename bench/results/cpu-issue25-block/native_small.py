"""Host-visible CPU forwards of the backends that share the plans, the bound backend and the
fold key with the triton backend: 'native' and 'auto' (nothing timed: FASTRES_TRITON_TUNE=0),
ResNet-50 and Res2Net-50 inference (no_grad, eval) at 1x3x32x32, fp32, one thread. Run once
per tree (`run.sh` in turns): ms per forward, process CPU time, best of 7 rounds of 20.

    PYTHONPATH=<tree> .venv/bin/python bench/results/cpu-issue25-block/native_small.py NAME
"""

import json
import os
import sys
import time

os.environ["FASTRES_TRITON_TUNE"] = "0"

import torch  # noqa: E402

import fastres  # noqa: E402
from fastres.testing import randomize_norms  # noqa: E402


def best_ms(model, x, forwards: int = 20, rounds: int = 7) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for _ in range(rounds):
            start = time.process_time()
            for _ in range(forwards):
                model(x)
            best = min(best, (time.process_time() - start) * 1e3 / forwards)
    return round(best, 3)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    row = {"tree": sys.argv[1]}
    for name, ctor in (("resnet50", fastres.ResNet), ("res2net50", fastres.Res2Net)):
        for backend in ("native", "auto"):
            model = randomize_norms(ctor(depth=50, backend=backend)).eval()
            row[f"{name}-{backend}"] = best_ms(model, x)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
