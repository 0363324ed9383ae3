"""'auto': per site of the model, the fastest implementation that agrees with the oracle.

A *site* is where one implementation is chosen:

- BatchNorms on running statistics (eval, norm_eval, frozen stages): each unit of the stem
  and of a ResNet block (conv -> BN [-> ReLU]), and each block's tail (conv -> BN -> + shortcut
  -> ReLU, the downsample unit with it); the candidates are `UNIT_CANDIDATES`;
- a Bottle2neck in eval mode, and every block and the stem with BatchNorms in training mode:
  the whole block (or stem), with the backends as candidates (`BLOCK_CANDIDATES`). Triton's
  Res2Net middle hands conv3 a padded channel layout, and its training units hand each other raw
  convolution outputs with their statistics: no other implementation could take over mid-block.

Sites of one shape class share a choice: its *site class* (site kind, mode, dtype, layout, the
convolutions' geometry) and its *size class* (the input's batch and pixel count H*W, each rounded
up to a power of two). Buckets this coarse let the ever-changing padded sizes of detection share
choices: what decides a candidate's agreement is the dtype and the reduction depth (the geometry),
not the image size, and what decides its speed changes little within an octave of pixels. A choice
is made once per machine:

1. `FASTRES_SELECT=<name>` forces the candidate `name` wherever it can run (profiling), else its
   family (`native-onednn` -> `native`); elsewhere the choice is made as below;
2. the choice this process made, else the one persisted under the device's key in
   `<cache dir>/selection.json` (the cache directory of the Triton configs: `fastres.ops.tuning`);
3. else, where tuning may run (`FASTRES_TRITON_TUNE` is not 0, not under torch.compile or
   torch.distributed; inside a CUDA graph capture it raises `tuning.CaptureError`: a warm-up
   call before capturing chooses), every candidate runs once on the site's inputs and must
   pass the contract's agreement rule against the float64 oracle (outputs, and gradients where
   the site needs them, `gradient_agrees`, where a candidate that misses only a gradient is
   checked again on fresh inputs, `_REDRAWS`; docs/contract.md §3); those that pass are timed in
   turns, round after round (on CPU each run first-touches fresh buffers, as in a whole
   model), and the fastest is persisted: the default unless another's best time is more than
   `_MARGIN` faster and it beat the default in most rounds. The oracle itself
   ('torch') is always a candidate: no site is slower than PyTorch's modules. Tuning is bounded:
   one process tunes at most `FASTRES_SELECT_SIZES` (default `DEFAULT_SIZES`) size classes of a
   site class, so a model tunes at most that many times its number of site classes, whatever
   sizes it is fed. Beyond that a new size class takes the choice of the nearest size class of
   its site class known to the process or persisted ('transferred', kept in this process only);
4. else the default: on a GPU the floor, what was measured fastest on a GPU of its class and
   shipped with the package (`measured.py`; PyTorch's own modules where no GPU of the class
   was measured; never untuned Triton); on CPU the first candidate that can run, in the order
   of the candidate tables (native).

Trials leave no trace: BatchNorm buffers are restored after each, gradients are taken with
`torch.autograd.grad` (no `.grad` is written) on detached inputs. `recording()` collects the
choices for a per-layer report (`python -m fastres tune`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import platform
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import cpu_cache
from ..ops import tuning
from ..testing import TOLERANCE, relative_error
from . import measured, native, triton
from .base import ORACLE, Backend
from .folding import uses_batch_stats
from .plan import REFERENCE, Implementation, Shortcut, Unit, run_block, run_units

SELECT_ENV_VAR = "FASTRES_SELECT"
SIZES_ENV_VAR = "FASTRES_SELECT_SIZES"
SELECTION_FILE = "selection.json"
# Size classes a site class tunes per process: the first size seen, and one more (a second batch
# size, or a neighbouring octave of detection's sizes); further sizes transfer a choice.
DEFAULT_SIZES = 2

_SELECTIONS = tuning.JsonCache(SELECTION_FILE)


class _Choices:
    """The choices this process made or read.

    `by_class`: (device key, shape class) -> candidate name. `by_site`: a site's label module
    -> {key: candidate} (`_choose`), so that a forward finds each site's choice without
    filtering the candidates or formatting its shape class, which cost more than a small
    convolution (bench/results/README.md, "CPU: the cost of choosing"). `tunings`: (device key,
    site class) -> how many of its size classes this process tuned.
    """

    def __init__(self):
        self.by_class: dict[tuple[str, str], str] = {}
        self.by_site: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.tunings: dict[tuple[str, str], int] = {}


_CHOSEN = _Choices()

# Timing: each candidate's agreement run warms it up; then rounds in which every agreeing
# candidate runs once, in turns, so that a load spike on the machine hits one round of every
# candidate rather than every run of one: at most _TIMED_RUNS rounds, no more once
# _TIME_BUDGET_S seconds per candidate are spent and _MIN_ROUNDS are done.
_TIMED_RUNS = 5
_MIN_ROUNDS = 3
_TIME_BUDGET_S = 0.5
# Another candidate replaces the default (`_default`) only when its best time is faster by more
# than this and it beat the default in most rounds: the rest is noise, and the default's
# whole-model effects are known (`_timed_rounds`).
_MARGIN = 0.03
# A candidate whose output agrees and only a gradient misses is checked again on fresh inputs,
# at most this many times, and it is a candidate if it agrees on one. One pre-activation that
# rounds to the other side of a ReLU kink than in the float64 gold moves a whole BatchNorm
# channel's gradient, and every sample of the input's through the batch statistics (more than
# `gradient_agrees` forgives): it turned native away from one or two of the six training
# blocks of ResNet-50 that `fastres tune` timed at 8x128x128 in float32 (2026-12-05, Intel
# Xeon). A wrong gradient misses on every input.
_REDRAWS = 2
_clock = time.perf_counter  # tests replace it


class Candidate(NamedTuple):
    """One implementation of a site: `applies(device, site)` says whether it can run it."""

    name: str
    impl: Any  # an Implementation (unit sites) or a Backend (block sites)
    applies: Callable[[torch.device, Any], bool]

    @property
    def family(self) -> str:
        return self.name.split("-")[0]


def _always(device, site) -> bool:
    return True


def _backend_runs(backend: Backend) -> Callable[[torch.device, Any], bool]:
    return lambda device, site: backend.unavailable_reason(device.type) is None


# Unit sites, per device type. On CPU the first that applies is the default (on CUDA the floor,
# `measured.py`).
UNIT_CANDIDATES: dict[str, list[Candidate]] = {
    "cuda": [
        Candidate("triton", triton.EVAL_UNITS, triton.runs_units),
        Candidate("native", native.UNITS, native.runs_units),
        Candidate("native-fastbn", native.FAST_BN_UNITS, native.runs_fast_bn),
        Candidate("native-cudnn", native.CUDNN_UNITS, native.runs_cudnn_fused),
        Candidate("torch", REFERENCE, _always),
    ],
    # Triton on CPU tensors is the interpreter, a test vehicle: not a candidate (tests add it).
    "cpu": [
        Candidate("native-onednn", native.ONEDNN_UNITS, native.runs_onednn),
        Candidate("native", native.UNITS, native.runs_units),
        Candidate("torch", REFERENCE, _always),
    ],
}

_NATIVE, _TRITON, _TORCH = native.BACKEND, triton.BACKEND, ORACLE
BLOCK_CANDIDATES: dict[str, list[Candidate]] = {
    "cuda": [
        Candidate("triton", _TRITON, _backend_runs(_TRITON)),
        Candidate("native", _NATIVE, _backend_runs(_NATIVE)),
        Candidate("native-fastbn", native.FAST_BN_BACKEND, native.runs_fast_bn_blocks),
        Candidate("torch", _TORCH, _always),
    ],
    "cpu": [
        Candidate("native", _NATIVE, _backend_runs(_NATIVE)),
        Candidate("torch", _TORCH, _always),
    ],
}


def candidate_names() -> list[str]:
    """Every name FASTRES_SELECT accepts."""
    tables = [*UNIT_CANDIDATES.values(), *BLOCK_CANDIDATES.values()]
    return sorted({c.name for table in tables for c in table})


# -- what a site is ----------------------------------------------------------------------------


class _UnitSite(NamedTuple):
    """A unit, or (`tail`) a block's tail with its shortcut: what an Implementation runs."""

    unit: Unit
    tail: bool
    h: Tensor  # the unit's input
    x: Tensor | None = None  # the block's input (tail only)
    shortcut: Shortcut | None = None

    def modules(self) -> list[nn.Module]:
        mods = [self.unit.conv, self.unit.norm]
        if self.shortcut is not None:
            mods += [*self.shortcut.pools, self.shortcut.unit.conv, self.shortcut.unit.norm]
        return mods

    def inputs(self) -> list[Tensor]:
        return [self.h] if self.x is None else [self.h, self.x]

    def pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(conv, norm) of the unit, and of the shortcut's unit."""
        units = [self.unit] if self.shortcut is None else [self.unit, self.shortcut.unit]
        return [(u.conv, u.norm) for u in units]

    def run(self, impl: Implementation, inputs: list[Tensor]) -> Tensor:
        if self.tail:
            return impl.tail(self.unit, inputs[0], inputs[1], self.shortcut)
        return impl.output(impl.unit(self.unit, inputs[0]))

    def with_inputs(self, inputs: list[Tensor]) -> _UnitSite:
        return self._replace(h=inputs[0], x=inputs[1] if self.x is not None else None)

    def with_modules(self, memo: dict[int, nn.Module]) -> _UnitSite:
        """This site with its modules replaced by their copies in `memo` (id -> copy)."""

        def unit(u: Unit) -> Unit:
            return Unit(memo[id(u.conv)], memo[id(u.norm)], u.relu)

        shortcut = self.shortcut
        if shortcut is not None:
            pools = tuple(memo[id(p)] for p in shortcut.pools)
            shortcut = Shortcut(pools, unit(shortcut.unit))
        return self._replace(unit=unit(self.unit), shortcut=shortcut)


class _BlockSite(NamedTuple):
    """A whole block, or (`stem`) the stem of a model: what a Backend runs."""

    module: nn.Module  # the block, or the model for its stem
    x: Tensor
    stem: bool = False

    def modules(self) -> list[nn.Module]:
        if self.stem:
            units = self.module.stem_units()
            return [m for u in units for m in (u.conv, u.norm)] + [self.module.maxpool]
        return list(self.module.modules())

    def inputs(self) -> list[Tensor]:
        return [self.x]

    def run(self, backend: Backend, inputs: list[Tensor]) -> Tensor:
        if self.stem:
            return backend.run_stem(self.module, inputs[0])
        return backend.run_block(self.module, inputs[0])

    def with_modules(self, memo: dict[int, nn.Module]) -> _BlockSite:
        return self._replace(module=memo[id(self.module)])

    def with_inputs(self, inputs: list[Tensor]) -> _BlockSite:
        return self._replace(x=inputs[0])


def _needs_grad(site) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in site.inputs()):
        return True
    return any(p.requires_grad for m in site.modules() for p in m.parameters(recurse=False))


def _mode(site) -> str:
    # Unit sites exist only where no norm uses batch statistics (`SelectingBackend`).
    if isinstance(site, _BlockSite) and any(map(uses_batch_stats, site.modules())):
        return "train"
    return "grad" if _needs_grad(site) else "eval"


def _conv_geometry(conv: nn.Module) -> str:
    if not isinstance(conv, nn.Conv2d):
        return type(conv).__name__
    return (
        f"{conv.in_channels}>{conv.out_channels} k{conv.kernel_size} s{conv.stride} "
        f"p{conv.padding} d{conv.dilation} g{conv.groups}{' bias' if conv.bias is not None else ''}"
    )


# module -> its `_module_signature` (geometry does not change; the key is built every call).
_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(m: nn.Module) -> str:
    signature = _SIGNATURES.get(m)
    if signature is None:
        signature = _SIGNATURES[m] = _module_signature(m)
    return signature


def _module_signature(m: nn.Module) -> str:
    if isinstance(m, nn.Conv2d):
        return _conv_geometry(m)
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return f"{type(m).__name__}{'' if m.affine else '-noaffine'}"
    if isinstance(m, nn.AvgPool2d):
        return f"AvgPool{m.kernel_size}/{m.stride}{' ceil' if m.ceil_mode else ''}"
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ReLU, nn.Identity)):
        return ""
    extra = m.extra_repr()
    return f"{type(m).__name__}({extra})"


def _layout(t: Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return "cl" if channels_last else "strided"


def _power_of_two(n: int) -> int:
    """n rounded up to a power of two; 0 stays 0 (an empty input runs the oracle alone)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _size_class(x: Tensor) -> tuple[int, int]:
    """(batch, pixels H*W) of an input, each rounded up to a power of two: the sizes that share
    a choice (see the module docstring)."""
    n, _, h, w = x.shape
    return _power_of_two(n), _power_of_two(h * w)


_SIZE_SEPARATOR = " | in "


def _shape_class(kind: str, site) -> str:
    """'<site class> | in <batch>x<pixels>px' (`_parse_shape_class` reads it back)."""
    x = site.inputs()[0]
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    modules = ",".join(s for s in map(_signature, site.modules()) if s)
    if kind == "block":
        modules = f"{type(site.module).__name__}[{modules}]"
    batch, pixels = _size_class(x)
    return (
        f"{kind} {_mode(site)} {str(dtype).removeprefix('torch.')} {_layout(x)} {modules}"
        f"{_SIZE_SEPARATOR}{batch}x{pixels}px"
    )


def _parse_shape_class(key: str) -> tuple[str, int, int] | None:
    """(site class, batch, pixels) of a `_shape_class`; None for another key (one that an older
    version wrote)."""
    site_class, _, size = key.rpartition(_SIZE_SEPARATOR)
    try:
        batch, pixels = map(int, size.removesuffix("px").split("x"))
    except ValueError:
        return None
    return site_class, batch, pixels


def _device_key(device: torch.device) -> str:
    """The processor and the versions that decide the timings (CPU: with the thread count)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _gpu_key(index)
    return f"{_cpu_name()} x{torch.get_num_threads()} threads | torch {torch.__version__}"


@functools.cache
def _gpu_key(index: int) -> str:
    versions = f"torch {torch.__version__}"
    try:
        import triton as triton_lang

        versions += f" | triton {triton_lang.__version__}"
    except ImportError:
        pass
    return f"{torch.cuda.get_device_name(index)} | {versions}"


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- choosing ----------------------------------------------------------------------------------


def _forced() -> str | None:
    name = os.environ.get(SELECT_ENV_VAR)
    if not name:
        return None
    if name not in candidate_names():
        raise ValueError(
            f"{SELECT_ENV_VAR}={name!r} is not an implementation: expected one of "
            f"{', '.join(candidate_names())}"
        )
    return name


def _may_tune() -> bool:
    """Whether a site with no known choice is tuned (inside a CUDA graph capture it is refused
    instead: `_pick`)."""
    if not tuning.tuning_enabled():
        return False
    # Every rank must make the same choice: tune ahead (`fastres tune`).
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


_RECORD: list | None = None


class Choice(NamedTuple):
    """One site's choice, as `recording()` reports it."""

    module: nn.Module  # the unit's conv, the block, or the model (stem)
    site: str  # the shape class
    chosen: str
    how: str  # 'forced', 'only', 'cached', 'persisted', 'tuned', 'transferred', 'default'
    times_ms: dict[str, float | None]  # tuned: per candidate, None where it disagreed


@contextlib.contextmanager
def recording() -> Iterator[list[Choice]]:
    """Collects every choice made while active (one per site visited)."""
    global _RECORD
    outer, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = outer


def _settings(device: torch.device) -> tuple:
    """What every site's choice depends on besides the site: autocast's dtype, the forced
    name, the thread count, whether tuning may run and how many sizes. Read once per block."""
    autocast = torch.is_autocast_enabled(device.type)
    return (
        torch.get_autocast_dtype(device.type) if autocast else None,
        os.environ.get(SELECT_ENV_VAR),
        torch.get_num_threads(),
        _may_tune(),
        _sizes_tuned(),
    )


def _sizes_tuned() -> int:
    """How many size classes of one site class a process may tune (`FASTRES_SELECT_SIZES`)."""
    value = os.environ.get(SIZES_ENV_VAR)
    if not value:
        return DEFAULT_SIZES
    try:
        sizes = int(value)
    except ValueError:
        sizes = -1
    if sizes < 0:
        raise ValueError(f"{SIZES_ENV_VAR}={value!r}: expected a count of sizes, 0 or more")
    return sizes


def _choose(
    kind: str,
    site,
    table: dict[str, list[Candidate]],
    label: nn.Module,
    settings: tuple | None = None,
) -> Candidate:
    """The candidate for `site` (`label`: its module in a `recording()`).

    A site's choice is remembered under its label module and a key of what else it depends
    on, cheap to build: the settings, the mode, the inputs' size classes, dtypes and layouts
    (the modules' geometry is fixed). A new size of a known size class costs nothing more than
    a known size.
    """
    device = site.inputs()[0].device
    settings = _settings(device) if settings is None else settings
    key = (
        kind,
        _mode(site),
        settings,
        *((_size_class(t), t.dtype, t.device, _layout(t)) for t in site.inputs()),
    )
    known = _CHOSEN.by_site.get(label)
    if known is not None and _RECORD is None:
        choice = known.get(key)
        if choice is not None:
            return choice
    runnable = [c for c in table.get(device.type, table["cpu"]) if c.applies(device, site)]
    choice, how, times = _pick(kind, site, runnable, device)
    if _RECORD is not None:
        _RECORD.append(Choice(label, _shape_class(kind, site), choice.name, how, times))
    _CHOSEN.by_site.setdefault(label, {})[key] = choice
    return choice


def _pick(kind, site, runnable: list[Candidate], device) -> tuple[Candidate, str, dict]:
    by_name = {c.name: c for c in runnable}
    forced = _forced()
    if forced is not None:
        if forced in by_name:
            return by_name[forced], "forced", {}
        family = [c for c in runnable if c.family == forced.split("-")[0]]
        if family:
            return family[0], "forced", {}
    if len(runnable) == 1:
        return runnable[0], "only", {}
    key = _shape_class(kind, site)
    device_id = _device_key(device)
    name = _CHOSEN.by_class.get((device_id, key))
    if name in by_name:
        return by_name[name], "cached", {}
    name = _SELECTIONS.entries(device_id).get(key)
    if name in by_name:
        _CHOSEN.by_class[device_id, key] = name
        return by_name[name], "persisted", {}
    if not _may_tune():
        return _default(kind, site, runnable, device), "default", {}
    parsed = _parse_shape_class(key)
    site_class = key if parsed is None else parsed[0]
    tuned_sizes = _CHOSEN.tunings.get((device_id, site_class), 0)
    if tuned_sizes >= _sizes_tuned():
        name = None if parsed is None else _nearest(device_id, *parsed, by_name)
        if name is None:
            return _default(kind, site, runnable, device), "default", {}
        _CHOSEN.by_class[device_id, key] = name
        return by_name[name], "transferred", {}
    tuning.refuse_in_capture(device, f"choosing the implementation of {key}")
    chosen, times = _tune(site, runnable, _default(kind, site, runnable, device).name)
    for loser in runnable:
        if loser.impl is not chosen.impl:
            loser.impl.forget(site.modules())
    _CHOSEN.tunings[device_id, site_class] = tuned_sizes + 1
    _CHOSEN.by_class[device_id, key] = chosen.name
    _SELECTIONS.put(device_id, key, chosen.name)
    return chosen, "tuned", times


def _family(kind: str, site) -> str:
    """Which GPU measurement decides the site's floor (`measured`)."""
    if _mode(site) != "eval":
        return "training"
    if kind == "block" and site.module.plan().res2net is not None:
        return "res2net-inference"
    return "inference"


def _default(kind: str, site, runnable: list[Candidate], device: torch.device) -> Candidate:
    """What a site runs without a measurement of its own: on a GPU the floor (`measured`),
    else the first candidate of its table that runs it."""
    name = measured.floor(device, _family(kind, site))
    if name is None:
        return runnable[0]
    by_name = {c.name: c for c in runnable}
    return by_name.get(name) or next(c for c in runnable if c.family == "torch")


def _nearest(
    device_id: str, site_class: str, batch: int, pixels: int, by_name: dict[str, Candidate]
) -> str | None:
    """The choice, among `by_name`, of the size class of `site_class` nearest to (batch,
    pixels), in octaves of batch plus octaves of pixels, that this process or the file knows."""
    known = {k: name for (d, k), name in _CHOSEN.by_class.items() if d == device_id}
    known.update(_SELECTIONS.entries(device_id))
    best, best_distance = None, math.inf
    for other, name in sorted(known.items()):
        other_parsed = _parse_shape_class(other)
        if other_parsed is None or other_parsed[0] != site_class or name not in by_name:
            continue
        _, other_batch, other_pixels = other_parsed
        distance = abs(other_batch.bit_length() - batch.bit_length()) + abs(
            other_pixels.bit_length() - pixels.bit_length()
        )
        if distance < best_distance:
            best, best_distance = name, distance
    return best


# -- tuning ------------------------------------------------------------------------------------


def _norm_buffers(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """(buffer, saved copy) of every BatchNorm buffer: trials must not move running
    statistics."""
    return [
        (b, b.detach().clone())
        for m in modules
        if isinstance(m, nn.modules.batchnorm._NormBase)
        for b in m.buffers(recurse=False)
    ]


@torch.no_grad()
def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    """Puts back the buffers a trial changed, only those: a write would make the backends'
    folded-weight caches, keyed on versions, fold again. (Values are compared, not versions:
    batch_norm updates running statistics without bumping their version.)"""
    for buffer, value in saved:
        if not torch.equal(buffer, value):
            buffer.copy_(value)


def _parameters(site) -> list[Tensor]:
    seen, params = set(), []
    for m in site.modules():
        for p in m.parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _detached(inputs: list[Tensor], grad: bool) -> list[Tensor]:
    """The inputs off the caller's graph; those that required grad do so again if `grad`."""
    return [t.detach().requires_grad_(t.requires_grad and grad) for t in inputs]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gold(site, grad_out: Tensor | None) -> list[Tensor]:
    """The oracle in float64 on float64 copies of the site's modules and inputs."""
    originals = [site.module] if isinstance(site, _BlockSite) else site.modules()
    # Without hooks: a profiler's or a user's hooks have no place on the copies, and may hold
    # objects that cannot be copied.
    no_hooks = {
        id(hooks): type(hooks)()
        for original in originals
        for m in original.modules()
        for name, hooks in vars(m).items()
        if "hooks" in name and isinstance(hooks, dict)
    }
    copies = copy.deepcopy(nn.ModuleList(originals), no_hooks)
    memo = {id(original): dup.double() for original, dup in zip(originals, copies)}
    site64 = site.with_modules(memo)
    wants_grad = grad_out is not None
    inputs = _detached([t.double() for t in site.inputs()], wants_grad)
    trials = _Trials(site64, inputs, _parameters(site64) if wants_grad else [])
    trials.grad_out = None if grad_out is None else grad_out.double()
    with torch.autocast(inputs[0].device.type, enabled=False):
        return trials.run(_TORCH if isinstance(site, _BlockSite) else REFERENCE)


def _agreement(result: list[Tensor], base: list[Tensor], gold: list[Tensor], dtype) -> str:
    """'agrees'; 'output' where the output (first) misses the agreement rule or a result is
    missing or misshapen; 'gradient' where only a gradient misses `gradient_agrees`."""
    if len(result) != len(base) or any(r.shape != g.shape for r, g in zip(result, gold)):
        return "output"
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    (out, *grads), (out_base, *grads_base), (out_gold, *grads_gold) = result, base, gold
    if not _within(out, out_base, out_gold, tol):
        return "output"
    if all(gradient_agrees(*tensors, tol) for tensors in zip(grads, grads_base, grads_gold)):
        return "agrees"
    return "gradient"


def _within(r: Tensor, b: Tensor, g: Tensor, tol: float) -> bool:
    return relative_error(r, g) <= 4 * relative_error(b, g) + tol  # False for NaN


def gradient_agrees(r: Tensor, b: Tensor, g: Tensor, tol: float) -> bool:
    """The agreement rule, except in a few slices along dim 0 (one in 20, at least one).

    A pre-activation that rounds to the other side of a ReLU kink than in the float64 gold
    passes or stops a whole upstream gradient: it moves one channel of a parameter's gradient
    (one slice of a conv weight, one entry of a BN weight) or one sample of an input gradient,
    by far more than rounding. A wrong gradient misses in every slice, not in one.
    """
    if _within(r, b, g, tol):
        return True
    bound = (4 * relative_error(b, g) + tol) * float(g.abs().max())
    close = (r.double() - g.double()).abs() <= bound  # False for NaN
    missed = ~close.reshape(close.shape[0], -1).all(1) if close.dim() else ~close.reshape(1)
    return int(missed.sum()) <= max(1, missed.numel() // 20)


class _Trials:
    """Runs implementations of one site on detached copies of its inputs: the output, and the
    gradients of the inputs and parameters (taken with autograd.grad, so no .grad is written)
    against `grad_out` where the site needs gradients."""

    def __init__(self, site, inputs: list[Tensor], params: list[Tensor]):
        self.site, self.inputs, self.params = site, inputs, params
        self.grad_out: Tensor | None = None

    def run(self, impl) -> list[Tensor]:
        out = self.site.run(impl, self.inputs)
        if self.grad_out is None:
            return [out.detach()]
        wrt = [t for t in self.inputs if t.requires_grad] + self.params
        grads = torch.autograd.grad(out, wrt, self.grad_out, allow_unused=True)
        return [out.detach()] + [g for g in grads if g is not None]


def _tune(
    site, runnable: list[Candidate], default: str
) -> tuple[Candidate, dict[str, float | None]]:
    """Runs every candidate once against the oracle, times those that agree in rounds, returns
    the fastest by `_fastest` (and every candidate's best time in ms, None where it disagreed
    or failed)."""
    needs_grad = _needs_grad(site)
    inputs = _detached(site.inputs(), needs_grad)
    trials = _Trials(site, inputs, _parameters(site) if needs_grad else [])
    saved = _norm_buffers(site.modules())
    oracle = next(c for c in runnable if c.family == "torch")
    # Saved tensors kept in place: inside a checkpointed block (with_cp) the checkpoint would
    # pack the trials' tensors, and their backward would recompute the block. (Detached: a
    # tensor saved by its own grad_fn would otherwise hold its graph in a cycle through C++,
    # which no garbage collection frees.) The float64 copies and the agreement runs' outputs
    # stay out of the CPU block cache; the timed runs do not: each candidate runs as in the
    # model (native's blocks in their cache scope, spared the page faults of fresh buffers).
    plain = torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach(), lambda t: t)
    with plain:
        try:
            with cpu_cache.paused():
                base, gold = _references(site, trials, oracle.impl, needs_grad, saved)
                verdicts = {
                    c.name: _agreement_on_site(trials, c.impl, base, gold, saved) for c in runnable
                }
                for _ in range(_REDRAWS):
                    doubtful = [c for c in runnable if verdicts[c.name] == "gradient"]
                    if not doubtful:
                        break
                    drawn = site.with_inputs([_drawn_like(t) for t in site.inputs()])
                    redraw = _Trials(drawn, _detached(drawn.inputs(), True), trials.params)
                    base, gold = _references(drawn, redraw, oracle.impl, True, saved)
                    for c in doubtful:
                        verdicts[c.name] = _agreement_on_site(redraw, c.impl, base, gold, saved)
            agreeing = [c for c in runnable if verdicts[c.name] == "agrees"]
            runs = _timed_rounds(trials, agreeing, saved)
        finally:
            _restore(saved)
    times = {c.name: min(runs[c.name]) * 1e3 if c.name in runs else None for c in runnable}
    best = _fastest(runs, default) or oracle.name
    return next(c for c in runnable if c.name == best), times


def _fastest(runs: dict[str, list[float]], default: str) -> str | None:
    """The name with the best time, unless it is not `default` and either misses `_MARGIN`
    or lost to the default in half the rounds or more (`runs`: seconds per round)."""
    if not runs:
        return None
    best = min(runs, key=lambda name: min(runs[name]))
    if best == default or default not in runs:
        return best
    challenger, incumbent = runs[best], runs[default]
    wins = sum(c < d for c, d in zip(challenger, incumbent))
    if min(challenger) < (1 - _MARGIN) * min(incumbent) and 2 * wins > len(incumbent):
        return best
    return default


def _references(site, trials: _Trials, oracle, needs_grad: bool, saved) -> tuple[list, list]:
    """The oracle's results on the trials' inputs in their dtype (base) and in float64 (gold);
    draws the trials' gradient of the output where the site needs gradients."""
    base = trials.run(oracle)
    if needs_grad:
        trials.grad_out = torch.randn_like(base[0])
        base = trials.run(oracle)
    _restore(saved)
    return base, _gold(site, trials.grad_out)


def _drawn_like(t: Tensor) -> Tensor:
    """Fresh normal values of t's shape, dtype and layout, requiring grad where t does."""
    return torch.randn_like(t).requires_grad_(t.requires_grad)


def _agreement_on_site(trials: _Trials, impl, base, gold, saved) -> str:
    """`_agreement` of the implementation's results on the trials ('output' where it fails)."""
    try:
        return _agreement(trials.run(impl), base, gold, base[0].dtype)
    except Exception:  # a candidate that cannot run this site is no candidate
        return "output"
    finally:
        _restore(saved)


def _timed_rounds(trials: _Trials, candidates: list[Candidate], saved) -> dict[str, list[float]]:
    """Each candidate's time (s) in every round; a candidate that fails while timed is dropped."""
    device = trials.inputs[0].device
    runs: dict[str, list[float]] = {c.name: [] for c in candidates}
    budget, spent = _TIME_BUDGET_S * len(candidates), 0.0
    for r in range(_TIMED_RUNS):
        if r >= min(_MIN_ROUNDS, _TIMED_RUNS) and spent > budget:
            break
        turn = r % max(len(candidates), 1)  # each round starts with another candidate
        for c in candidates[turn:] + candidates[:turn]:
            if c.name not in runs:
                continue
            try:
                elapsed = _run_timed(trials, c.impl, saved, device)
            except Exception:  # a candidate that fails while timed is no candidate
                del runs[c.name]
                continue
            runs[c.name].append(elapsed)
            spent += elapsed
    return runs


def _run_timed(trials: _Trials, impl, saved, device: torch.device) -> float:
    if device.type == "cpu":
        # Fresh buffers cost page faults in a whole model (the C library returns large freed
        # blocks to the kernel; the native backend's cpu_cache keeps its own). Repeated alone,
        # a site would reuse its heap: hand it back before each run.
        cpu_cache.trim_heap()
    _sync(device)
    start = _clock()
    try:
        trials.run(impl)
        _sync(device)
        return _clock() - start
    finally:
        _restore(saved)


# -- the backend -------------------------------------------------------------------------------


class _SelectedUnits(Implementation[Tensor, Tensor]):
    """Each unit and tail runs the implementation chosen for its site (under `settings`)."""

    def __init__(self, settings: tuple):
        self.settings = settings

    def unit(self, unit: Unit, x: Tensor) -> Tensor:
        site = _UnitSite(unit, False, x)
        choice = _choose("unit", site, UNIT_CANDIDATES, unit.conv, self.settings)
        return site.run(choice.impl, [x])

    def tail(self, unit: Unit, h: Tensor, x: Tensor, shortcut: Shortcut | None) -> Tensor:
        site = _UnitSite(unit, True, h, x, shortcut)
        choice = _choose("tail", site, UNIT_CANDIDATES, unit.conv, self.settings)
        return site.run(choice.impl, [h, x])


class SelectingBackend(Backend):
    """'auto': see the module docstring."""

    name = "auto"

    def default(self, device: torch.device) -> Backend:
        """The first backend of the block table that runs on `device` ('torch' where no fused
        one can)."""
        for candidate in BLOCK_CANDIDATES.get(device.type, BLOCK_CANDIDATES["cpu"]):
            if candidate.applies(device, None):
                return candidate.impl
        return _TORCH

    def _unselected(self, site: _BlockSite) -> Backend:
        """What runs a stem or block where nothing may be chosen (torch.compile traces it):
        on a GPU the floor (`measured`), else `default`."""
        device = site.x.device
        name = measured.floor(device, _family("stem" if site.stem else "block", site))
        if name is None:
            return self.default(device)
        for candidate in BLOCK_CANDIDATES.get(device.type, BLOCK_CANDIDATES["cpu"]):
            if candidate.name == name and candidate.applies(device, site):
                return candidate.impl
        return _TORCH

    def run_stem(self, model: nn.Module, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._unselected(_BlockSite(model, x, stem=True)).run_stem(model, x)
        units = model.stem_units()
        site = _BlockSite(model, x, stem=True)
        if _mode(site) == "train":
            return site.run(_choose("stem", site, BLOCK_CANDIDATES, model).impl, [x])
        cpu_cache.close_stale_backward_scope()
        with cpu_cache.scope(x.device):
            x = model.maxpool(run_units(_SelectedUnits(_settings(x.device)), units, x))
        cpu_cache.scope_backward(x)
        return x

    def run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._unselected(_BlockSite(block, x)).run_block(block, x)
        plan = block.plan()
        # From the plan's norms, not the block's module tree: walking that costs more.
        if plan.res2net is not None or any(map(uses_batch_stats, plan.norms())):
            site = _BlockSite(block, x)
            return site.run(_choose("block", site, BLOCK_CANDIDATES, block).impl, [x])
        with cpu_cache.scope(x.device):
            out = run_block(_SelectedUnits(_settings(x.device)), plan, x)
        cpu_cache.scope_backward(out)
        return out


# -- reporting ---------------------------------------------------------------------------------


def selection_file() -> str:
    """Where the choices persist."""
    return str(_SELECTIONS.path())


def layer_report(model: nn.Module, choices: list[Choice]) -> list[dict]:
    """One row per site visited: the layer's name in `model` ('' for the stem), the site kind,
    the choice, how it was made, and the candidates' times (ms) where they were measured."""
    names = {id(m): name for name, m in model.named_modules()}
    rows, seen = [], set()
    for c in choices:
        row = {
            "layer": names.get(id(c.module), "?") or "stem",
            "site": c.site,
            "chosen": c.chosen,
            "how": c.how,
            "times_ms": {k: None if v is None else round(v, 3) for k, v in c.times_ms.items()},
        }
        key = (row["layer"], c.site)
        if key not in seen:  # a training step's recomputation visits a site twice
            seen.add(key)
            rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """The report as a table: layer, kind, chosen, and the timings or how it was chosen."""
    lines = [f"  {'layer':22s} {'site':6s} {'chosen':14s} candidates (ms; - disagreed or failed)"]
    for row in rows:
        times = row["times_ms"]
        detail = (
            ", ".join(f"{n} {'-' if t is None else f'{t:.2f}'}" for n, t in times.items())
            if times
            else f"({row['how']})"
        )
        kind = row["site"].split(" ", 1)[0]
        lines.append(f"  {row['layer']:22s} {kind:6s} {row['chosen']:14s} {detail}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["chosen"]] = counts.get(row["chosen"], 0) + 1
    lines.append("  chosen: " + ", ".join(f"{n} {k}" for n, k in sorted(counts.items())))
    return "\n".join(lines)
