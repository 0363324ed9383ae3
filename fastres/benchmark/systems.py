"""What a benchmark compares and with which settings: the systems (PyTorch's peers and the
fastres backends that can run on a device) and the one table of per-device defaults that
`python -m fastres` and `bench/conftest.py` both read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends

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
# The CPU times the median of 3 after 1 untimed step, the GPU of 20 after 5. torch.compile is a
# peer in the modes of compile_modes: on CPU inference only, as compiling the training step
# takes about 2 min on 2 cores, it runs slower than eager, and no CPU training target is set
# against it.
DEVICE_DEFAULTS = {
    "classification": {
        "cpu": {
            "batch": 8, "image_size": (128, 128), "dtype": "fp32", "iters": 3, "warmup": 1,
            "compile_modes": ("infer",),
        },
        "cuda": {
            "batch": 256, "image_size": (224, 224), "dtype": "bf16", "iters": 20, "warmup": 5,
            "compile_modes": ("infer", "train"),
        },
    },
    "detection": {
        "cpu": {
            "batch": 2, "image_size": (400, 667), "dtype": "fp32", "iters": 3, "warmup": 1,
            "compile_modes": ("infer",),
        },
        "cuda": {
            "batch": 2, "image_size": (800, 1333), "dtype": "bf16", "iters": 20, "warmup": 5,
            "compile_modes": ("infer", "train"),
        },
    },
}  # fmt: skip

# The entries of DEVICE_DEFAULTS that are settings of a run, each one a command-line option of
# `python -m fastres` and of `pytest bench/` (there named --bench-rounds for iters); the one list
# of them.
SETTING_KEYS = ("batch", "image_size", "dtype", "iters", "warmup")


def device_defaults(preset: str, device: str) -> dict:
    """DEVICE_DEFAULTS of `preset` on `device` ('cpu', 'cuda', 'cuda:1', ...)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return DEVICE_DEFAULTS[preset]["cuda" if device.startswith("cuda") else "cpu"]


def describe_default(key: str) -> str:
    """DEVICE_DEFAULTS' `key` as help texts state it: 'classification CPU 8, CUDA 256;
    detection 2' (a preset whose devices agree names one value; presets that all agree go
    unnamed)."""

    def text(value) -> str:
        if key == "image_size":
            height, width = value
            return f"{height}" if height == width else f"{height}x{width}"
        return str(value)

    per_preset = {}
    for preset, devices in DEVICE_DEFAULTS.items():
        cpu, cuda = text(devices["cpu"][key]), text(devices["cuda"][key])
        per_preset[preset] = cpu if cpu == cuda else f"CPU {cpu}, CUDA {cuda}"
    if len(set(per_preset.values())) == 1:
        return per_preset[PRESETS[0]]
    return "; ".join(f"{preset} {value}" for preset, value in per_preset.items())


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
