"""The model zoo: ResNet (V1b / V1c / V1d) and Res2Net, with their blocks."""

from .res2net import Bottle2neck, Res2Net
from .resnet import BasicBlock, Bottleneck, ResBlock, ResNet, ResNetV1c, ResNetV1d

__all__ = [
    "BasicBlock",
    "Bottle2neck",
    "Bottleneck",
    "Res2Net",
    "ResBlock",
    "ResNet",
    "ResNetV1c",
    "ResNetV1d",
]
