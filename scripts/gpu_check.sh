#!/usr/bin/env bash
# One command for a GPU machine (H100 / H200, no package registry): build and install the
# checkout offline, run the GPU benchmarks and the CUDA tests, then the rest of the suite, and
# keep every log and JSON result.
#
#   bash scripts/gpu_check.sh                 # from the repository root
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh   # CPU: same steps, tiny configurations,
#                                                   # no install (checks the script's logic)
#   GPU_CHECK_STEPS="install tests-cuda bench-layers-train" bash scripts/gpu_check.sh
#                                             # only these steps (and the import check)
#
# Steps, most important figures first (SPEC section 6: ResNet-50 / Res2Net-50, 224x224, bf16
# autocast, batch 256, inference and training step):
#   install (build-inplace as its fallback), import,
#   bench-resnet50            eager, eager channels_last and every fastres backend (no compile)
#   bench-compile-resnet50    eager, eager-cl, torch.compile (inference and training step), triton
#   bench-res2net50, bench-compile-res2net50   the same for Res2Net-50
#   tests-cuda-training       the CUDA tests of the fused training path (and distributed ones)
#   tests-cuda                the other CUDA tests
#   bench-layers-train        bench/test_bench_conv2d_bn_train.py (training unit per layer)
#   bench-layers              the other per-layer bench files
#   bench-pytest              pytest bench/test_bench_models.py (ResNet-50, no compile)
#   tests-rest                the CPU tests
# and at the end bench-table.log: this run's whole-model tables side by side (speedups and
# peak-memory ratios over eager-cl, Res2Net / ResNet speed ratios).
# torch.compile of a training step compiles for minutes on a GPU host, so it has steps of its
# own after the eager figures. One run of 570 s does not reach the last steps; a second call
# runs them (add install on a fresh machine):
#   GPU_CHECK_STEPS="install bench-res2net50 tests-cuda-training tests-cuda bench-compile-res2net50
#     bench-layers-train bench-layers" bash scripts/gpu_check.sh
#
# Logs and results are written to bench/results/local/gpu-check-<time>/; when $OUT is set (the
# device machine's return folder, which takes at most 8 files) the summary, the benchmark JSON
# and logs and a tarball of everything are copied there. The whole run stays inside
# GPU_CHECK_BUDGET seconds (default 570, under a 10-minute limit): every step runs under
# `timeout` with what is left of the budget, capped by its own limit, and a step that fails or
# times out is recorded and the script goes on. Exit status: 0 when every step passed.
#
# Environment: PYTHON (default .venv/bin/python where it exists, else python3),
# GPU_CHECK_BUDGET, GPU_CHECK_DRY_RUN, GPU_CHECK_STEPS (space-separated step names; default
# all), MAX_JOBS (parallel compile jobs, default 16).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
BUDGET=${GPU_CHECK_BUDGET:-570}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
STEPS=${GPU_CHECK_STEPS:-}
START=$SECONDS
results=bench/results/local/gpu-check-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$results"
results=$(cd "$results" && pwd)
summary=$results/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1
failures=0

note() { echo "$*" | tee -a "$summary"; }

selected() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }

# step NAME LIMIT_S COMMAND...: where NAME is selected (GPU_CHECK_STEPS), runs COMMAND under
# timeout (the smaller of LIMIT_S and the budget left, keeping 10 s for the summary), logs to
# $results/NAME.log, records status and duration. A step not selected returns 0.
step() {
  selected "$1" || return 0
  run_step "$@"
}

run_step() {
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
[ -n "$STEPS" ] && echo "steps: $STEPS" >>"$summary"
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
    run_step build-inplace 240 "$PYTHON" setup.py build_ext --inplace
    [ -e fastres/kernels ] || ln -s ../kernels fastres/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi

# Which fastres runs (the checkout's), its versions and backends.
run_step import 60 "$PYTHON" -c 'import fastres, fastres.benchmark as bm; print(fastres.__file__); print(bm.versions()); print(fastres.available_backends())'

# -- whole-model benchmarks, most important first ----------------------------------------------
if [ "$device" = cuda ]; then
  # SPEC's GPU configuration (the CLI's CUDA defaults): bf16 autocast, batch 256, 224x224.
  # Fewer iterations than the CLI's defaults (20 + 5) to stay inside the budget: most of the
  # time goes into torch.compile, Triton's tuning and the float64 check anyway.
  bench_args=(--device cuda --iters 10 --warmup 3)
  # Peers eager, eager-cl and torch.compile (on CUDA of both modes), and the triton backend.
  compile_args=(--backend triton)
  pytest_bench_env=(FASTRES_BENCH_ROUNDS=10 FASTRES_BENCH_WARMUP=3)
else
  bench_args=(--device cpu --depth 50 --batch 2 --image-size 64 --iters 2 --warmup 1)
  # On a CPU, compiling a training step takes minutes: the dry run checks the steps' logic.
  compile_args=(--no-compile)
  pytest_bench_env=(FASTRES_BENCH_BATCH=2 FASTRES_BENCH_IMAGE_SIZE=64 FASTRES_BENCH_ROUNDS=2)
fi
# bench-MODEL: eager figures first; bench-compile-MODEL: the compiled peers, in their own step.
bench_model() {
  local name=$1 model=$2 limit=$3
  shift 3
  step "$name" "$limit" "$PYTHON" -m fastres bench --model "$model" --mode both \
    "${bench_args[@]}" "$@" --json "$results/$name.json"
}
bench_model bench-resnet50 resnet 180 --no-compile
bench_model bench-compile-resnet50 resnet 300 "${compile_args[@]}"
bench_model bench-res2net50 res2net 180 --no-compile

# -- CUDA tests --------------------------------------------------------------------------------
# One GPU, one process: the fused training path's tests and the distributed tests (their CUDA
# cases; the gloo cases run on CPU with tests-rest) first, then the other CUDA tests.
if [ "$DRY_RUN" = 1 ]; then
  # Only the CLI tests: the point is the script's logic, not the suite.
  step tests-cli 180 "$PYTHON" -m pytest tests/test_cli.py -q -x \
    --junitxml="$results/tests-cli.xml"
else
  training=(tests/test_triton_training.py)
  [ -f tests/test_distributed.py ] && training+=(tests/test_distributed.py)
  step tests-cuda-training 150 "$PYTHON" -m pytest "${training[@]}" -m cuda -q -ra \
    --junitxml="$results/tests-cuda-training.xml"
  step tests-cuda 150 "$PYTHON" -m pytest tests "${training[@]/#/--ignore=}" -m cuda -q -ra \
    --junitxml="$results/tests-cuda.xml"
fi

bench_model bench-compile-res2net50 res2net 300 "${compile_args[@]}"

# -- per-layer and pytest benchmarks -----------------------------------------------------------
if has_module pytest_benchmark; then
  # The per-layer files skip without a GPU. The training unit first, in its own step: it
  # compiles one forward + backward graph per layer shape for its torch.compile peer.
  step bench-layers-train 300 "$PYTHON" -m pytest bench/test_bench_conv2d_bn_train.py \
    --benchmark-only -q -ra --benchmark-json="$results/bench-layers-train.json"
  step bench-layers 180 "$PYTHON" -m pytest bench/ --ignore=bench/test_bench_models.py \
    --ignore=bench/test_bench_conv2d_bn_train.py --benchmark-only -q -ra \
    --benchmark-json="$results/bench-layers.json"
  # The whole-model pytest path (ResNet-50; torch.compile is measured by bench-compile-*):
  # bench-pytest-fastres.json is the fastres table of this run (speedups, errors, memory).
  step bench-pytest 180 env "${pytest_bench_env[@]}" FASTRES_BENCH_COMPILE=none \
    FASTRES_BENCH_DEVICE="$device" FASTRES_BENCH_RESULTS="$results/bench-pytest-fastres.json" \
    "$PYTHON" -m pytest bench/test_bench_models.py -k "resnet and not res2net" --benchmark-only \
    -q -ra --benchmark-json="$results/bench-pytest.json"
else
  note "SKIP  bench-layers-train, bench-layers, bench-pytest: pytest-benchmark is not installed"
fi

# -- the rest of the test suite (CI runs it on CPU too) -----------------------------------------
if [ "$DRY_RUN" != 1 ]; then
  xdist=()
  has_module xdist && xdist=(-n 8)
  step tests-rest 180 "$PYTHON" -m pytest tests -m "not cuda" -q -ra "${xdist[@]}" \
    --junitxml="$results/tests-rest.xml"
fi

# The whole-model tables of this run side by side (a few seconds, after the budget's steps):
# with both models of a kind, the Res2Net / ResNet speed ratios (SPEC: >= 0.95 on GPU), here
# across the two processes.
if ls "$results"/bench-*50.json >/dev/null 2>&1; then
  timeout 60 "$PYTHON" - "$results" >"$results/bench-table.log" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
from fastres import benchmark as bm

for kind in ("bench", "bench-compile"):
    results = []
    for model in ("resnet50", "res2net50"):
        path = Path(sys.argv[1]) / f"{kind}-{model}.json"
        if path.exists():
            results += [bm.Result(**r) for r in json.loads(path.read_text())["results"]]
    if results:
        print(f"== {kind}-*.json\n{bm.format_table(results)}\n")
EOF
  [ $? -eq 0 ] || note "FAIL  bench-table (see bench-table.log)"
  cat "$results/bench-table.log"
fi

note "total $((SECONDS - START)) s, $failures step(s) not OK; results in $results"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  tar -czf "$OUT/gpu-check.tar.gz" -C "$(dirname "$results")" "$(basename "$results")"
  # $OUT takes 8 files: the tarball and the first 7 of these that this run wrote.
  copied=0
  for f in summary.txt bench-table.log bench-resnet50.json bench-compile-resnet50.json \
    bench-res2net50.json bench-compile-res2net50.json tests-cuda-training.log tests-cuda.log \
    bench-layers-train.log bench-layers.log tests-rest.log; do
    if [ -f "$results/$f" ] && [ "$copied" -lt 7 ]; then
      cp "$results/$f" "$OUT/"
      copied=$((copied + 1))
    fi
  done
fi
[ "$failures" -eq 0 ]
