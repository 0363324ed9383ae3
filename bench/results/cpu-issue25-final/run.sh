#!/usr/bin/env bash
# Issue 25, the whole change (b5326a2 -> main with the launch, block, training and training-
# forward branches): scripts/host_cost.py before / after in one run, alternating, ROUNDS rounds,
# each side with its own script and stand-in driver (the "after" script imports the new
# fastres.ops.launcher); then the kernels of a step (--ops) on each side.
# Compare ms_per_forward: "before"'s script divided 'train-bn' by the statistics-merge launches
# too (106 for ResNet-50), "after"'s divides by the convolution and pool launches only.
#   bash bench/results/cpu-issue25-final/run.sh /path/to/checkout-of-b5326a2 [ROUNDS]
set -euo pipefail
before=$(realpath "$1")
rounds=${2:-3}
here=$(dirname "$(realpath "$0")")
repo=$(realpath "$here/../../..")
python=${PYTHON:-$repo/.venv/bin/python}
unset TRITON_INTERPRET
lscpu | grep 'Model name' > "$here/cpu.txt"
modes=(--mode infer --mode train --mode train-bn)
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    src=$([ "$side" = before ] && echo "$before" || echo "$repo")
    PYTHONPATH=$src "$python" "$src/scripts/host_cost.py" "${modes[@]}" --forwards 3 \
      --repeats 3 --json "$here/$side-$round.json" > /dev/null 2>&1
  done
done
for side in before after; do
  src=$([ "$side" = before ] && echo "$before" || echo "$repo")
  PYTHONPATH=$src "$python" "$src/scripts/host_cost.py" --ops "${modes[@]}" \
    --json "$here/ops-$side.json" > /dev/null 2>&1
done
"$python" "$here/summarize.py" "$here" > "$here/summary.txt"
