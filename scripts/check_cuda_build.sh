#!/usr/bin/env bash
# Proves the CUDA build of fastres._C without a GPU: in a venv of its own (.venv-cuda) with the
# CUDA 13.0 build of torch 2.14.1 that lies on this machine's disk, builds the whole extension,
# CUDA part included, for sm_80 and sm_90, loads it and checks that every fastres:: op of the
# extension has a CUDA kernel. Never downloads a CUDA torch: the install is resolved first and
# refused unless torch, Triton and every NVIDIA wheel come from local files (small pure-Python
# helpers such as cuda-bindings may come from PyPI).
#
#   bash scripts/check_cuda_build.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_CUDA=2.14.1
LOCAL_WHEELS=${LOCAL_WHEELS:-/opt/pypi-more/files}  # where this machine keeps them
venv=.venv-cuda
python=$PWD/$venv/bin/python
start=$SECONDS
phase() { echo "check_cuda_build: $1 ($((SECONDS - start)) s)"; }

if ! "$python" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH_CUDA+cu130')" 2>/dev/null; then
  python3 -m venv "$venv"
  pip=("$python" -m pip install -q --disable-pip-version-check)
  "${pip[@]}" "numpy<2.4" ninja setuptools wheel
  # The NVIDIA wheels in their local versions (PyPI may hold newer ones).
  constraints=$(mktemp)
  ls "$LOCAL_WHEELS" 2>/dev/null | sed -n 's/^\(nvidia_[a-z0-9_]*\)-\([0-9][^-]*\)-.*/\1==\2/p' \
    | tr _ - >"$constraints"
  pip+=(-c "$constraints")
  report=$(mktemp)
  "${pip[@]}" --dry-run --ignore-installed --report "$report" "torch==$TORCH_CUDA"
  "$python" - "$report" <<'EOF'
import json, re, sys

remote = [
    f"{item['metadata']['name']} from {item['download_info']['url']}"
    for item in json.load(open(sys.argv[1]))["install"]
    if re.match(r"(torch|triton|nvidia)", item["metadata"]["name"].lower())
    and not item["download_info"]["url"].startswith("file:")
]
if remote:
    sys.exit("check_cuda_build: refusing to download a CUDA stack:\n  " + "\n  ".join(remote))
EOF
  "${pip[@]}" "torch==$TORCH_CUDA"
  phase "venv with torch $TORCH_CUDA (local wheels)"
fi

# Built from a copy of the tracked sources: the checkout's build/ and fastres/_C belong to the
# CPU build of .venv.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$src"
FASTRES_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
  "$python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  --force-reinstall "$src"
phase "extension built (sm_80, sm_90)"

cd "$src/.."  # import the installed package, not the checkout
"$python" - <<'EOF'
import glob
import importlib.util
import os

import torch

package = importlib.util.find_spec("fastres").submodule_search_locations[0]
(library,) = glob.glob(os.path.join(package, "_C*.so"))
torch.ops.load_library(library)  # the C++ ops alone, not the Python-registered Triton ones
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastres::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
assert ops, "the extension registered no fastres:: op"
assert not missing, f"no CUDA kernel for {missing}"
print(f"check_cuda_build: OK, {len(ops)} ops with CUDA kernels: {', '.join(ops)}")
EOF
phase "done"
