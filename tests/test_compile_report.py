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
    "workload, arch, modes, size",
    [
        ("resnet18", 90, ["infer"], 64),
        ("resnet50-v1d", 90, ["infer"], 64),
        ("resnet50-v1d", 80, ["infer"], 64),
        # Every Res2Net path: its chunks of 26 / 52 / 104 channels sit in padded slots. At 224
        # px no tile is shrunk to a tiny layer (a 32-row 8-warp tile spills 4 bytes).
        ("res2net50", 90, ["infer", "bn-frozen", "train"], 224),
    ],
)
def test_first_configs_fit_without_spills(workload, arch, modes, size, tmp_path):
    """The tile each shape gets with tuning off compiles for sm_90 / sm_80, fits its shared
    memory, spills no register and is software-pipelined (cp.async), the pooled avg_down
    shortcut convolutions of V1d included (their A tile holds 4 input pixels per output pixel:
    at 3 stages it took 180,224 bytes on sm_80, which allows 166,912), and Res2Net's chunk
    convolutions (unaligned chunks were neither vectorized nor pipelined, and spilled)."""
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--arch", str(arch), "--workload", workload, "--dtype", "bf16"]
    args += [a for mode in modes for a in ("--mode", mode)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--batch", "2", "--image-size", str(size),
         "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(report.read_text())
    kernels = payload["kernels"]
    assert payload["summary"]["kernels"] == len(kernels) > 5
    pooled = [k for k in kernels if k["constexprs"].get("POOL") == 2]
    assert bool(pooled) == (workload != "resnet18")
    assert any(k["kernel"] == "res2net_pool_kernel" for k in kernels) == (workload == "res2net50")
    for k in kernels:
        what = f"{k['kernel']} {k['constexprs']}"
        assert k["fits_shared"], what
        assert k["registers"] and k["spill_store_bytes"] == 0, what
        if k["kernel"] == "conv2d_fused_kernel":
            assert k["shared_bytes"] > 0 and k["pipelined"], what
        else:
            assert k["pipelined"] is None, what
