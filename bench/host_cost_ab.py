"""scripts/host_cost.py before / after in one run: the host cost per launch and the kernels per
step of another checkout (before) and of this one (after), alternating, each with its own
script and stand-in driver; writes each round's JSON and `summary.txt` into OUT.

    .venv/bin/python bench/host_cost_ab.py /path/to/before-checkout OUT [--rounds 3]

The before checkout needs its extension built (fastres/_C*.so) and `fastres/kernels` importable
(an install, or a symlink to ../kernels). Timings are the process's CPU time on a shared
machine: compare the best round of each side, and read rows within ~15% as equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKLOADS = ("resnet50", "res2net50")
MODES = ("infer", "train", "train-bn")


def _host_cost(checkout: Path, json_path: Path, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(checkout / "scripts" / "host_cost.py"), "--json", str(json_path)]
    for workload in WORKLOADS:
        command += ["--workload", workload]
    for mode in MODES:
        command += ["--mode", mode]
    done = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def _best(out: Path, side: str) -> dict:
    """Per (workload, mode), the round with the fewest ms per forward."""
    rows: dict = {}
    for path in sorted(out.glob(f"{side}-*.json")):
        for row in json.loads(path.read_text()):
            key = (row["workload"], row["mode"])
            if key not in rows or row["ms_per_forward"] < rows[key]["ms_per_forward"]:
                rows[key] = row
    return rows


def summary(out: Path) -> str:
    before, after = _best(out, "before"), _best(out, "after")
    lines = [(out / "cpu.txt").read_text().strip(), "best round of each side: before / after"]
    lines.append(f"{'workload':<10} {'mode':<9} {'us/launch':>15} {'of which casts':>15} "
                 f"{'backward/eager':>15}")  # fmt: skip
    fields = ("us_per_launch", "weight_casts_us_per_launch", "backward_vs_eager")
    for key, b in before.items():
        a = after[key]
        pairs = " ".join(f"{b.get(f, '-'):>7} {a.get(f, '-'):>7}" for f in fields)
        lines.append(f"{key[0]:<10} {key[1]:<9} {pairs}")
    lines.append("\nkernels per step (forward, + backward when training): torch / triton")
    for side in ("before", "after"):
        for row in json.loads((out / f"ops-{side}.json").read_text()):
            k = row["step_kernels"]
            lines.append(f"{side:<7} {row['workload']:<10} {row['mode']:<9} {k['torch']:>5} "
                         f"{k['triton']:>6}")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"before": args.before.resolve(), "after": REPO}
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    (args.out / "cpu.txt").write_text(
        "".join(line + "\n" for line in cpu.splitlines() if line.startswith("Model name"))
    )
    for round_ in range(1, args.rounds + 1):
        for side, checkout in sides.items():
            print(f"round {round_}: {side}", flush=True)
            _host_cost(checkout, args.out / f"{side}-{round_}.json", "--forwards", "3")
    for side, checkout in sides.items():
        _host_cost(checkout, args.out / f"ops-{side}.json", "--ops")
    text = summary(args.out)
    (args.out / "summary.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
