"""Tuned launch configurations of the Triton kernels, kept across processes (CUDA only).

The first launch of a shape class times the kernel's candidate configurations and keeps the
fastest. So that this happens once per machine rather than once per process, the choice is
written to `<cache dir>/triton-configs.json` under the GPU's name and the torch / Triton / CUDA
versions (a new version may compile the same tile differently), and read back by every later
process. Where nothing is cached for the GPU, the defaults measured on that GPU and shipped with
the package (`fastres/tuned/<gpu>.json`) are used before anything is timed.

The cache directory is `$FASTRES_CACHE_DIR`, else `$XDG_CACHE_HOME/fastres`, else
`~/.cache/fastres`. `FASTRES_TRITON_TUNE=0` times nothing: a cached or shipped choice, else the
first candidate.

Both variables are read when a shape class is first launched in the process: the launcher keeps
each shape's configuration from then on (`fastres.ops.conv2d_fused`), so changing them at run
time affects only shapes not launched yet (set them before the first forward).

Inside a CUDA graph capture nothing is timed either (timing synchronises, which a capture
forbids, and a choice made there would stay in the graph): a known choice is used, and a shape
that would be tuned raises `CaptureError`. A warm-up call on the same shapes before capturing
tunes and chooses (`torch.cuda.make_graphed_callables` and torch.compile's "reduce-overhead"
mode make such calls themselves).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

TUNE_ENV_VAR = "FASTRES_TRITON_TUNE"
CACHE_ENV_VAR = "FASTRES_CACHE_DIR"
CACHE_FILE = "triton-configs.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuned"

# (device key, config key) -> config, for this process.
_CHOSEN: dict[tuple[str, str], dict] = {}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastres"


def tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV_VAR, "1") != "0"


class CaptureError(RuntimeError):
    """What a CUDA graph capture forbids was asked for inside one: a choice still to be timed,
    or a device value read on the host."""


def capturing(device: torch.device) -> bool:
    """Whether work on `device` is being captured into a CUDA graph: a CUDA device while the
    current stream captures (free where CUDA was never initialised)."""
    return (
        device.type == "cuda"
        and torch.cuda.is_initialized()
        and torch.cuda.is_current_stream_capturing()
    )


def refuse_in_capture(device: torch.device, what: str) -> None:
    """Raises `CaptureError` inside a capture on `device`: `what` would be timed there."""
    if capturing(device):
        raise CaptureError(
            f"fastres: {what} inside a CUDA graph capture, where nothing may be timed: run the "
            "model once on the same shapes, dtype and mode before capturing (that call tunes "
            f"and chooses), or set {TUNE_ENV_VAR}=0 to use the defaults untimed"
        )


def device_key(device: torch.device) -> str:
    """The GPU's name and the versions that decide how a configuration compiles."""
    import triton

    name = torch.cuda.get_device_name(device)
    return f"{name} | torch {torch.__version__} | triton {triton.__version__}"


# Shared memory one block may use (opt-in maximum, bytes) per compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}


@functools.cache
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on `device` (its opt-in maximum); where the
    device cannot say (CPU tensors: the interpreter), sm_80's."""
    if device.type != "cuda":
        return SHARED_MEMORY_LIMIT[80]
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT[80])


def _shipped_file(device_name: str) -> Path:
    return SHIPPED_DIR / (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json")


class JsonCache:
    """One JSON file of the cache directory: {device key: {key: value}}, read once per device
    and process, written by merging with what other processes wrote meanwhile (replaced
    atomically). A cache that cannot be written only costs a re-tune later."""

    def __init__(self, filename: str):
        self.filename = filename
        self._loaded: dict[str, dict] = {}

    def path(self) -> Path:
        return cache_dir() / self.filename

    def entries(self, device: str) -> dict:
        if device not in self._loaded:
            self._loaded[device] = _read(self.path()).get(device, {})
        return self._loaded[device]

    def put(self, device: str, key: str, value) -> None:
        self.entries(device)[key] = value
        path = self.path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            everything = _read(path)
            everything.setdefault(device, {})[key] = value
            with tempfile.NamedTemporaryFile(
                "w", dir=path.parent, delete=False, suffix=".tmp"
            ) as f:
                json.dump(everything, f, indent=1, sort_keys=True)
            os.replace(f.name, path)
        except OSError as err:
            print(f"fastres: cannot write the tuning cache {path}: {err}", file=sys.stderr)

    def forget(self) -> None:
        """Drops what this process read (tests: another cache directory)."""
        self._loaded.clear()


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_CONFIGS = JsonCache(CACHE_FILE)


def _shipped(device: str) -> dict[str, dict]:
    """The configs shipped for this GPU (measured with some version: a fallback only)."""
    return _read(_shipped_file(device.split(" | ")[0])).get("configs", {})


def choose(
    device: torch.device,
    key: str,
    candidates: list[dict],
    launch: Callable[[dict], None],
    compile_only: Callable[[dict], None],
) -> dict:
    """The configuration to launch `key` with on `device` (see the module docstring).

    Args:
        key: the shape class, dtype and precision, as a string.
        candidates: configurations worth timing, the default first.
        launch: launches the kernel with a configuration (timed).
        compile_only: compiles the kernel for a configuration without launching it.
    """
    device_id = device_key(device)
    chosen = _CHOSEN.get((device_id, key))
    if chosen is not None:
        return chosen
    for known in (_CONFIGS.entries(device_id), _shipped(device_id)):
        if known.get(key) in candidates:  # a stale entry (candidates changed) is ignored
            chosen = known[key]
            break
    else:
        if tuning_enabled():
            refuse_in_capture(device, f"tuning the Triton launch configuration of {key}")
            chosen = _tune(key, candidates, launch, compile_only)
            _CONFIGS.put(device_id, key, chosen)
        else:
            chosen = candidates[0]
    _CHOSEN[device_id, key] = chosen
    return chosen


def _compile_all(candidates: list[dict], compile_only: Callable[[dict], None]) -> None:
    """Compiles every candidate at once (Triton's asynchronous compilation, where it has it):
    ptxas and much of the compiler run outside the GIL, so threads overlap them."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return  # compiled one by one at their first launch
    workers = min(len(candidates), os.cpu_count() or 1)
    # A candidate that fails to compile fails again at its timed launch, which skips it.
    with ThreadPoolExecutor(workers) as pool, AsyncCompileMode(pool, ignore_errors=True):
        for config in candidates:
            compile_only(config)


def _tune(key: str, candidates: list[dict], launch, compile_only) -> dict:
    """Times every candidate configuration and returns the fastest."""
    import triton
    import triton.testing

    start = time.perf_counter()
    _compile_all(candidates, compile_only)
    best, best_ms, errors = None, float("inf"), []
    for config in candidates:
        try:
            ms = triton.testing.do_bench(lambda c=config: launch(c), warmup=5, rep=25)
        except Exception as error:  # e.g. more shared memory than this GPU has: not a candidate
            errors.append(f"{config}: {type(error).__name__}: {error}")
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise RuntimeError(f"no launch configuration of {key} runs here:\n" + "\n".join(errors))
    tile = "x".join(str(best[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    print(
        f"fastres: tuned {key}: {len(candidates)} configs in {time.perf_counter() - start:.1f} s, "
        f"best {tile} w{best['num_warps']} s{best['num_stages']} ({best_ms:.3f} ms)",
        file=sys.stderr,
    )
    return best
