"""The Triton kernels ship as `fastres.kernels`, never as a top-level `kernels` package."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import fastres

REPO = Path(__file__).resolve().parents[1]


def test_kernels_import_as_a_subpackage():
    kernels = importlib.import_module("fastres.kernels")
    assert Path(kernels.__file__).parent.name == "kernels"
    assert fastres.kernels is kernels


def test_wheel_puts_kernels_inside_fastres(tmp_path):
    env = {"FASTRES_BUILD_EXT": "0", "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, env=env, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("fastres-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastres/kernels/__init__.py" in names
    assert "fastres/models/resnet.py" in names
    kernel_files = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert kernel_files <= {Path(n).name for n in names if n.startswith("fastres/kernels/")}
    assert not any(n.startswith("kernels/") for n in names)
