#!/usr/bin/env bash
# One command for a GPU machine (H100 / H200, no package registry): build and install the
# checkout offline, run the CUDA tests and the rest of the suite, run the GPU benchmarks, and
# keep every log and JSON result.
#
#   bash scripts/gpu_check.sh                 # from the repository root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # CPU: same steps, tiny configurations,
#                                                   # no install (checks the script's logic)
#
# Logs and results are written to bench/results/local/gpu-check-<time>/; when $OUT is set (the
# device machine's return folder, which takes at most 8 files) the summary, the benchmark JSON
# and logs and a tarball of everything are copied there. The whole run stays inside
# GPU_CHECK_BUDGET seconds (default 570, under a 10-minute limit): every step runs under
# `timeout` with what is left of the budget, capped by its own limit, and a step that fails or
# times out is recorded and the script goes on. Exit status: 0 when every step passed.
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3),
# GPU_CHECK_BUDGET, GPU_CHECK_DRY_RUN, MAX_JOBS (parallel compile jobs, default 16).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
BUDGET=${GPU_CHECK_BUDGET:-570}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
START=$SECONDS
results=bench/results/local/gpu-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary=$results/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1
failures=0

note() { echo "$*" | tee -a "$summary"; }

# step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (the smaller of LIMIT_S and the budget
# left, keeping 10 s for the summary), logs to $results/NAME.log, records status and duration.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 10))
  if [ "$left" -lt 20 ]; then
    note "SKIP  $name: out of time budget"
    failures=$((failures + 1))
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$results/$name.log" 2>&1
  rc=$?
  tail -n 25 "$results/$name.log"
  if [ "$rc" -eq 0 ]; then
    note "OK    $name ($((SECONDS - t0)) s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "TIME  $name: stopped after ${limit} s"
    failures=$((failures + 1))
  else
    note "FAIL  $name: exit $rc ($((SECONDS - t0)) s)"
    failures=$((failures + 1))
  fi
  return "$rc"
}

has_module() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

# -- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nvcc --version 2>&1 | tail -n 1 || echo "no nvcc"
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  "$PYTHON" -c 'import triton; print("triton", triton.__version__)' 2>&1
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)"
} >>"$summary" 2>&1
cat "$summary"

if [ "$DRY_RUN" = 1 ]; then
  note "dry run: CPU, tiny configurations, no install"
  device=cpu
else
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "FAIL  no CUDA device visible to $PYTHON (use GPU_CHECK_DRY_RUN=1 on a CPU machine)"
    exit 1
  fi
  device=cuda
  # Offline install: no build isolation (reuse the installed torch / setuptools), no index.
  # MAX_JOBS: the extension's .cu files compile in parallel with ninja.
  export MAX_JOBS=${MAX_JOBS:-16}
  if ! step install 240 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    # Fallback: build the extension in place and import the checkout through PYTHONPATH;
    # kernels/ is installed as fastres.kernels, which a link stands in for here.
    step build-inplace 240 "$PYTHON" setup.py build_ext --inplace
    [ -e fastres/kernels ] || ln -s ../kernels fastres/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# Which fastres runs (the checkout's), its versions and backends.
step import 60 "$PYTHON" -c 'import fastres, fastres.benchmark as bm; print(fastres.__file__); print(bm.versions()); print(fastres.available_backends())'

# -- tests -------------------------------------------------------------------------------------
# CUDA tests first (one GPU, one process); the CPU rest, which CI also runs, comes last with the
# time that is left.
if [ "$DRY_RUN" = 1 ]; then
  # Only the CLI tests: the point is the script's logic, not the suite.
  step tests-cli 180 "$PYTHON" -m pytest tests/test_cli.py -q -x \
    --junitxml="$results/tests-cli.xml"
else
  step tests-cuda 120 "$PYTHON" -m pytest tests -m cuda -q -ra \
    --junitxml="$results/tests-cuda.xml"
fi

# -- benchmarks --------------------------------------------------------------------------------
if [ "$device" = cuda ]; then
  # SPEC's GPU configuration: bf16 autocast, batch 256, 224x224, inference and training step,
  # eager (NCHW / channels_last), torch.compile and every fastres backend. Fewer iterations
  # than the CLI's GPU defaults (20 + 5) to stay inside the budget: most of the time goes into
  # torch.compile and the float64 check anyway.
  bench_args=(--iters 10 --warmup 3)
  pytest_bench_env=(FASTRES_BENCH_ROUNDS=10 FASTRES_BENCH_WARMUP=3)
else
  bench_args=(--depth 50 --model both --batch 2 --image-size 64 --iters 2 --warmup 1 --no-compile)
  pytest_bench_env=(FASTRES_BENCH_BATCH=2 FASTRES_BENCH_IMAGE_SIZE=64 FASTRES_BENCH_ROUNDS=2
    FASTRES_BENCH_COMPILE=none)
fi
step bench-cli 270 "$PYTHON" -m fastres bench --device "$device" "${bench_args[@]}" \
  --json "$results/bench-cli.json"

if has_module pytest_benchmark; then
  # The other bench files (per-layer kernels; they skip without a GPU) before the whole-model
  # pytest run, which repeats what bench-cli measured.
  step bench-layers 120 "$PYTHON" -m pytest bench/ --ignore=bench/test_bench_models.py \
    --benchmark-only -q -ra --benchmark-json="$results/bench-layers.json"
  # torch.compile now finds bench-cli's graphs in the inductor cache. bench-pytest-fastres.json
  # is the fastres table of this run (speedups, errors, memory).
  step bench-pytest 180 env "${pytest_bench_env[@]}" FASTRES_BENCH_DEVICE="$device" \
    FASTRES_BENCH_RESULTS="$results/bench-pytest-fastres.json" \
    "$PYTHON" -m pytest bench/test_bench_models.py --benchmark-only -q -ra \
    --benchmark-json="$results/bench-pytest.json"
else
  note "SKIP  bench-layers, bench-pytest: pytest-benchmark is not installed (bench-cli ran)"
fi

# -- the rest of the test suite (CI runs it on CPU too) -----------------------------------------
if [ "$DRY_RUN" != 1 ]; then
  xdist=()
  has_module xdist && xdist=(-n 8)
  step tests-rest 180 "$PYTHON" -m pytest tests -m "not cuda" -q -ra "${xdist[@]}" \
    --junitxml="$results/tests-rest.xml"
fi

note "total $((SECONDS - START)) s, $failures step(s) not OK; results in $results"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$results")" "$(basename "$results")"
  # $OUT takes 8 files: the tarball and the 7 most read.
  for f in summary.txt bench-cli.log bench-cli.json bench-pytest-fastres.json bench-layers.log \
    tests-cuda.log tests-rest.log; do
    [ -f "$results/$f" ] && cp "$results/$f" "$OUT/"
  done
fi
[ "$failures" -eq 0 ]
