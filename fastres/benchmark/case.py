"""Benchmark harness shared by `python -m fastres bench`, `python -m fastres profile` and `bench/`.

A *case* is one whole-model configuration (model, depth, batch, image size, dtype, device, mode);
a *system* is one way of running it: PyTorch eager in NCHW, eager in channels_last, torch.compile
of the same oracle model, or a fastres backend. Every system of a case starts from a deep copy of
the same randomised model and sees the same input batch, so its outputs can be checked once
against the float64 oracle (docs/contract.md §3, `fastres.testing`) before it is timed.

Modes:
- 'infer': `model.eval()`, forward under `torch.no_grad()`;
- 'train': one training step, forward in train mode (BatchNorm on batch statistics) +
  cross-entropy + backward + SGD (momentum 0.9) step.

Below fp32 every system runs under `torch.autocast(device, dtype)` with fp32 weights (AMP), which
is PyTorch eager's best mixed-precision configuration for training and the one MLPerf uses.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, cpu_cache
from ..models import Res2Net, ResNet
from ..testing import assert_matches_oracle, randomize_norms, relative_error

try:
    import resource
except ImportError:  # not a Unix: page faults are not counted
    resource = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {"resnet": ResNet, "res2net": Res2Net}
MODES = ("infer", "train")
# classification: the ImageNet classifier (BatchNorm trains, cross-entropy on the logits).
# detection: the backbone as mmdet's Mask R-CNN / RetinaNet train it: frozen_stages=1 and
# norm_eval=True (every BatchNorm frozen), the four stage outputs, images of about 800x1333
# padded to multiples of 32.
PRESETS = ("classification", "detection")
DETECTION_PAD = 32

# What `python -m fastres bench` and `pytest bench/` run unless told otherwise, per preset and
# device type; image sizes are (height, width) before the detection padding. CPU
# classification: the CPU target's configuration (fp32, batch 8, docs/contract.md §6) on 128x128
# images, so that a run takes minutes on 2 cores (224 is the targets' size, about 3x the time).
# The CPU times the median of 3 after 1 untimed step, the GPU of 20 after 5.
DEVICE_DEFAULTS = {
    "classification": {
        "cpu": {"batch": 8, "image_size": (128, 128), "dtype": "fp32", "iters": 3, "warmup": 1},
        "cuda": {
            "batch": 256, "image_size": (224, 224), "dtype": "bf16", "iters": 20, "warmup": 5,
        },
    },
    "detection": {
        "cpu": {"batch": 2, "image_size": (400, 667), "dtype": "fp32", "iters": 3, "warmup": 1},
        "cuda": {
            "batch": 2, "image_size": (800, 1333), "dtype": "bf16", "iters": 20, "warmup": 5,
        },
    },
}  # fmt: skip


def device_defaults(preset: str, device: str) -> dict:
    """DEVICE_DEFAULTS of `preset` on `device` ('cpu', 'cuda', 'cuda:1', ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return DEVICE_DEFAULTS[preset]["cuda" if device.startswith("cuda") else "cpu"]


def parse_image_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '800x1333' -> (800, 1333) (height x width)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise ValueError(f"expected H or HxW (e.g. 224, 800x1333), got {text!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {text!r}")
    return height, width


def input_size(preset: str, height: int, width: int) -> tuple[int, int]:
    """The image size the model sees: detection pads each side up to a multiple of 32, as
    mmdet's data preprocessor does (pad_size_divisor=32)."""
    if preset != "detection":
        return height, width
    return tuple(-(-n // DETECTION_PAD) * DETECTION_PAD for n in (height, width))


NUM_CLASSES = 1000
LEARNING_RATE = 1e-3
MOMENTUM = 0.9


@dataclass(frozen=True)
class System:
    """One way of running a model: which backend, which memory layout, compiled or not."""

    name: str
    backend: str = "torch"
    channels_last: bool = True
    compiled: bool = False


EAGER = System("eager", channels_last=False)
EAGER_CL = System("eager-cl")
COMPILE = System("compile", compiled=True)
PEERS = (EAGER, EAGER_CL, COMPILE)
# The speedup column divides by this peer: PyTorch eager in its best layout.
SPEEDUP_BASELINE = EAGER_CL.name


def fastres_system(backend: str) -> System:
    """The system that runs fastres backend `backend` (channels_last, not compiled)."""
    return System(f"fastres-{backend}", backend=backend)


def backend_reasons(device: torch.device | str) -> dict[str, str | None]:
    """Which fastres backends can be benchmarked on `device`.

    Returns:
        backend name -> None where it can run, else why not. 'triton' on CPU only runs under
        the Triton interpreter, which is for tests: timing it means nothing, so it is excluded.
    """
    device = torch.device(device)
    reasons: dict[str, str | None] = {}
    for name in [*backends.available_backends(), "auto"]:
        try:
            backends.resolve(name, device)
            reasons[name] = None
        except RuntimeError as err:
            reasons[name] = str(err)
    if device.type == "cpu" and reasons.get("triton") is None:
        reasons["triton"] = "on CPU Triton only runs under TRITON_INTERPRET=1, not worth timing"
    return reasons


def benchable_backends(device: torch.device | str) -> list[str]:
    """The fastres backends that can run on `device`, in registry order."""
    return [name for name, reason in backend_reasons(device).items() if reason is None]


def default_backends(device: torch.device | str) -> list[str]:
    """The fastres backends benchmarked unless named: the fused ones that can run on `device`,
    and 'auto', the selection among them.

    'torch' is the oracle itself, the same computation as the eager-cl peer; timing it twice
    would only cost time, so it runs by default only where no fused backend can.
    """
    fused = [name for name in benchable_backends(device) if name not in ("torch", "auto")]
    if fused and backends.resolve("auto", torch.device(device)).name == "auto":
        fused.append("auto")  # the per-layer selection among them (and the oracle)
    return fused or ["torch"]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_model_depth(model: str, depth: int) -> None:
    """Raises ValueError where `model` has no variant of `depth`."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    valid = sorted(MODELS[model].arch_settings)
    if depth not in valid:
        raise ValueError(f"{model} has no depth {depth}: expected one of {valid}")


@dataclass(frozen=True)
class BenchConfig:
    """One whole-model configuration: what a benchmark group measures."""

    model: str = "resnet"
    depth: int = 50
    batch: int = 8
    image_size: int = 224  # the height; the width too unless image_width is given
    dtype: str = "fp32"
    device: str = "cpu"
    mode: str = "infer"
    preset: str = "classification"
    image_width: int | None = None

    def __post_init__(self) -> None:
        check_model_depth(self.model, self.depth)
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.preset not in PRESETS:
            raise ValueError(
                f"unknown preset {self.preset!r}: expected one of {', '.join(PRESETS)}"
            )
        if self.batch < 1 or min(self.input_shape[2:]) < 1:
            raise ValueError(f"batch and image size must be positive, got {self}")

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        width = self.image_size if self.image_width is None else self.image_width
        return (self.batch, 3, self.image_size, width)

    @property
    def label(self) -> str:
        """'resnet50', 'res2net50', ..."""
        return f"{self.model}{self.depth}"

    @property
    def group(self) -> str:
        """The benchmark group name, `<op>[-det]-b<batch>x<size>-<dtype>-<mode>`."""
        _, _, height, width = self.input_shape
        size = f"{height}" if height == width else f"{height}x{width}"
        preset = "-det" if self.preset == "detection" else ""
        return f"{self.label}{preset}-b{self.batch}x{size}-{self.dtype}-{self.mode}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def config_from_args(args, model: str, mode: str) -> BenchConfig:
    """The BenchConfig of `model` in `mode` from resolved settings (the CLI's arguments,
    bench/conftest.py's BenchSettings): preset, depth, batch, image_size as (height, width),
    dtype, device."""
    height, width = args.image_size
    return BenchConfig(
        model, args.depth, args.batch, height, args.dtype, args.device, mode, args.preset, width
    )


def build_model(model: str, depth: int, seed: int = 0, preset: str = "classification") -> nn.Module:
    """The oracle model every system of a case copies (fp32, CPU, 'torch' backend).

    zero_init_residual=False and randomised BatchNorm parameters and statistics make every
    block matter. classification: the classifier, norm_eval=False so that a training step uses
    batch statistics, as in ImageNet training. detection: the backbone as mmdet configures it
    (frozen_stages=1, norm_eval=True: the stem and stage 1 frozen, every BatchNorm in eval).
    """
    check_model_depth(model, depth)
    torch.manual_seed(seed)
    if preset == "detection":
        kwargs = dict(frozen_stages=1, norm_eval=True)
    else:
        kwargs = dict(num_classes=NUM_CLASSES, norm_eval=False)
    net = MODELS[model](depth, zero_init_residual=False, backend="torch", **kwargs)
    return randomize_norms(net, seed)


def training_loss(out: Tensor | tuple[Tensor, ...], y: Tensor | None) -> Tensor:
    """classification: cross-entropy of the logits. detection: a stand-in for the neck and
    heads, the mean square of each stage's features, whose gradient reaches every stage."""
    if isinstance(out, Tensor):
        return F.cross_entropy(out.float(), y)
    return sum(f.float().square().mean() for f in out)


def _named_outputs(out: Tensor | tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The logits, or each stage's features."""
    if isinstance(out, Tensor):
        return {"logits": out.detach().cpu()}
    return {f"stage {i}": f.detach().cpu() for i, f in enumerate(out)}


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast to fp16 / bf16; nothing for fp32 and fp64."""
    if dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """One system set up for one case: its own model copy, input batch and optimizer."""

    def __init__(self, case: Case, system: System):
        config = case.config
        self.case, self.system, self.device = case, system, case.device
        self.dtype = config.torch_dtype
        self.model = copy.deepcopy(case.reference).to(self.device)
        self.model.set_backend(system.backend)
        self.x = case.x
        if system.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.model.train(config.mode == "train")
        self.module: Callable[[Tensor], Tensor] = self.model
        if system.compiled:
            # Earlier cases' compiled graphs are dead; dropping them keeps Dynamo's per-function
            # cache (8 entries) from filling up and silently falling back to eager.
            torch._dynamo.reset()
            self.module = torch.compile(self.model)
        self.optimizer = None
        if config.mode == "train":
            trained = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.SGD(trained, lr=LEARNING_RATE, momentum=MOMENTUM)

    def outputs(self) -> dict[str, Tensor]:
        """The tensors the correctness check compares, on CPU.

        infer: the logits [N, 1000] (detection: the stage features). train: those, the loss,
        every parameter gradient and every BatchNorm running statistic after one forward +
        backward (no optimizer step).
        """
        return collect_outputs(self.module, self.model, self.x, self.case.y, self.dtype)

    def step(self) -> None:
        """One timed iteration: a forward (infer) or a training step (train)."""
        with autocast_context(self.device, self.dtype):
            if self.optimizer is None:
                with torch.no_grad():
                    self.module(self.x)
                return
            self.optimizer.zero_grad(set_to_none=True)
            loss = training_loss(self.module(self.x), self.case.y)
        loss.backward()
        self.optimizer.step()


GRAD_PREFIX = "grad "
ALL_GRADS = "grads (all parameters)"


def collect_outputs(
    module: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Runs `module` (the model, or its compiled wrapper) once and gathers what is checked."""
    device = x.device
    if not model.training:
        with torch.no_grad(), autocast_context(device, dtype):
            return _named_outputs(module(x))
    model.zero_grad(set_to_none=True)
    with autocast_context(device, dtype):
        result = module(x)
        loss = training_loss(result, y)
    loss.backward()
    out = {**_named_outputs(result), "loss": loss.detach().cpu()}
    for name, param in model.named_parameters():
        if param.grad is not None:
            out[GRAD_PREFIX + name] = param.grad.detach().cpu()
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            out[name] = buf.detach().cpu()
    model.zero_grad(set_to_none=True)
    return out


@dataclass
class CheckResult:
    """Outcome of the correctness check of one system against the float64 oracle.

    `max_error` / `worst` cover the tensors the rule is applied to; `worst_grad_error` /
    `worst_grad` the single parameter gradient furthest from gold (information only).
    """

    max_error: float
    worst: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    worst_grad_error: float | None = None
    worst_grad: str | None = None


def _checked_tensors(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the rule is applied to: every output except single gradients, which are replaced
    by the vector of all parameter gradients.

    Through training-mode BatchNorm (a few values per channel in the last stages) single
    gradient tensors of a whole model are rounding noise in float32 — PyTorch's own fp32
    gradients are off by up to tens of percent there, and by different amounts in NCHW and
    channels_last — so per tensor the rule would judge noise. The whole gradient vector is
    dominated by its well-conditioned large entries.
    """
    checked = {k: v for k, v in outputs.items() if not k.startswith(GRAD_PREFIX)}
    grads = [v.flatten() for k, v in outputs.items() if k.startswith(GRAD_PREFIX)]
    if grads:
        # float64 so that the concatenation itself adds no rounding; relative_error compares
        # in float64 anyway.
        checked[ALL_GRADS] = torch.cat([g.double() for g in grads])
    return checked


def compare(
    actual: dict[str, Tensor], base: dict[str, Tensor], gold: dict[str, Tensor], dtype: torch.dtype
) -> CheckResult:
    """Applies the docs/contract.md §3 rule to the checked tensors; reports the largest error."""
    if actual.keys() != gold.keys():
        missing = sorted(gold.keys() - actual.keys())
        extra = sorted(actual.keys() - gold.keys())
        return CheckResult(float("inf"), "keys", False, [f"missing {missing}, extra {extra}"])
    result = CheckResult(0.0, "", True)
    checked_actual, checked_base = _checked_tensors(actual), _checked_tensors(base)
    for name, gold_tensor in _checked_tensors(gold).items():
        err = relative_error(checked_actual[name], gold_tensor)
        if not err <= result.max_error:  # NaN counts as worst
            result.max_error, result.worst = err, name
        try:
            assert_matches_oracle(
                checked_actual[name], checked_base[name], gold_tensor, dtype, name
            )
        except AssertionError as failure:
            result.failures.append(str(failure))
    result.passed = not result.failures
    for name in (k for k in gold if k.startswith(GRAD_PREFIX)):
        err = relative_error(actual[name], gold[name])
        if result.worst_grad_error is None or not err <= result.worst_grad_error:
            result.worst_grad_error, result.worst_grad = err, name[len(GRAD_PREFIX) :]
    return result


class Case:
    """The shared state of one configuration: reference model, input batch, gold and bases.

    The base of a system is the oracle in the working dtype in the system's memory layout
    (eager or eager-cl): PyTorch's own error differs between NCHW and channels_last (several
    times for some gradients on CPU), and the rule asks for no more than 4x PyTorch's error on
    the same input.
    """

    def __init__(self, config: BenchConfig, seed: int = 0):
        self.config, self.seed = config, seed
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            # PyTorch eager's best configuration times cuDNN's convolution algorithms first.
            torch.backends.cudnn.benchmark = True
        self.reference = build_model(config.model, config.depth, seed, config.preset)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(config.input_shape, generator=gen).to(self.device)
        self.y = None
        if config.preset == "classification":
            labels = torch.randint(0, NUM_CLASSES, (config.batch,), generator=gen)
            self.y = labels.to(self.device)
        self._gold: dict[str, Tensor] | None = None
        self._bases: dict[bool, dict[str, Tensor]] = {}

    def runner(self, system: System) -> Runner:
        return Runner(self, system)

    def gold(self) -> dict[str, Tensor]:
        """The oracle's outputs in float64 (NCHW, no autocast), computed once."""
        if self._gold is None:
            model = copy.deepcopy(self.reference).double().to(self.device)
            model.train(self.config.mode == "train")
            if self.device.type == "cuda":
                # Float64 activations of a GPU batch (256 x 224^2) would not fit beside the
                # timed models: recompute each block in backward instead of storing it.
                for m in model.modules():
                    if hasattr(m, "with_cp"):
                        m.with_cp = True
            self._gold = collect_outputs(model, model, self.x.double(), self.y, torch.float64)
            del model
            free_memory()
        return self._gold

    def base(self, channels_last: bool) -> dict[str, Tensor]:
        """The oracle's outputs in the working dtype and the given layout, computed once."""
        if channels_last not in self._bases:
            self._bases[channels_last] = self.runner(EAGER_CL if channels_last else EAGER).outputs()
        return self._bases[channels_last]

    def check(self, runner: Runner) -> CheckResult:
        """Runs `runner` once and checks its outputs against the oracle (docs/contract.md §3)."""
        actual = runner.outputs()
        layout = runner.system.channels_last
        if runner.system in (EAGER, EAGER_CL) and layout not in self._bases:
            self._bases[layout] = actual
        return compare(actual, self.base(layout), self.gold(), self.config.torch_dtype)


# -- memory ---------------------------------------------------------------------------------


def free_memory() -> None:
    """Returns cached memory, so that the next peak measurement starts from a clean slate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # glibc keeps freed heap pages; without trimming, RSS deltas under-report.
    cpu_cache.trim_heap()


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory of one system, as a delta over the memory in use before it was built.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the allocator's cache).
    CPU: the process's peak resident set (VmHWM in /proc/self/status), whose high-water mark
    Linux resets when "5" is written to /proc/self/clear_refs; without that (not Linux, or not
    permitted) the peak is reported as None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS"
        self.baseline = 0
        self.resettable = True

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        kib = _proc_status_kib("VmRSS")
        return 0 if kib is None else kib * 1024

    def begin(self) -> None:
        """Call before the system's model is built."""
        free_memory()
        synchronize(self.device)
        self.baseline = self._current()

    def reset_peak(self) -> None:
        """Call after the correctness check, before the timed iterations."""
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak(self) -> int | None:
        """Bytes above the baseline at the peak since `reset_peak`."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or not self.resettable:
            return None
        return hwm * 1024 - self.baseline


# -- timing and results ---------------------------------------------------------------------


def minor_page_faults() -> int | None:
    """This process's minor page faults so far, all threads (None where they are not counted).

    On CPU they are first touches of memory that the C library had returned to the kernel, and
    they cost: glibc gives large freed blocks back, so a step that allocates fresh activation
    buffers faults every 4 KiB page of them in again (tens of thousands per ResNet-50 step).
    """
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _faults_since(before: int | None) -> int | None:
    return None if before is None else minor_page_faults() - before


class Sample(NamedTuple):
    """One timed step."""

    seconds: float
    page_faults: int | None  # minor page faults of the step's process during it


def time_steps(
    step: Callable[[], None], device: torch.device, iters: int, warmup: int
) -> list[float]:
    """Seconds per call of `step`, each synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


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


@dataclass
class Prepared:
    """A system built, checked and warmed up, with its peak memory measured alone."""

    runner: Runner
    check: CheckResult
    first_call_s: float
    peak_memory_bytes: int | None
    memory_kind: str

    @property
    def system(self) -> System:
        return self.runner.system

    def step_time(self) -> Sample:
        """One synchronised step: its seconds and this process's page faults during it."""
        before = minor_page_faults()
        seconds = time_steps(self.runner.step, self.runner.device, 1, 0)[0]
        return Sample(seconds, _faults_since(before))

    def close(self) -> None:
        pass


def prepare_system(case: Case, system: System, warmup: int) -> Prepared:
    """Builds `system`, checks it once against the oracle, then runs `max(warmup, 1)` untimed
    steps; its peak memory is that of those steps, above the memory in use before it was
    built (so it counts weights, gradients, optimizer state and activations)."""
    meter = MemoryMeter(case.device)
    case.gold()  # before the baseline: the gold model is not part of any system's memory
    meter.begin()
    start = time.perf_counter()
    runner = case.runner(system)
    check = case.check(runner)  # the first call: includes torch.compile's compilation
    first_call_s = time.perf_counter() - start
    meter.reset_peak()
    for _ in range(max(warmup, 1)):
        runner.step()
    peak = meter.peak()
    return Prepared(runner, check, first_call_s, peak, meter.kind)


def _what_ran(case: Case, system: System) -> dict:
    """The fields of a Result that name the case and the system."""
    config = case.config
    return dict(
        group=config.group,
        model=config.label,
        mode=config.mode,
        system=system.name,
        backend=system.backend,
        batch=config.batch,
        image_size=config.image_size,
        image_width=config.input_shape[3],
        preset=config.preset,
        dtype=config.dtype,
        device=str(case.device),
    )


def _result(
    case: Case, prepared: Prepared | Isolated, times: list[float], page_faults: int | None
) -> Result:
    """page_faults: the total over the timed steps, or None where they were not counted."""
    config, system, check = case.config, prepared.system, prepared.check
    median = statistics.median(times)
    return Result(
        **_what_ran(case, system),
        img_per_s=config.batch / median,
        ms_per_iter=median * 1e3,
        times_ms=[t * 1e3 for t in times],
        first_call_s=prepared.first_call_s,
        max_error=check.max_error,
        worst_tensor=check.worst,
        check_passed=check.passed,
        check_failures=check.failures[:5],
        worst_grad_error=check.worst_grad_error,
        worst_grad=check.worst_grad,
        peak_memory_bytes=prepared.peak_memory_bytes,
        memory_kind=prepared.memory_kind,
        page_faults_per_iter=None if page_faults is None else page_faults / len(times),
    )


def _failed_result(case: Case, system: System, error: Exception) -> Result:
    """The result of a system that could not be built, checked or warmed up: no timing, a
    failed check whose failure is the error (its first and last lines)."""
    lines = f"{type(error).__name__}: {error}".splitlines()
    if len(lines) > 5:
        lines = [lines[0], "...", *lines[-3:]]
    nan = float("nan")
    return Result(
        **_what_ran(case, system),
        img_per_s=nan,
        ms_per_iter=nan,
        times_ms=[],
        first_call_s=nan,
        max_error=float("inf"),
        worst_tensor="error",
        check_passed=False,
        check_failures=["\n".join(lines)],
        worst_grad_error=None,
        worst_grad=None,
        peak_memory_bytes=None,
        memory_kind="",
    )


def run_system(
    case: Case, system: System, iters: int, warmup: int, timer: Callable | None = None
) -> Result:
    """Prepares `system` for `case` (build, check, warm up), then times it alone.

    Args:
        timer: replaces `time_steps(step, device, iters, 0)` (pytest-benchmark passes its
            own); it returns the seconds per iteration.
    """
    prepared = prepare_system(case, system, warmup)
    step = prepared.runner.step
    before = minor_page_faults()
    times = time_steps(step, case.device, iters, 0) if timer is None else timer(step)
    result = _result(case, prepared, times, _faults_since(before))
    del prepared, step
    free_memory()
    return result


# More than libgomp's default spin-wait (300,000 pauses, a few ms) before it sleeps.
SPIN_SETTLE_S = 0.05


class Isolated:
    """A system prepared in a process of its own (`_isolated_worker`), stepped on request.

    The same interface as `Prepared`: `system`, `check`, `first_call_s`, `peak_memory_bytes`,
    `memory_kind`, `step_time()`, `close()`.
    """

    def __init__(self, case: Case, system: System, warmup: int):
        self.system = system
        # Spawned, not forked: a fork would inherit this process's heap, threads and CUDA state.
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        layouts = {system.channels_last}
        state = (case.config, case.seed, case.gold(), {k: case.base(k) for k in layouts})
        self._process = ctx.Process(
            target=_isolated_worker,
            args=(child, state, system, warmup, torch.get_num_threads()),
            daemon=True,
        )
        self._process.start()
        child.close()
        try:
            self.check, self.first_call_s, self.peak_memory_bytes, self.memory_kind = (
                self._receive()
            )
        except BaseException:
            self.close()
            raise

    def _receive(self):
        try:
            ok, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the benchmark process of {self.system.name} died "
                f"(exit code {self._process.exitcode})"
            ) from None
        if not ok:
            raise RuntimeError(f"{self.system.name} failed in its benchmark process:\n{payload}")
        return payload

    def step_time(self) -> Sample:
        # The system that stepped last is another process, whose OpenMP threads spin-wait for
        # a few milliseconds after its step (libgomp's default policy) on the cores this step
        # needs: let them go to sleep first.
        time.sleep(SPIN_SETTLE_S)
        self._conn.send("step")
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def _isolated_worker(conn, state, system: System, warmup: int, threads: int) -> None:
    """The body of an `Isolated` system's process: prepare, then one step per "step" message."""
    try:
        torch.set_num_threads(threads)
        config, seed, gold, bases = state
        case = Case(config, seed)
        case._gold, case._bases = gold, bases
        ready = prepare_system(case, system, warmup)
        conn.send((True, (ready.check, ready.first_call_s, ready.peak_memory_bytes,
                          ready.memory_kind)))  # fmt: skip
        while conn.recv() == "step":
            conn.send((True, ready.step_time()))
    except Exception:  # reported to the parent, which raises it
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def isolates(device: torch.device | str) -> bool:
    """Whether `run_group` gives each system a process of its own on `device` (CPU).

    Systems in one process share the C library's heap: which of them takes page faults on
    fresh buffers, and how many, depends on what the others freed before it. In a process of
    its own each system runs as a user's training or inference process does. (CUDA memory
    comes from PyTorch's caching allocator, so GPU systems share a process.)
    """
    return torch.device(device).type == "cpu"


def run_group(
    case: Case,
    systems: Sequence[System],
    iters: int,
    warmup: int,
    on_phase: Callable[[str], None] | None = None,
    isolate: bool | None = None,
) -> list[Result]:
    """Prepares every system of `case`, then times them in turns, one step each per round.

    Taking turns spreads whatever else runs on the machine (other processes on shared CPU
    cores, GPU clock changes) over all systems alike, so the speedups stay fair when the
    absolute figures are noisy. A system whose preparation raises is not timed: its result
    carries the error as a failed check, and the other systems go on.

    Args:
        on_phase: called with a label as each system's preparation, then the timing, starts
            (progress display).
        isolate: each system in a process of its own (default: `isolates(case.device)`).
    """
    report = on_phase or (lambda label: None)
    if isolate is None:
        isolate = isolates(case.device)
    prepared: list[Prepared | Isolated] = []
    failed: dict[str, Result] = {}
    try:
        for system in systems:
            where = " (own process)" if isolate else ""
            report(f"{system.name}: build, check, warmup{where}")
            try:
                if isolate:
                    prepared.append(Isolated(case, system, warmup))
                else:
                    prepared.append(prepare_system(case, system, warmup))
            except Exception as error:
                # One broken system must not cost the figures of the others.
                traceback.print_exc()
                failed[system.name] = _failed_result(case, system, error)
        report(f"timing {len(prepared)} systems in turns, {iters} rounds")
        samples: list[list[Sample]] = [[] for _ in prepared]
        for _ in range(iters):
            for p, p_samples in zip(prepared, samples):
                p_samples.append(p.step_time())
        timed = {p.system.name: _result(case, p, *_totals(s)) for p, s in zip(prepared, samples)}
        return [timed.get(s.name) or failed[s.name] for s in systems]
    finally:
        for p in prepared:
            p.close()
        del prepared
        free_memory()


def _totals(samples: list[Sample]) -> tuple[list[float], int | None]:
    """The seconds of each step, and the page faults of all of them (None if uncounted)."""
    faults = [s.page_faults for s in samples]
    return [s.seconds for s in samples], None if None in faults else sum(faults)


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


class Progress:
    """A small progress bar on stderr: `[####......] 3/12  1m02s  resnet50 train eager-cl`.

    On a terminal it redraws one line; otherwise (logs, CI) it prints one line per step.
    """

    def __init__(self, total: int, width: int = 24, stream=None):
        self.total, self.width = max(total, 1), width
        self.stream = sys.stderr if stream is None else stream
        self.done = 0
        self.start = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, label: str) -> str:
        filled = self.width * self.done // self.total
        elapsed = int(time.perf_counter() - self.start)
        bar = "#" * filled + "." * (self.width - filled)
        return f"[{bar}] {self.done}/{self.total}  {elapsed // 60}m{elapsed % 60:02d}s  {label}"

    def show(self, label: str) -> None:
        """Shows what is running now (without advancing)."""
        if self.tty:
            self.stream.write("\r\033[K" + self._line(label))
        else:
            self.stream.write(self._line(label) + "\n")
        self.stream.flush()

    def advance(self, label: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        if self.tty:
            self.show(label)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self._line("done") + "\n")
        else:
            self.stream.write(self._line("done") + "\n")
        self.stream.flush()
