#!/usr/bin/env bash
# Compiles for sm_90 every Triton kernel the triton backend launches for the compile report's
# models (ResNet-50, ResNetV1d-50, Res2Net-50, ResNet-18) in every mode, bf16 and TF32 (fp16
# compiles like bf16, and its CPU backward is slow), each with its first tile, and fails on a
# shared-memory overrun, a register spill or a convolution that is not software-pipelined
# (scripts/compile_report.py --check). The report goes to bench/results/local/.
#
#   bash scripts/check_sm90_compile.sh [PYTHON]     # default .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."

python=${1:-.venv/bin/python}
version=$("$python" -c 'import triton; print(triton.__version__)')
mkdir -p bench/results/local
"$python" scripts/compile_report.py --arch 90 --batch 16 --dtype bf16 --dtype tf32 --check \
  --json "bench/results/local/sm90-first-tiles-triton${version}.json" | grep -v "new kernels"
