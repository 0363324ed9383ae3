#!/usr/bin/env bash
# Host cost of the triton backend before / after, in one run: scripts/host_cost.py (this
# checkout's script and stand-in driver both times) on BEFORE's fastres and on this checkout's,
# alternating, ROUNDS rounds; then the kernels of a step (--ops) on each. Writes beside itself.
#   bash bench/results/cpu-host-cost/run.sh /path/to/checkout-of-8e71f49 [ROUNDS]
set -euo pipefail
before=$(realpath "$1")
rounds=${2:-2}
here=$(dirname "$(realpath "$0")")
repo=$(realpath "$here/../../..")
python=${PYTHON:-$repo/.venv/bin/python}
unset TRITON_INTERPRET
lscpu | grep 'Model name' > "$here/cpu.txt"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    src=$([ "$side" = before ] && echo "$before" || echo "$repo")
    PYTHONPATH=$src "$python" "$repo/scripts/host_cost.py" --json "$here/$side-$round.json"
  done
done
for side in before after; do
  src=$([ "$side" = before ] && echo "$before" || echo "$repo")
  PYTHONPATH=$src "$python" "$repo/scripts/host_cost.py" --ops --mode infer --mode train \
    --mode train-bn --json "$here/ops-$side.json"
done
