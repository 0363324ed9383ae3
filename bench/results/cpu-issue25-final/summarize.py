"""The table of run.sh: per workload and mode, each side's best round (ms per forward, us per
convolution launch, backward against eager's), and the kernels of a step."""

import json
import sys
from pathlib import Path

here = Path(sys.argv[1])
# Convolution (and Res2Net pool) launches per forward, the divisor of "us per launch".
CONV_LAUNCHES = {("resnet50", m): 53 for m in ("infer", "train", "train-bn")}
CONV_LAUNCHES |= {("res2net50", "infer"): 82, ("res2net50", "train"): 79}
CONV_LAUNCHES |= {("res2net50", "train-bn"): 79}


def best(side: str) -> dict:
    rows: dict = {}
    for path in sorted(here.glob(f"{side}-*.json")):
        for row in json.loads(path.read_text()):
            key = (row["workload"], row["mode"])
            if key not in rows or row["ms_per_forward"] < rows[key]["ms_per_forward"]:
                rows[key] = row
    return rows


before, after = best("before"), best("after")
print((here / "cpu.txt").read_text().strip())
print("workload   mode      ms/forward before  after   us/conv launch before  after"
      "   backward/eager before  after")  # fmt: skip
for key, b in before.items():
    a, n = after[key], CONV_LAUNCHES[key]
    bw = f"{b.get('backward_vs_eager', '-'):>6} {a.get('backward_vs_eager', '-'):>6}"
    print(f"{key[0]:<10} {key[1]:<9} {b['ms_per_forward']:>12.2f} {a['ms_per_forward']:>6.2f}"
          f" {b['ms_per_forward'] * 1e3 / n:>17.1f} {a['ms_per_forward'] * 1e3 / n:>6.1f}"
          f" {bw:>23}")  # fmt: skip
print("\nkernels per step (KernelCounter; forward, + backward when training): torch / triton")
for side in ("before", "after"):
    for row in json.loads((here / f"ops-{side}.json").read_text()):
        k = row["step_kernels"]
        print(f"{side:<7} {row['workload']:<10} {row['mode']:<9} {k['torch']:>5} {k['triton']:>6}")
