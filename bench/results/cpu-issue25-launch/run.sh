#!/usr/bin/env bash
# Before / after of issue 25's launch path (scripts/host_cost.py, best of 3 runs of each
# variant, interleaved): BASE is a checkout of b5326a2, NEW this one.
#   BASE=/work/main NEW=$PWD bash bench/results/cpu-issue25-launch/run.sh > results.jsonl
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-$NEW/.venv/bin/python}
lscpu | grep 'Model name' >&2
for run in 1 2 3; do
  PYTHONPATH=$BASE "$py" "$here/ablation.py" "$BASE/scripts" base 2>/dev/null
  for variant in all no-dispatch-bypass no-direct-launch no-prepared; do
    PYTHONPATH=$NEW "$py" "$here/ablation.py" "$NEW/scripts" "$variant" 2>/dev/null
  done
done
