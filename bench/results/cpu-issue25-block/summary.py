"""Summarizes run.sh's output: host_cost.py's best us per launch per tree (of 3 turns), the
pieces' least us per call, and native_small.py's best ms per forward.

    .venv/bin/python bench/results/cpu-issue25-block/summary.py
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def least_per_tree(path: Path) -> dict[str, dict[str, float]]:
    """{column: {tree: least value over the turns}} of a JSON-lines file with a 'tree' key."""
    least: dict[str, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        tree = row.pop("tree")
        for name, value in row.items():
            cell = least.setdefault(name, {})
            cell[tree] = min(cell.get(tree, float("inf")), value)
    return least


def main() -> None:
    best: dict[tuple[str, str], dict[str, float]] = {}
    for line in (HERE / "host-cost.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = (row["workload"], row["mode"])
        cell = best.setdefault(key, {})
        cell[row["tree"]] = min(cell.get(row["tree"], float("inf")), row["us_per_launch"])
    print("us per launch, best of 3 turns | before | after | gained")
    for (workload, mode), cell in best.items():
        gained = cell["before"] - cell["after"]
        print(f"{workload} {mode} | {cell['before']} | {cell['after']} | {gained:.1f}")
    print("us per call, least of 3 runs | before | after")
    for name, cell in least_per_tree(HERE / "pieces.jsonl").items():
        print(f"{name} | {cell['before']} | {cell['after']}")
    print("ms per forward, 1x3x32x32 fp32 no_grad, best of 3 runs | before | after")
    for name, cell in least_per_tree(HERE / "native-small.jsonl").items():
        print(f"{name} | {cell['before']} | {cell['after']}")


if __name__ == "__main__":
    main()
