#!/usr/bin/env bash
# Same-run A/B of `python -m fastres bench` (CPU defaults, no torch.compile): before = 8e71f49 (the start of issues 24 and 25), after = main with both merged.
# BEFORE_CHECKOUT: a checkout of 8e71f49 with its extension built; AFTER_CHECKOUT: this one.
set -u
out=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-$AFTER_CHECKOUT/.venv/bin/python}
cache=$(mktemp -d)  # a fresh selection cache per side
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then dir="$BEFORE_CHECKOUT"; else dir="$AFTER_CHECKOUT"; fi
    ( cd $dir && FASTRES_CACHE_DIR=$cache/$side PYTHONPATH=$dir $PY -m fastres bench --no-compile \
        --json $out/bench-$side-$round.json > $out/bench-$side-$round.txt 2>&1 )
    echo "$side $round rc=$?"
  done
done
