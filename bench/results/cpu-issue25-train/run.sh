#!/usr/bin/env bash
# Issue 25, training: host cost and kernels of the triton backend's training step before / after,
# in one run. scripts/host_cost.py (this checkout's script and stand-in driver both times: the
# same launch count, LAUNCH_KERNELS, and the same KernelCounter) on BEFORE's fastres and on this
# checkout's, alternating, ROUNDS rounds; then the kernels of a step (--ops) on each.
#   bash bench/results/cpu-issue25-train/run.sh /path/to/checkout-of-b5326a2 [ROUNDS]
set -euo pipefail
before=$(realpath "$1")
rounds=${2:-2}
here=$(dirname "$(realpath "$0")")
repo=$(realpath "$here/../../..")
python=${PYTHON:-$repo/.venv/bin/python}
unset TRITON_INTERPRET
lscpu | grep 'Model name' > "$here/cpu.txt"
modes=(--mode train --mode train-bn)
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    src=$([ "$side" = before ] && echo "$before" || echo "$repo")
    PYTHONPATH=$src "$python" "$repo/scripts/host_cost.py" "${modes[@]}" \
      --json "$here/$side-$round.json"
  done
done
for side in before after; do
  src=$([ "$side" = before ] && echo "$before" || echo "$repo")
  PYTHONPATH=$src "$python" "$repo/scripts/host_cost.py" --ops "${modes[@]}" \
    --json "$here/ops-$side.json"
done
