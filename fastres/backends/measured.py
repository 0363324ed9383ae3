"""What 'auto' runs on a GPU at a site it has no measurement of: the floor.

'auto' times every site where it may tune. Where it may not (torch.compile, torch.distributed,
`FASTRES_TRITON_TUNE=0`, CUDA graph capture) and no choice was made or persisted for the site,
a GPU runs what was measured fastest on a GPU of its class, shipped here with the device, the
date and the command of the measurement. A GPU class nobody measured runs PyTorch's own modules
('torch'), which are never slower than PyTorch. Untuned Triton is never the floor: on the one
GPU measured so far its single tile ran ResNet-50 at 0.34-0.64x of eager channels_last.

A site's *family* says which measurement decides it: 'inference' (units and tails with
BatchNorms on running statistics and no autograd), 'res2net-inference' (a Bottle2neck in eval
mode, a block site) and 'training' (batch statistics, or autograd through frozen BatchNorms).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

UNMEASURED = "torch"


class GpuMeasurement(NamedTuple):
    """The fastest candidate per site family on one GPU, and where that was measured."""

    device: str
    date: str
    command: str
    results: str  # the figures, in the repository
    fastest: dict[str, str]  # site family -> candidate name


# CUDA compute capability -> the measurement of a GPU of that class.
MEASURED: dict[tuple[int, int], GpuMeasurement] = {
    (9, 0): GpuMeasurement(
        device="NVIDIA H200",
        date="2026-12-04",
        command=(
            "GPU_CHECK_BUDGET=380 bash scripts/gpu_check.sh (call 1): python -m fastres bench "
            "--device cuda --batch 256 --image-size 224 --dtype bf16 --iters 10 --warmup 3 "
            "--no-compile --backend native --backend triton, ResNet-50 and Res2Net-50"
        ),
        results="bench/results/h200-cli-b256-bf16-{resnet50,res2net50}-call1.json",
        # img/s over eager channels_last ('torch' on a channels_last model): ResNet-50
        # inference native 0.80x, triton 0.64x; training native 0.62x, triton 0.34x;
        # Res2Net-50 inference native 1.34x, triton 0.81x; training native 0.67x, triton 0.37x.
        fastest={"inference": "torch", "res2net-inference": "native", "training": "torch"},
    ),
}


def device_class(device: torch.device) -> tuple[int, int] | None:
    """The key of `MEASURED` for a CUDA device (its compute capability); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def floor(device: torch.device, family: str) -> str | None:
    """The candidate a site of `family` runs on `device` without a measurement of its own.

    Returns None off a GPU (the candidate tables' order decides there: what the CPU runs is
    measured on every machine's first run).
    """
    key = device_class(device)
    if key is None:
        return None
    measurement = MEASURED.get(key)
    if measurement is None:
        return UNMEASURED
    return measurement.fastest.get(family, UNMEASURED)
