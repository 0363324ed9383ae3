#!/usr/bin/env bash
# The kernel tests under Triton 3.6, the version of the lent GPU machines (CI installs a newer
# one): the Triton interpreter runs every kernel of kernels/ on CPU tensors in a venv of its own,
# .venv-triton36, with the CPU torch 2.13.0 and numpy < 2.4 (Triton 3.6's interpreter fails on
# numpy 2.4's scalars). fastres is installed there editable without building its extension: the
# checkout's fastres/_C, built by `make env` against the same torch, is loaded from the checkout.
#
#   bash scripts/check_triton36.sh          # after `make env`
#
# The tests: the sm_90 compile report (tests/test_compile_report.py: Triton 3.6's real compiler,
# no interpreter; then the whole report, scripts/check_sm90_compile.sh), and the fused convolution's, the Res2Net ones
# and the training unit's files, which between them launch every switch of the kernels (flat and
# tap-major K, the pool, BN and ReLU prologues, the input add, bias, both residual forms, ReLU,
# statistics, groups) in fp16, bf16, fp32 and fp64 (each DOT_PRECISION), the Res2Net last-chunk
# pool kernel and the statistics' merge (with its BatchNorm finalize); and tests/test_launcher.py, whose direct launch of compiled kernels follows the
# JIT's own (fastres/ops/launcher.py: checked there against Triton 3.6's JIT under the stand-in).
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-triton36
python=$venv/bin/python
if ! "$python" -c 'import triton, torch, numpy, pytest, sys; sys.exit(triton.__version__ != "3.6.0" or torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
  python3 -m venv "$venv"
  "$python" -m pip install -q --disable-pip-version-check torch==2.13.0 triton==3.6.0 \
    "numpy<2.4" pytest setuptools wheel
  FASTRES_BUILD_EXT=0 "$python" -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e .
fi
"$python" -c 'import triton, fastres.extension as e; print("triton", triton.__version__); assert e.EXTENSION_ERROR is None, e.EXTENSION_ERROR'
"$python" -m pytest tests/test_conv2d_fused.py tests/test_res2net_fused.py \
  tests/test_conv2d_bn_train.py tests/test_merge_tile_stats.py tests/test_compile_report.py \
  tests/test_launcher.py -q \
  -p no:cacheprovider
bash scripts/check_sm90_compile.sh "$python"
