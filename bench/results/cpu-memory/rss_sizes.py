"""RSS growth of ResNet eval forwards at random input sizes, one backend per process.

    PYTHONPATH=<tree> python rss_sizes.py <backend> [--depth 18] [--batch 1] [--steps 120]
        [--lo 64] [--hi 256] [--seed 0] [--env K=V ...]

Builds the model, runs one 224 px warm-up forward, reads VmRSS (/proc/self/status), runs
`steps` no-grad forwards at sizes drawn uniformly from [lo, hi] (height and width apart),
reads VmRSS again, then calls fastres.cpu_cache.release() and reads it a third time.
"""

import argparse
import random

import torch

import fastres
from fastres import cpu_cache


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("backend")
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lo", type=int, default=64)
    p.add_argument("--hi", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(0)
    rng = random.Random(a.seed)
    model = fastres.ResNet(depth=a.depth, backend=a.backend).eval()
    with torch.no_grad():
        model(torch.randn(a.batch, 3, 224, 224))
        start = rss_mib()
        for _ in range(a.steps):
            h, w = rng.randint(a.lo, a.hi), rng.randint(a.lo, a.hi)
            model(torch.randn(a.batch, 3, h, w))
    end = rss_mib()
    cache = cpu_cache.stats().cached_bytes / 2**20
    cpu_cache.release()
    released = rss_mib()
    print(
        f"{a.backend} depth {a.depth} b{a.batch} {a.steps} sizes {a.lo}-{a.hi}: "
        f"RSS start {start:.0f} MiB, growth {end - start:.0f} MiB "
        f"(block cache {cache:.0f} MiB), after release() {released - start:.0f} MiB"
    )


if __name__ == "__main__":
    main()
