"""What a run reports: one `Result` per system and case, the speedups and memory ratios over
PyTorch eager channels_last, the plain-text table, and the JSON file with the environment it
was measured in (device, versions, thread and allocator settings)."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import backends
from .systems import SPEEDUP_BASELINE, default_device


@dataclass
class Result:
    """One system on one case: speed, correctness, memory."""

    group: str
    model: str
    mode: str
    system: str
    backend: str
    batch: int
    image_size: int  # the height
    image_width: int
    preset: str
    dtype: str
    device: str
    img_per_s: float
    ms_per_iter: float
    times_ms: list[float]
    first_call_s: float
    max_error: float
    worst_tensor: str
    check_passed: bool
    check_failures: list[str]
    worst_grad_error: float | None
    worst_grad: str | None
    peak_memory_bytes: int | None
    memory_kind: str
    speedup: float | None = None
    # Peak memory over eager channels_last's in the same group (target in training: <= 0.6x,
    # docs/contract.md §6).
    memory_ratio: float | None = None
    # Mean minor page faults per timed step (`minor_page_faults`); None where not counted.
    page_faults_per_iter: float | None = None
    # Whether the system's process flushed subnormal floats to zero (`--flush-denormals`);
    # None where it did not run.
    denormals_flushed: bool | None = None


def add_speedups(results: Iterable[Result]) -> None:
    """Sets each result's speedup and peak-memory ratio over PyTorch eager channels_last in the
    same group (the ratio where both peaks were measured)."""
    results = list(results)
    baseline = {r.group: r for r in results if r.system == SPEEDUP_BASELINE}
    for r in results:
        base = baseline.get(r.group)
        if base is None:
            continue
        r.speedup = r.img_per_s / base.img_per_s
        if r.peak_memory_bytes is not None and (base.peak_memory_bytes or 0) > 0:
            r.memory_ratio = r.peak_memory_bytes / base.peak_memory_bytes


def _format_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:,.0f} MiB"


def format_table(results: Iterable[Result]) -> str:
    """A plain-text table: group, system, img/s, speedup, peak memory ratio (both over eager
    channels_last), error, check, peak memory, the first call's time (building the model,
    the check; torch.compile's compilation) and the page faults per step; then the Res2Net /
    ResNet speed ratios where both models ran."""
    results = list(results)
    header = (
        "group",
        "system",
        "img/s",
        "ms/iter",
        "speedup",
        "mem ratio",
        "max err",
        "check",
        "peak mem",
        "1st call",
        "faults/it",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                r.group,
                r.system,
                f"{r.img_per_s:,.1f}",
                f"{r.ms_per_iter:,.1f}",
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
                "-" if r.memory_ratio is None else f"{r.memory_ratio:.2f}x",
                f"{r.max_error:.1e}",
                "ok" if r.check_passed else "FAIL",
                _format_bytes(r.peak_memory_bytes),
                f"{r.first_call_s:.1f} s",
                "-" if r.page_faults_per_iter is None else f"{r.page_faults_per_iter:,.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratios = model_ratios(results)
    if ratios:
        lines.append("")
        lines.append("Res2Net / ResNet speed (img/s ratio, same depth, system and setting):")
        for r in ratios:
            lines.append(
                f"  {r['setting']:<28} {r['system']:<16} {r['ratio']:.3f}  "
                f"({r['res2net_img_per_s']:,.1f} / {r['resnet_img_per_s']:,.1f} img/s)"
            )
    return "\n".join(lines)


def model_ratios(results: Iterable[Result]) -> list[dict]:
    """img/s of Res2Net over img/s of ResNet of the same depth for every system and setting
    (batch, image size, dtype, mode, device) where both ran: the Res2Net-50 / ResNet-50 speed
    ratio (target >= 0.95 on GPU, docs/contract.md §6; PyTorch about 0.7-0.8)."""
    by_key: dict[tuple, dict[str, Result]] = {}
    for r in results:
        family = r.model.rstrip("0123456789")
        depth = r.model[len(family) :]
        key = (r.group.replace(r.model, depth, 1), r.system, r.device)
        by_key.setdefault(key, {})[family] = r
    ratios = []
    for (setting, system, _), pair in by_key.items():
        if "res2net" in pair and "resnet" in pair:
            ratios.append(
                {
                    "setting": setting,
                    "system": system,
                    "ratio": pair["res2net"].img_per_s / pair["resnet"].img_per_s,
                    "res2net_img_per_s": pair["res2net"].img_per_s,
                    "resnet_img_per_s": pair["resnet"].img_per_s,
                }
            )
    return ratios


# -- environment ----------------------------------------------------------------------------


def device_name(device: torch.device | str) -> str:
    """The GPU name, or the CPU model from /proc/cpuinfo with the core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def versions() -> dict[str, str | None]:
    """Versions of Python, torch, CUDA / cuDNN, Triton and fastres."""
    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "triton": triton_version,
        "fastres": __version__,
    }


# Environment variables that change how the CPU allocator maps memory (besides glibc's MALLOC_*):
# glibc's tunables, a preloaded allocator (jemalloc, tcmalloc), PyTorch's huge-page switch.
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE")


def environment(device: torch.device | str) -> dict:
    """What a results file records about where it was measured."""
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        # Other processes on the CPU cores make CPU timings (and GPU launch overheads) noisy.
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "versions": versions(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        # OpenMP's settings change eager PyTorch's CPU timings more than fastres' (see README).
        "openmp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))},
        # The C library's allocator settings decide how many page faults eager PyTorch takes.
        "allocator_env": {
            k: v for k, v in os.environ.items() if k in ALLOCATOR_ENV or k.startswith("MALLOC_")
        },
        "backends": {n: s.reason for n, s in backends.available_backends().items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_json(path: str | os.PathLike, results: Iterable[Result], settings: dict) -> Path:
    """Writes the results with the environment and the settings used; returns the path."""
    results = list(results)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": environment(settings.get("device", default_device())),
        "settings": settings,
        "results": [asdict(r) for r in results],
        "res2net_over_resnet": model_ratios(results),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
