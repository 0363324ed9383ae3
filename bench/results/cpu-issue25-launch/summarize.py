"""Best (lowest) us per launch of each variant, workload and mode in run.sh's JSON lines."""

import collections
import json
import sys

best = collections.defaultdict(lambda: float("inf"))
launches = {}
with open(sys.argv[1]) as f:
    rows = [json.loads(line) for line in f]
for row in rows:
    key = (row["workload"], row["mode"], row["variant"])
    best[key] = min(best[key], row["us_per_launch"])
    launches[key] = row["launches"]
variants = ["base", "all", "no-dispatch-bypass", "no-direct-launch", "no-prepared"]
print("| workload | mode | launches | " + " | ".join(variants) + " |")
print("|---" * (3 + len(variants)) + "|")
for workload, mode in sorted({k[:2] for k in best}):
    cells = [f"{best[workload, mode, v]:.1f}" for v in variants]
    print(
        f"| {workload} | {mode} | {launches[workload, mode, 'all']} | " + " | ".join(cells) + " |"
    )
