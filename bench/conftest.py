"""pytest-benchmark settings for `pytest bench/ --benchmark-only`.

Whole-model benchmarks of ResNet / Res2Net (see test_bench_models.py). The configuration comes
from command-line options or environment variables (options win). Where a default depends on
the preset and the device it is `python -m fastres bench`'s, from the one table
`fastres.benchmark.DEVICE_DEFAULTS` (`pytest bench/ --help` lists the values):

| option | variable | default |
|---|---|---|
| --bench-preset | FASTRES_BENCH_PRESET | classification (or detection: mmdet's backbone training) |
| --bench-device | FASTRES_BENCH_DEVICE | cuda if available, else cpu |
| --bench-depth | FASTRES_BENCH_DEPTH | 50 |
| --bench-batch | FASTRES_BENCH_BATCH | per preset and device |
| --bench-image-size | FASTRES_BENCH_IMAGE_SIZE | H or HxW, per preset and device; detection pads |
| | | each side to a multiple of 32 |
| --bench-dtype | FASTRES_BENCH_DTYPE | per device (below fp32: autocast) |
| --bench-rounds | FASTRES_BENCH_ROUNDS | per device (the CLI's --iters) |
| --bench-warmup | FASTRES_BENCH_WARMUP | per device (untimed steps after the check) |
| --bench-compile | FASTRES_BENCH_COMPILE | 'auto' (the device's compile_modes), 'all', 'none' |
| --bench-results | FASTRES_BENCH_RESULTS | bench/results/local/<device>-<time>.json |

Besides pytest-benchmark's own output (and its --benchmark-json), every run writes its results
with speedups, errors, peak memory, device name and versions to the --bench-results file and
prints the fastres table at the end.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastres import benchmark as bm

RESULTS_DIR = Path(__file__).parent / "results" / "local"
COMPILE_CHOICES = ("auto", "all", "none")
# The options whose default is a DEVICE_DEFAULTS entry: option -> key (--bench-rounds is iters).
_TABLE_KEYS = {("rounds" if key == "iters" else key): key for key in bm.SETTING_KEYS}
_OPTIONS = ("preset", "device", "depth", *_TABLE_KEYS, "compile", "results")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastres-bench", "fastres whole-model benchmarks")
    for name in _OPTIONS:
        default = (
            f"; default {bm.describe_default(_TABLE_KEYS[name])}" if name in _TABLE_KEYS else ""
        )
        group.addoption(
            f"--bench-{name.replace('_', '-')}",
            dest=f"fastres_bench_{name}",
            default=None,
            help=f"(env FASTRES_BENCH_{name.upper()}{default})",
        )


@dataclass(frozen=True)
class BenchSettings:
    preset: str
    device: str
    depth: int
    batch: int
    image_size: tuple[int, int]  # (height, width), padded for detection
    dtype: str
    rounds: int
    warmup: int
    compile: str
    results: str | None

    def compiles(self, mode: str) -> bool:
        if self.compile == "auto":
            return mode in bm.device_defaults(self.preset, self.device)["compile_modes"]
        return self.compile == "all"


def _settings(config: pytest.Config) -> BenchSettings:
    raw = {}
    for name in _OPTIONS:
        value = config.getoption(f"fastres_bench_{name}")
        raw[name] = value if value is not None else os.environ.get(f"FASTRES_BENCH_{name.upper()}")
    device = raw["device"] or bm.default_device()
    preset = raw["preset"] or "classification"
    if preset not in bm.PRESETS:
        raise pytest.UsageError(f"--bench-preset must be one of {bm.PRESETS}")
    defaults = bm.device_defaults(preset, device)
    compile_choice = raw["compile"] or "auto"
    if compile_choice not in COMPILE_CHOICES:
        raise pytest.UsageError(f"--bench-compile must be one of {COMPILE_CHOICES}")
    table = {}
    for name, key in _TABLE_KEYS.items():
        text = raw[name]
        if not text:
            table[name] = defaults[key]
        elif name == "image_size":
            try:
                table[name] = bm.parse_image_size(text)
            except ValueError as err:
                raise pytest.UsageError(f"--bench-image-size: {err}") from None
        else:
            table[name] = text if name == "dtype" else int(text)
    table["image_size"] = bm.input_size(preset, *table["image_size"])
    return BenchSettings(
        preset=preset,
        device=device,
        depth=int(raw["depth"] or 50),
        compile=compile_choice,
        results=raw["results"],
        **table,
    )


def pytest_configure(config: pytest.Config) -> None:
    config._fastres_bench = _settings(config)
    config._fastres_results = []


@pytest.fixture(scope="session")
def bench_settings(pytestconfig: pytest.Config) -> BenchSettings:
    return pytestconfig._fastres_bench


@pytest.fixture(scope="session")
def bench_results(pytestconfig: pytest.Config) -> list:
    return pytestconfig._fastres_results


class _CaseCache:
    """Keeps the latest case only: its systems run one after another (system is the innermost
    parameter), and each case holds a float64 gold copy of every gradient."""

    def __init__(self):
        self.case: bm.Case | None = None

    def get(self, config: bm.BenchConfig) -> bm.Case:
        if self.case is None or self.case.config != config:
            self.case = None
            bm.free_memory()
            self.case = bm.Case(config)
        return self.case


@pytest.fixture(scope="session")
def case_cache() -> _CaseCache:
    return _CaseCache()


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["fastres"] = bm.environment(config._fastres_bench.device)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = getattr(config, "_fastres_results", [])
    if not results:
        return
    bm.add_speedups(results)
    settings = config._fastres_bench
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    device_type = torch.device(settings.device).type
    path = bm.write_json(
        settings.results or RESULTS_DIR / f"{device_type}-{stamp}.json",
        results,
        {**settings.__dict__, "runner": "pytest bench/"},
    )
    terminalreporter.write_sep("-", f"fastres results on {bm.device_name(settings.device)}")
    terminalreporter.write_line(bm.format_table(results))
    terminalreporter.write_line(f"written to {path}")
