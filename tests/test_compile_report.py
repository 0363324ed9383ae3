"""scripts/compile_report.py: the triton backend's kernels compiled for sm_90 on this CPU-only
machine, with the JIT's real specialization, and their resources checked.

A subprocess, because the report needs Triton's compiler and the tests run Triton through its
interpreter (chosen when triton is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "compile_report.py"


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend")
@pytest.mark.parametrize(
    "workload, arch", [("resnet18", 90), ("resnet50-v1d", 90), ("resnet50-v1d", 80)]
)
def test_first_configs_fit_without_spills(workload, arch, tmp_path):
    """The tile each shape gets with tuning off compiles for sm_90 / sm_80, fits its shared
    memory, spills no register and is software-pipelined (cp.async), the pooled avg_down
    shortcut convolutions of V1d included (their A tile holds 4 input pixels per output pixel:
    at 3 stages it took 180,224 bytes on sm_80, which allows 166,912)."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--arch", str(arch), "--workload", workload, "--mode", "infer", "--dtype", "bf16"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--batch", "2", "--image-size", "64",
         "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(report.read_text())
    kernels = payload["kernels"]
    assert payload["summary"]["kernels"] == len(kernels) > 5
    pooled = [k for k in kernels if k["constexprs"].get("POOL") == 2]
    assert bool(pooled) == (workload == "resnet50-v1d")
    for k in kernels:
        what = f"{k['kernel']} {k['constexprs']}"
        assert k["fits_shared"] and k["shared_bytes"] > 0, what
        assert k["registers"] and k["spill_store_bytes"] == 0, what
        assert k["pipelined"], what
