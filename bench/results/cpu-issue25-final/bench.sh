#!/usr/bin/env bash
# Same-run A/B of `python -m fastres bench` (CPU defaults, no torch.compile): before = b5326a2 (the start of this session of issue 25), after = main with its four branches merged.
# BEFORE_CHECKOUT: a checkout of b5326a2 with its extension built; AFTER_CHECKOUT: this one.
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
