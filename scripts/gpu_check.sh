#!/usr/bin/env bash
# The GPU check, sized for a lent GPU session (15 minutes of device time, machine starts
# included, at most 10 minutes a command): two calls of about 6 minutes each, every figure
# written to $OUT as soon as it exists, so that a call stopped at its limit still returns what
# it measured.
#
#   bash scripts/gpu_check.sh                      # call 1: build, smoke checks, figures
#   GPU_CHECK_CALL=2 bash scripts/gpu_check.sh     # call 2: compile peers, layers, CUDA suite
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  # rehearsal on a CPU machine: the same
#                                                  # steps, tiny sizes, nothing built
#
# Call 1 (most important first):
#   build        the extension in place for the visible GPU (in the background, while the
#                Triton inference smoke checks compile their kernels);
#   smoke-*      tests/test_cuda_models.py: ResNet-50 and Res2Net-50, inference and a training
#                step, bf16, every backend, against the float64 oracle (batch 32: the kernels
#                of batch 256); one process per Triton case, so that a kernel that breaks its
#                CUDA context costs only its own case;
#   bench-*      python -m fastres bench, b256 bf16 224 px, inference and training step:
#                eager, eager-cl and the fastres backends whose smoke checks passed.
# Call 2: 'auto' tuned (tune: the implementation chosen per layer), the Triton backend with
#   tuned tiles and auto (bench-tuned-infer, then bench-tuned-train with native beside them),
#   the tuning cache returned in the results
#   (cache/triton-configs.json, the defaults to ship for the GPU), torch.profiler tables of a
#   ResNet-50 step per backend (profile-*), every ResNet-50 conv shape against cuDNN
#   (bench-layers), then the torch.compile peers (bench-compile-*).
#
# Results: $OUT when set (the device tool's return folder, at most 8 files: summary.txt,
# steps.log with every step's output, the bench JSONs, logs.tar.gz with the logs and JUnit
# files of every step), else
# bench/results/local/gpu-check-<time>/. Every step runs under `timeout` with what is left of
# GPU_CHECK_BUDGET seconds (default 360); a step that fails or times out is recorded and the
# script goes on. Exit status 0 when every step passed.
#
# Environment: PYTHON (default python3; the GPU machine's has torch and Triton),
# GPU_CHECK_CALL (1 or 2), GPU_CHECK_BUDGET, GPU_CHECK_DRY_RUN, MAX_JOBS (default 16).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CALL=${GPU_CHECK_CALL:-1}
BUDGET=${GPU_CHECK_BUDGET:-360}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
START=$SECONDS
if [ -n "${OUT:-}" ]; then
  results=$OUT
else
  results=bench/results/local/gpu-check-$(date -u +%Y%m%d-%H%M%S)
fi
mkdir -p "$results"
results=$(cd "$results" && pwd)
# Per-step logs outside the results: $OUT returns at most 8 files, so they travel as one tarball.
logs=$(mktemp -d)/logs
mkdir -p "$logs"
summary=$results/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$summary"; }
left() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME LIMIT_S COMMAND...: runs COMMAND under timeout (the smaller of LIMIT_S and the
# budget left), its output in logs/NAME.log and appended to steps.log; records the outcome.
run_step() {
  local name=$1 limit=$2
  shift 2
  local budget_left
  budget_left=$(($(left) - 5))
  if [ "$budget_left" -lt 15 ]; then
    note "SKIP  $name: out of time budget"
    return 1
  fi
  [ "$limit" -gt "$budget_left" ] && limit=$budget_left
  local t0=$SECONDS rc
  timeout --kill-after=5 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  { echo "=== $name (limit ${limit}s, exit $rc, $((SECONDS - t0)) s): $*"; cat "$logs/$name.log"; } \
    >>"$results/steps.log"
  if [ "$rc" -eq 0 ]; then
    note "OK    $name ($((SECONDS - t0)) s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note "TIME  $name: stopped after ${limit} s"
  else
    note "FAIL  $name: exit $rc ($((SECONDS - t0)) s): $(tail -n 3 "$logs/$name.log" | tr '\n' ' ')"
  fi
  return "$rc"
}

# parallel NAME1 'CMD1' NAME2 'CMD2' ...: run_step of each pair at once, with the same limit.
parallel_steps() {
  local limit=$1 pids=()
  shift
  while [ "$#" -ge 2 ]; do
    run_step "$1" "$limit" bash -c "$2" &
    pids+=("$!")
    shift 2
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

finish() {
  # Counted from the summary: steps run in parallel record their outcome from subshells.
  local failures
  failures=$(grep -cE "^(FAIL|TIME|SKIP) " "$summary")
  note "total $((SECONDS - START)) s, $failures step(s) not OK"
  tar -czf "$results/logs.tar.gz" -C "$(dirname "$logs")" logs
  [ "$failures" -eq 0 ]
  exit $?
}

# -- environment -------------------------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ), call $CALL, budget $BUDGET s"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  "$PYTHON" -c 'import sys, torch, triton, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__, "gpu", torch.cuda.is_available())' 2>&1
} >>"$summary"
cat "$summary"

if [ "$DRY_RUN" = 1 ]; then
  device=cpu
  export TRITON_INTERPRET=1
  shape_args=(--device cpu --batch 4 --image-size 64)
  size_args=("${shape_args[@]}" --iters 1 --warmup 0)
else
  device=cuda
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "FAIL  no CUDA device visible to $PYTHON (GPU_CHECK_DRY_RUN=1 rehearses on a CPU)"
    exit 1
  fi
  shape_args=(--device cuda --batch 256 --image-size 224 --dtype bf16)
  size_args=("${shape_args[@]}" --iters 10 --warmup 3)
fi

# The checkout runs in place, nothing installed: the extension built next to the sources,
# kernels/ reached as fastres.kernels through a link (an install maps it there).
if [ "$DRY_RUN" != 1 ] && [ ! -e fastres/kernels ]; then ln -s ../kernels fastres/kernels; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
# Untuned Triton tiles in call 1: tuning compiles every candidate of every shape first.
export FASTRES_TRITON_TUNE=${FASTRES_TRITON_TUNE:-0}

build() {
  if [ "$DRY_RUN" = 1 ]; then
    run_step build 60 "$PYTHON" -c 'import fastres.extension as e; assert e.EXTENSION_ERROR is None, e.EXTENSION_ERROR'
  else
    run_step build 240 "$PYTHON" setup.py build_ext --inplace
  fi
}

smoke() {  # smoke NAME PYTEST_K: one process of tests/test_cuda_models.py
  local cuda=(-m cuda)
  [ "$DRY_RUN" = 1 ] && cuda=(-p no:cacheprovider --co)
  echo "$1" "$PYTHON -m pytest tests/test_cuda_models.py ${cuda[*]} -q -ra -k '$2' --junitxml=$logs/$1.xml"
}

# Which fastres backends the bench times: those whose smoke checks passed (the oracle alone
# when none did, so that the peers are still measured).
bench_backends() {
  local args=() name names=(native triton)
  [ "$DRY_RUN" = 1 ] && names=(native)  # Triton on CPU is interpreted: not worth timing
  for name in "${names[@]}"; do
    if ! grep -qE "^(FAIL|TIME|SKIP) +smoke-.*$name" "$summary"; then args+=(--backend "$name"); fi
  done
  [ "${#args[@]}" -eq 0 ] && args=(--backend torch)
  echo "${args[@]}"
}

bench() {  # bench NAME MODEL LIMIT EXTRA...: python -m fastres bench, JSON into the results
  local name=$1 model=$2 limit=$3
  shift 3
  run_step "$name" "$limit" "$PYTHON" -m fastres bench --model "$model" --mode both \
    "${size_args[@]}" "$@" --json "$results/$name.json"
}

if [ "$CALL" = 1 ]; then
  build &
  build_pid=$!
  # Triton inference needs no extension: its kernels compile while the extension builds.
  read -r n1 c1 < <(smoke smoke-resnet-infer-triton "resnet and infer and triton")
  read -r n2 c2 < <(smoke smoke-res2net-infer-triton "res2net and infer and triton")
  parallel_steps 200 "$n1" "$c1" "$n2" "$c2"
  wait "$build_pid"
  run_step import 60 "$PYTHON" -m fastres info
  read -r n3 c3 < <(smoke smoke-torch-native "not triton")
  read -r n4 c4 < <(smoke smoke-resnet-train-triton "resnet and train and triton")
  read -r n5 c5 < <(smoke smoke-res2net-train-triton "res2net and train and triton")
  parallel_steps 150 "$n3" "$c3" "$n4" "$c4" "$n5" "$c5"
  read -r -a backends < <(bench_backends)
  bench bench-resnet50 resnet 150 --no-compile "${backends[@]}"
  bench bench-res2net50 res2net 150 --no-compile "${backends[@]}"
  finish
fi

# -- call 2 ------------------------------------------------------------------------------------
# Tuned Triton tiles, chosen once and kept in the results (cache/triton-configs.json: the
# defaults to ship for this GPU), then the peers torch.compile.
export FASTRES_TRITON_TUNE=1 FASTRES_CACHE_DIR=$results/cache
build &
build_pid=$!
if [ "$DRY_RUN" = 1 ]; then
  tuned=(--backend native) compiled=(--no-compile --backend native)
else
  tuned=(--backend triton) compiled=(--backend triton)
fi
wait "$build_pid"
# 'auto': each layer's candidates (Triton with its tiles tuned here, native, cuDNN's fused
# convolutions, the oracle) checked and timed, the choice per layer printed to steps.log and
# kept in cache/selection.json; the benches below then time auto beside the backends.
tune_args=()
[ "$DRY_RUN" = 1 ] && tune_args=(--model resnet --mode infer)  # CPU: the step, not the figures
run_step tune 150 "$PYTHON" -m fastres tune "${shape_args[@]}" "${tune_args[@]}"
bench bench-tuned-infer both 150 --mode infer --no-compile --backend auto "${tuned[@]}"
bench bench-tuned-train both 150 --mode train --no-compile --backend native --backend auto \
  "${tuned[@]}"
# Where the time of a ResNet-50 step goes, per op, for the oracle (eager-cl) and the backends.
profiled=(torch-infer native-infer torch-train native-train triton-train)
[ "$DRY_RUN" = 1 ] && profiled=("${profiled[@]:0:4}")  # Triton on CPU is interpreted: too slow
for system in "${profiled[@]}"; do
  run_step "profile-$system" 45 "$PYTHON" -m fastres profile "${shape_args[@]}" \
    --backend "${system%-*}" --mode "${system#*-}" --iters 5 --warmup 3 --profile-iters 1 --top 25
done
# Every ResNet-50 conv shape: the fused Triton conv (the tiles tuned above) against cuDNN.
if "$PYTHON" -c 'import pytest_benchmark' 2>/dev/null; then
  run_step bench-layers 150 "$PYTHON" -m pytest bench/test_bench_conv2d_fused.py --benchmark-only \
    -q -ra --benchmark-json="$results/bench-layers.json"
fi
bench bench-compile-resnet50 resnet 200 "${compiled[@]}"
bench bench-compile-res2net50 res2net 200 "${compiled[@]}"
finish
