"""fastres: ResNet and Res2Net backbones for PyTorch whose hot paths run in fused kernels.

Example:
    >>> import fastres
    >>> backbone = fastres.ResNet(depth=50)  # forward(x) -> tuple of stage features
    >>> classifier = fastres.ResNet(depth=50, num_classes=1000)  # forward(x) -> logits
    >>> res2net = fastres.Res2Net(depth=50, scales=4, base_width=26)
"""

from . import cpu_cache
from .backends import BackendStatus, available_backends
from .checkpoint import CheckpointError, LoadReport, load_checkpoint
from .models import Res2Net, ResNet, ResNetV1c, ResNetV1d

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "CheckpointError",
    "LoadReport",
    "Res2Net",
    "ResNet",
    "ResNetV1c",
    "ResNetV1d",
    "available_backends",
    "cpu_cache",
    "load_checkpoint",
]
