#!/usr/bin/env bash
# Issue 25, training forward: host cost per convolution launch before / after, in one run.
# scripts/host_cost.py (this checkout's script and stand-in driver on both sides) on BEFORE's
# fastres and on this checkout's, alternating, ROUNDS rounds (each the best of 3 x 3 forwards);
# summary.txt takes the best round per side.
#   bash bench/results/cpu-issue25-trainfwd/run.sh /path/to/checkout-of-i25-merged [ROUNDS]
set -euo pipefail
before=$(realpath "$1")
rounds=${2:-3}
here=$(dirname "$(realpath "$0")")
repo=$(realpath "$here/../../..")
python=${PYTHON:-$repo/.venv/bin/python}
unset TRITON_INTERPRET
lscpu | grep 'Model name' > "$here/cpu.txt"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    src=$([ "$side" = before ] && echo "$before" || echo "$repo")
    PYTHONPATH=$src "$python" "$repo/scripts/host_cost.py" --forwards 3 --repeats 3 \
      --mode train --mode train-bn --no-backward --json "$here/$side-$round.json" 2>/dev/null
  done
done
"$python" - "$here" "$rounds" <<'PY' > "$here/summary.txt"
import json, sys
here, rounds = sys.argv[1], int(sys.argv[2])
best = {}
for side in ("before", "after"):
    for r in range(1, rounds + 1):
        for row in json.load(open(f"{here}/{side}-{r}.json")):
            key = (row["workload"], row["mode"], side)
            if key not in best or row["us_per_launch"] < best[key]["us_per_launch"]:
                best[key] = row
print(f"training forward host cost, best of {rounds} alternating rounds per side (process CPU "
      "time; us per conv launch = ms / launches)")
print(f"{'workload':10} {'mode':9} {'before ms':>9} {'after ms':>9} {'us/launch before':>17} "
      f"{'after':>7} {'ratio':>6}")
for wl in ("resnet50", "res2net50"):
    for mode in ("train", "train-bn"):
        b, a = best[(wl, mode, "before")], best[(wl, mode, "after")]
        print(f"{wl:10} {mode:9} {b['ms_per_forward']:9.2f} {a['ms_per_forward']:9.2f} "
              f"{b['us_per_launch']:17.1f} {a['us_per_launch']:7.1f} "
              f"{a['us_per_launch'] / b['us_per_launch']:6.2f}")
PY
cat "$here/summary.txt"
