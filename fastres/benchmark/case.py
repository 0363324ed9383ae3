"""A case: one whole-model configuration (`BenchConfig`), the randomised oracle model and the
input batch that every system of it starts from, a `Runner` per system, and the float64 gold
and working-dtype bases its systems are checked against."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import Res2Net, ResNet
from ..testing import randomize_norms
from .check import CheckResult, autocast_context, collect_outputs, compare, training_loss
from .memory import free_memory
from .systems import EAGER, EAGER_CL, PRESETS, System

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {"resnet": ResNet, "res2net": Res2Net}
MODES = ("infer", "train")

NUM_CLASSES = 1000
LEARNING_RATE = 1e-3
MOMENTUM = 0.9


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

    def collect_outputs(self) -> dict[str, Tensor]:
        """Runs the system once and returns the tensors the correctness check compares, on CPU.

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
            self._bases[channels_last] = self.runner(
                EAGER_CL if channels_last else EAGER
            ).collect_outputs()
        return self._bases[channels_last]

    def check(self, runner: Runner) -> CheckResult:
        """Runs `runner` once and checks its outputs against the oracle (docs/contract.md §3)."""
        actual = runner.collect_outputs()
        layout = runner.system.channels_last
        if runner.system in (EAGER, EAGER_CL) and layout not in self._bases:
            self._bases[layout] = actual
        return compare(actual, self.base(layout), self.gold(), self.config.torch_dtype)
