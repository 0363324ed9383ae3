#!/usr/bin/env bash
# Prepares .venv for the README's commands, on a fresh machine or an existing one:
#  - reuses an installed torch (the venv sees the system site-packages) where one exists,
#    otherwise installs torch==2.13.0 (any other pin would download the CUDA build);
#  - installs the test and benchmark tools, and OpenMMLab's mmdet / mmpretrain to test against;
#  - builds and installs fastres editable (its extension with ninja, no build isolation so that
#    the build uses this torch).
# Re-running it is cheap: the install is redone only when the build inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    echo "setup_env: reusing the installed torch ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)

"$venv/bin/python" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
# Only tools that do not depend on torch, so nothing here can pull in another torch.
# onnx, onnxruntime and onnxscript (the ONNX exporter with dynamo=True) for the export tests.
"$venv/bin/python" -c "import pytest, pytest_benchmark, ninja, numpy, triton, setuptools, wheel, ruff, onnx, onnxruntime, onnxscript" 2>/dev/null \
  || "${pip[@]}" pytest pytest-benchmark ninja numpy "triton>=3.2" "setuptools>=64" wheel ruff \
    onnx onnxruntime onnxscript

# OpenMMLab's own backbones, which the fidelity tests compare against: their packages are pure
# Python and go in without their requirements (those would pull another torch); the libraries
# they import at module level come separately (none of them needs torch).
"$venv/bin/python" -c "import mmengine, mmcv.cnn, mmdet, mmpretrain" 2>/dev/null || {
  "${pip[@]}" --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0 mmpretrain==1.2.0
  "${pip[@]}" addict yapf termcolor rich pyyaml opencv-python-headless pillow \
    importlib_metadata modelindex
}

stamp="$venv/.fastres-installed"
inputs=$(find setup.py pyproject.toml csrc -type f 2>/dev/null | sort)
if [ ! -f "$stamp" ] || [ -n "$(find $inputs -newer "$stamp" 2>/dev/null)" ] \
  || ! "$venv/bin/python" -c "import fastres" 2>/dev/null; then
  "${pip[@]}" --no-build-isolation --no-deps -e .
  touch "$stamp"
fi
