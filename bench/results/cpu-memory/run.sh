#!/bin/bash
# Before (c6dbb4f, a detached worktree with main's build of fastres/_C) / after (this tree,
# rebuilt) on the same machine, same run: RSS growth at many sizes, then ResNet-50 b8 224 eval.
#   BEFORE=/tmp/c6 AFTER=$PWD bash bench/results/cpu-memory/run.sh > bench/results/cpu-memory/output.txt
set -eu
here=$(dirname "$0")
py=${PY:-$PWD/.venv/bin/python}
lscpu | grep 'Model name'; nproc
for tree in before after; do
  root=$([ $tree = before ] && echo "$BEFORE" || echo "$AFTER")
  for backend in torch native; do
    echo -n "$tree ($(cd /tmp && PYTHONPATH=$root $py -c 'import fastres; print(fastres.__file__)')): "
    PYTHONPATH=$root $py "$here/rss_sizes.py" $backend --steps 120
  done
done
for i in 1 2; do
  for tree in before after; do
    root=$([ $tree = before ] && echo "$BEFORE" || echo "$AFTER")
    FASTRES_BACKEND=native PYTHONPATH=$root $py "$here/../cpu-refactor-ab/time_native.py" infer "$tree"
  done
done
