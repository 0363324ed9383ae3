#!/bin/bash
# `python -m fastres bench` on CPU, before (BEFORE_TREE, b5326a2) and after (this tree), in
# turns: ResNet-50 and Res2Net-50, inference and a training step, the CLI's CPU defaults
# (batch 8, 128 px, fp32), the fused backends and the eager peers, no torch.compile; one turn
# each (a turn takes 11 minutes on the 2-core VM).
#   bash bench/results/cpu-issue25-block/bench.sh BEFORE_TREE
set -euo pipefail
before=$1
root=$PWD
out=$root/bench/results/cpu-issue25-block
for turn in 1; do
  for tree in "$before" "$root"; do
    name=$([ "$tree" = "$root" ] && echo after || echo before)
    (cd /tmp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$tree $root/.venv/bin/python -m fastres \
      bench --model both --no-compile --backend native --backend auto --iters 3 \
      --json $out/bench-$name-$turn.json) > $out/bench-$name-$turn.txt 2>&1
  done
done
