#!/usr/bin/env bash
# The GPU check, sized for a lent GPU session (15 minutes of device time, the machine's start
# included): two calls of at most 6 minutes each, every result written to $OUT as soon as it
# exists (steps.log grows step by step), so that a call stopped at its limit still returns what
# it measured. The first call answers "why" (where the time goes) before "how fast".
#
#   bash scripts/gpu_check.sh                      # call 1: why, op by op
#   GPU_CHECK_CALL=2 bash scripts/gpu_check.sh     # call 2: smoke checks, host cost, models
#   GPU_CHECK_CALL=3 bash scripts/gpu_check.sh     # beyond the 15 minutes: tuned tiles, Res2Net
#   GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh  # rehearsal on a CPU machine: the same
#                                                  # steps, tiny sizes, nothing built
#
# Call 1, "why" (b256 bf16 224 px unless said; Triton tiles untuned, FASTRES_TRITON_TUNE=0):
#   build          the extension in place for the visible GPU, in the background while
#   triton-conv    (4) the Triton convolution per ResNet-50 shape against F.conv2d + BN + ReLU,
#                  tiles untuned (bench/gpu_why.py triton-conv; no extension needed);
#   bn-ops         (2) every BatchNorm op against ATen's at the six BN shapes of issue 24, GB/s
#                  and % of the measured copy bandwidth (bench/gpu_why.py bn; new kernels enter
#                  as its BN_VARIANTS);
#   cudnn-fused    (3) cuDNN's cudnn_convolution_(add_)relu against conv + bn_apply at the stem
#                  and each stage's conv3, first call included (bench/gpu_why.py cudnn-fused);
#   profile-*      (1) torch.profiler per-kernel tables of one ResNet-50 inference forward and
#                  training step for eager-cl (the 'torch' backend, channels_last), native,
#                  triton and auto, each ending with GPU-busy time against wall time
#                  (python -m fastres profile).
# Call 2: the smoke checks (tests/test_cuda_models.py: ResNet-50 and Res2Net-50, inference and
#   a training step, bf16, every backend, against the float64 oracle; one process per group),
#   the two ways to remove host cost (scripts/cuda_graphs.py: torch.compile "reduce-overhead"
#   and torch.cuda.make_graphed_callables, checked against the float64 oracle and timed beside
#   eager-cl, b32), then the whole-model figures of ResNet-50 with 'auto' and native beside
#   eager, eager-cl and their torch.compile peers (python -m fastres bench).
# Call 3 (a later session): the Triton convolution per shape with tuned tiles, 'auto' tuned
#   (python -m fastres tune), Res2Net-50's whole-model figures.
#
# Results: $OUT when set (the device tool's return folder, at most 8 files: summary.txt,
# steps.log with every step's output, the bench JSONs, logs.tar.gz with the logs and JUnit
# files of every step), else bench/results/local/gpu-check-<time>/. Every step runs under
# `timeout` with what is left of GPU_CHECK_BUDGET seconds (default 345); a step that fails or
# times out is recorded and the script goes on. Exit status 0 when every step passed.
#
# Environment: PYTHON (default python3; the GPU machine's has torch and Triton),
# GPU_CHECK_CALL (1, 2 or 3), GPU_CHECK_BUDGET, GPU_CHECK_DRY_RUN, MAX_JOBS (default 12: cores
# left for the Triton compiles that run beside the build).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CALL=${GPU_CHECK_CALL:-1}
BUDGET=${GPU_CHECK_BUDGET:-345}
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
  shape_args=(--device cpu --depth 18 --batch 2 --image-size 32)  # the steps, not the figures
  size_args=("${shape_args[@]}" --iters 1 --warmup 0)
  dry=(--dry-run)
  bench_modes=(--mode infer)  # a CPU's training step of every system: minutes
else
  device=cuda
  if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    note "FAIL  no CUDA device visible to $PYTHON (GPU_CHECK_DRY_RUN=1 rehearses on a CPU)"
    exit 1
  fi
  shape_args=(--device cuda --batch 256 --image-size 224 --dtype bf16)
  size_args=("${shape_args[@]}" --iters 10 --warmup 3)
  dry=()
  bench_modes=(--mode both)
fi

# The checkout runs in place, nothing installed: the extension built next to the sources,
# kernels/ reached as fastres.kernels through a link (an install maps it there).
if [ "$DRY_RUN" != 1 ] && [ ! -e fastres/kernels ]; then ln -s ../kernels fastres/kernels; fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-12}
# Untuned Triton tiles but in call 3: tuning compiles every candidate of every shape first.
# 'auto' then runs its defaults where it has no persisted choice (what it runs under
# torch.compile or torch.distributed too).
export FASTRES_TRITON_TUNE=${FASTRES_TRITON_TUNE:-0}

build() {  # in place; a machine still warm from an earlier call only relinks (or nothing)
  if [ "$DRY_RUN" = 1 ]; then
    run_step build 60 "$PYTHON" -c 'import fastres.extension as e; assert e.EXTENSION_ERROR is None, e.EXTENSION_ERROR'
  else
    run_step build 240 "$PYTHON" setup.py build_ext --inplace
  fi
}

why() {  # why NAME LIMIT SECTION: one table of bench/gpu_why.py
  run_step "$1" "$2" "$PYTHON" bench/gpu_why.py "$3" "${dry[@]}"
}

profile() {  # profile BACKEND MODE LIMIT: per-kernel table and GPU-busy against wall time
  run_step "profile-$1-$2" "$3" "$PYTHON" -m fastres profile "${shape_args[@]}" --backend "$1" \
    --mode "$2" --iters 3 --warmup 2 --profile-iters 1 --top 30
}

smoke() {  # smoke NAME PYTEST_K: one process of tests/test_cuda_models.py
  local cuda=(-m cuda)
  [ "$DRY_RUN" = 1 ] && cuda=(-p no:cacheprovider --co)
  echo "$1" "$PYTHON -m pytest tests/test_cuda_models.py ${cuda[*]} -q -ra -k '$2' --junitxml=$logs/$1.xml"
}

bench() {  # bench NAME MODEL LIMIT EXTRA...: python -m fastres bench, JSON into the results
  local name=$1 model=$2 limit=$3
  shift 3
  run_step "$name" "$limit" "$PYTHON" -m fastres bench --model "$model" "${bench_modes[@]}" \
    "${size_args[@]}" "$@" --json "$results/$name.json"
}

case "$CALL" in
1)
  build &
  build_pid=$!
  why triton-conv 150 triton-conv  # no extension needed: its kernels compile beside the build
  wait "$build_pid"
  run_step import 60 "$PYTHON" -m fastres info
  why bn-ops 60 bn
  why cudnn-fused 45 cudnn-fused
  # eager-cl and native first (no Triton compiles), then triton, then auto (whose untuned
  # defaults reuse the Triton kernels just compiled, from Triton's cache).
  backends=(torch native triton auto)
  [ "$DRY_RUN" = 1 ] && backends=(torch native auto)  # Triton on CPU: the interpreter
  for backend in "${backends[@]}"; do
    profile "$backend" infer 45
    # Triton's training kernels compile in this step (about 50 s at b32 in the smoke checks).
    profile "$backend" train "$([ "$backend" = triton ] && echo 90 || echo 60)"
  done
  ;;
2)
  build
  read -r n1 c1 < <(smoke smoke-resnet-infer-triton "resnet and infer and triton")
  read -r n2 c2 < <(smoke smoke-res2net-infer-triton "res2net and infer and triton")
  read -r n3 c3 < <(smoke smoke-torch-native "not triton")
  read -r n4 c4 < <(smoke smoke-resnet-train-triton "resnet and train and triton")
  read -r n5 c5 < <(smoke smoke-res2net-train-triton "res2net and train and triton")
  parallel_steps 120 "$n1" "$c1" "$n2" "$c2" "$n3" "$c3" "$n4" "$c4" "$n5" "$c5"
  run_step cuda-graphs 100 "$PYTHON" scripts/cuda_graphs.py --backend native "${dry[@]}"
  compile=()
  [ "$DRY_RUN" = 1 ] && compile=(--no-compile)  # torch.compile on CPU: minutes of C++ builds
  bench bench-resnet50 resnet 120 --backend auto --backend native "${compile[@]}"
  ;;
3)
  export FASTRES_TRITON_TUNE=1 FASTRES_CACHE_DIR=$results/cache
  build
  why triton-conv-tuned 150 triton-conv
  tune_args=()
  [ "$DRY_RUN" = 1 ] && tune_args=(--model resnet --mode infer)  # CPU: the step, not the figures
  run_step tune 120 "$PYTHON" -m fastres tune "${shape_args[@]}" "${tune_args[@]}"
  bench bench-res2net50 res2net 120 --depth 50 --no-compile --backend auto --backend native
  ;;
*)
  note "FAIL  GPU_CHECK_CALL=$CALL: expected 1, 2 or 3"
  ;;
esac
finish
