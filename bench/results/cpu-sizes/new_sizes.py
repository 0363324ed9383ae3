"""What 'auto' costs when every forward brings a new image size (issue 27, point 2).

    python bench/results/cpu-sizes/new_sizes.py [--backend auto|native] [--runs N]

ResNet-18 (the full model, random weights), eval mode, batch 1, ten square sizes from 128 to
416 px (128 + 32 k): each backend in a fresh process with an empty FASTRES_CACHE_DIR, so that
'auto' starts with nothing chosen. Reported: the wall seconds of the ten forwards (each size
once, in order, the first forward of the process included), how many sites 'auto' tuned (calls
of `select._tune`) and the entries of selection.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = [128 + 32 * k for k in range(10)]


def _one(backend: str) -> dict:
    import torch

    import fastres
    from fastres.backends import select

    tunings = 0
    tune = select._tune

    def counting(*args):
        nonlocal tunings
        tunings += 1
        return tune(*args)

    select._tune = counting
    model = fastres.ResNet(depth=18, backend=backend).eval()
    per_size = []
    with torch.no_grad():
        start = time.perf_counter()
        for size in SIZES:
            begin = time.perf_counter()
            model(torch.randn(1, 3, size, size))
            per_size.append(round(time.perf_counter() - begin, 3))
        total = time.perf_counter() - start
    path = os.path.join(os.environ["FASTRES_CACHE_DIR"], select.SELECTION_FILE)
    entries = 0
    if os.path.exists(path):
        with open(path) as f:
            entries = sum(len(v) for v in json.load(f).values())
    return {
        "backend": backend,
        "seconds": round(total, 2),
        "per_size_s": per_size,
        "tunings": tunings,
        "selection_entries": entries,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["auto", "native"])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    if args.backend:
        print(json.dumps(_one(args.backend)))
        return
    for _ in range(args.runs):
        for backend in ("native", "auto"):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "FASTRES_CACHE_DIR": cache}
                env.pop("FASTRES_BACKEND", None)
                env.pop("FASTRES_SELECT", None)
                out = subprocess.run(
                    [sys.executable, __file__, "--backend", backend],
                    env=env, check=True, capture_output=True, text=True,
                )  # fmt: skip
                print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
