"""setup.py's choice of the CUDA toolkit (`find_cuda_toolkit`), on fake toolkits in tmp_path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "fastres_setup", Path(__file__).parent.parent / "setup.py"
)
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # defines functions only: setup() runs as __main__


def _toolkit(root: Path, headers: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("")
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def _wrapper(folder: Path, target: Path) -> Path:
    """A folder on PATH whose nvcc is a script that execs the toolkit's."""
    folder.mkdir(parents=True)
    script = folder / "nvcc"
    script.write_text(f'#!/bin/sh\nexec {target / "bin" / "nvcc"} "$@"\n')
    script.chmod(0o755)
    return folder


@pytest.fixture
def env(monkeypatch, tmp_path):
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    return monkeypatch


def test_the_toolkit_behind_a_wrapper_script_is_taken(env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    env.setenv("PATH", str(_wrapper(tmp_path / "local" / "bin", toolkit)))
    root, lines = setup_py.find_cuda_toolkit(default_roots=())
    assert root == str(toolkit) and lines[-1].endswith("taken")


def test_a_linked_nvcc_is_followed(env, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda")
    (tmp_path / "bin").mkdir()
    os.symlink(toolkit / "bin" / "nvcc", tmp_path / "bin" / "nvcc")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    env.setenv("PATH", str(tmp_path / "bin"))
    assert setup_py.find_cuda_toolkit(default_roots=())[0] == str(toolkit)


def test_a_cuda_home_without_headers_is_passed_over(env, tmp_path):
    bad = _toolkit(tmp_path / "no-headers", headers=False)
    good = _toolkit(tmp_path / "good")
    env.setenv("CUDA_HOME", str(bad))
    root, lines = setup_py.find_cuda_toolkit(default_roots=(str(tmp_path / "none"), str(good)))
    assert root == str(good)
    assert "CUDA_HOME" in lines[0] and "include/cuda_runtime_api.h" in lines[0]
    assert "bin/nvcc" in lines[1] and lines[2].endswith("taken")


def test_cuda_path_is_a_candidate_too(env, tmp_path):
    env.setenv("CUDA_PATH", str(_toolkit(tmp_path / "t")))
    assert setup_py.find_cuda_toolkit(default_roots=())[0] == str(tmp_path / "t")


def test_no_toolkit_says_why(env, tmp_path):
    root, lines = setup_py.find_cuda_toolkit(default_roots=(str(tmp_path / "nothing"),))
    assert root is None and len(lines) == 1 and "passed over" in lines[0]


def test_versioned_folders_are_tried_newest_first():
    roots = ["/usr/local/cuda-9.0", "/usr/local/cuda-12.10", "/usr/local/cuda-13.0", "/x/cuda-12.8"]
    assert setup_py.newest_first(roots) == [
        "/usr/local/cuda-13.0",
        "/usr/local/cuda-12.10",
        "/x/cuda-12.8",
        "/usr/local/cuda-9.0",
    ]
