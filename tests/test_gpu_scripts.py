"""The GPU scripts' logic, rehearsed on CPU tensors (their --dry-run paths), so that a GPU
session does not find them broken: scripts/cuda_graphs.py and bench/gpu_why.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_graphs_dry_run_checks_every_way_against_the_oracle(capsys):
    cuda_graphs = _load("scripts/cuda_graphs.py")
    assert cuda_graphs.main(["--dry-run", "--mode", "infer"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.strip().endswith("agrees")]
    assert rows == list(cuda_graphs.WAYS)


@pytest.mark.parametrize("section", ["cudnn-fused", "bn"])
def test_gpu_why_dry_run(section, capsys, monkeypatch):
    gpu_why = _load("bench/gpu_why.py")
    if section == "bn":  # one shape shows the logic
        monkeypatch.setattr(gpu_why, "BN_SHAPES", gpu_why.BN_SHAPES[-1:])
    assert gpu_why.main([section, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out
    assert ("fastres" if section == "bn" else "conv+apply") in out  # a row of every layer / shape
