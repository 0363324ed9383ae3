#!/bin/bash
# Issue 25, the block-level host cost: before (b5326a2, a `git archive` copy with this build of
# the extension) and after (this tree), in turns, in one run. From the repository root:
#   bash bench/results/cpu-issue25-block/run.sh BEFORE_TREE
# Writes host-cost.jsonl (scripts/host_cost.py of each tree, 3 turns), pieces.jsonl and
# native-small.jsonl.
set -euo pipefail
before=$1
root=$PWD
out=bench/results/cpu-issue25-block
py=$root/.venv/bin/python
: > $out/host-cost.jsonl
: > $out/pieces.jsonl
: > $out/native-small.jsonl
lscpu | grep 'Model name' > $out/cpu.txt
for turn in 1 2 3; do
  for tree in "$before" "$root"; do
    name=$([ "$tree" = "$root" ] && echo after || echo before)
    (cd /tmp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$tree $py $tree/scripts/host_cost.py \
      --no-backward 2>/dev/null) | sed "s/^{/{\"tree\": \"$name\", \"turn\": $turn, /" \
      >> $out/host-cost.jsonl
    (cd /tmp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$tree $py \
      $root/$out/pieces.py 2>/dev/null) >> $out/pieces.jsonl
    (cd /tmp && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$tree FASTRES_CACHE_DIR=$(mktemp -d) $py \
      $root/$out/native_small.py $name 2>/dev/null) >> $out/native-small.jsonl
  done
done
