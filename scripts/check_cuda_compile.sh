#!/usr/bin/env bash
# Compile-checks the CUDA kernels of fastres._C without a GPU and without a CUDA torch: the
# kernel sources (csrc/cuda/*_kernels.cu) include no torch headers, so the machine's nvcc
# compiles them alone, for sm_80 and sm_90 (in parallel). Prints ptxas' register report and
# fails on any compile error or any register spill.
#
#   bash scripts/check_cuda_compile.sh            # NVCC=/path/to/nvcc to pick another nvcc
set -euo pipefail
cd "$(dirname "$0")/.."

nvcc=${NVCC:-nvcc}
if ! command -v "$nvcc" >/dev/null; then
  echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
"$nvcc" --version | tail -n 2

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sources=(csrc/cuda/*_kernels.cu)
pids=()
for arch in 80 90; do
  for src in "${sources[@]}"; do
    name=$(basename "$src" .cu)
    "$nvcc" -std=c++17 -O3 --use_fast_math -lineinfo -Icsrc/cuda \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v \
      -c "$src" -o "$out/${name}_sm${arch}.o" >"$out/${name}_sm${arch}.log" 2>&1 &
    pids+=("$!:${name}_sm${arch}")
  done
done
failed=0
for entry in "${pids[@]}"; do
  if ! wait "${entry%%:*}"; then
    echo "check_cuda_compile: ${entry#*:} failed to compile:" >&2
    cat "$out/${entry#*:}.log" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1

spills=0
for log in "$out"/*.log; do
  tag=$(basename "$log" .log)
  # ptxas prints 'Compiling entry function NAME' / 'Function properties' / spill line /
  # 'Used N registers' per kernel; show one line per kernel.
  awk -v tag="$tag" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes spill stores/ { spill = $0; sub(/^[ \t]+/, "", spill) }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      printf "%-14s %4s regs | %s | %s\n", tag, regs, spill, fn
    }' "$log"
  if grep -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >/dev/null; then
    echo "check_cuda_compile: register spills in $tag:" >&2
    grep -B2 -E "[1-9][0-9]* bytes spill (stores|loads)" "$log" >&2
    spills=1
  fi
done
if [ "$spills" != 0 ]; then
  echo "check_cuda_compile: FAILED (register spills)" >&2
  exit 1
fi
echo "check_cuda_compile: OK (${#sources[@]} source(s), sm_80 and sm_90, no spills)"
