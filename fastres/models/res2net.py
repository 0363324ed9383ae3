"""Res2Net: ResNet with the Bottle2neck block (hierarchical split-conv-concat)."""

from __future__ import annotations

import math
import weakref

from torch import nn

from ..backends.plan import BlockPlan, Unit, shortcut_of
from .norm import build_norm_layer
from .resnet import Bottleneck, ResNet

STAGE_TYPES = ("normal", "stage")
POOL_LAST_CHUNK = ("strided", "always")


class Bottle2neck(Bottleneck):
    """Bottleneck whose 3x3 conv becomes `scales - 1` convs over channel chunks.

    conv1 -> norm1 -> ReLU gives `scales` chunks of `width` channels. Chunk 0 goes through
    convs.0; chunk i >= 1 through convs.i, added first to the previous conv's output in a
    'normal' block. The outputs and the last chunk (pooled per `pool_last_chunk` in a 'stage'
    block) are concatenated and go through conv3 -> norm3 -> + shortcut -> ReLU.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        scales: int = 4,
        base_width: int = 26,
        base_channels: int = 64,
        stage_type: str = "normal",
        pool_last_chunk: str = "strided",
        **kwargs,
    ):
        super().__init__(inplanes, planes, **kwargs)
        norm_cfg = kwargs.get("norm_cfg") or {"type": "BN"}
        self.scales, self.stage_type = scales, stage_type
        self.width = width = math.floor(planes * base_width / base_channels)
        # Replace the Bottleneck's convolutions and norms by the Res2Net ones in OpenMMLab's
        # registration order (conv1, norm1, conv3, norm3, relu, downsample, pool, convs, bns):
        # reassigning a submodule keeps its place, so the state_dict and the parameter order
        # (which an optimizer state saved by OpenMMLab relies on) match theirs.
        del self.conv2
        delattr(self, self.norm2_name)
        self.conv1 = nn.Conv2d(inplanes, width * scales, 1, self.conv1_stride, bias=False)
        self.add_module(self.norm1_name, build_norm_layer(norm_cfg, width * scales))
        self.conv3 = nn.Conv2d(width * scales, planes * self.expansion, 1, bias=False)
        self.add_module(self.norm3_name, build_norm_layer(norm_cfg, planes * self.expansion))
        self.pools_last_chunk = stage_type == "stage" and (
            pool_last_chunk == "always" or self.conv2_stride != 1
        )
        if self.pools_last_chunk:
            self.pool = nn.AvgPool2d(kernel_size=3, stride=self.conv2_stride, padding=1)
        self.convs = nn.ModuleList(
            nn.Conv2d(
                width,
                width,
                3,
                self.conv2_stride,
                padding=self.dilation,
                dilation=self.dilation,
                bias=False,
            )
            for _ in range(scales - 1)
        )
        self.bns = nn.ModuleList(build_norm_layer(norm_cfg, width) for _ in range(scales - 1))

    def build_plan(self) -> BlockPlan:
        units = (Unit(self.conv1, self.norm1), Unit(self.conv3, self.norm3))
        return BlockPlan(units, shortcut_of(self.downsample), res2net_ref=weakref.ref(self))


class Res2Net(ResNet):
    """Res2Net backbone: every ResNet argument, plus `scales`, `base_width`, `pool_last_chunk`.

    Defaults follow OpenMMLab: deep stem and average-pool shortcuts. `pool_last_chunk` is
    'strided' (pool the last chunk only in a strided 'stage' block, as OpenMMLab detection) or
    'always' (in every 'stage' block, as the original code, timm and mmpretrain). With
    module_tree='mmpretrain' only the deep stem differs: mmpretrain's Res2Net keeps the
    avg_down pool at stride 1.
    """

    arch_settings = {
        50: (Bottle2neck, (3, 4, 6, 3)),
        101: (Bottle2neck, (3, 4, 23, 3)),
        152: (Bottle2neck, (3, 8, 36, 3)),
    }

    def __init__(
        self,
        depth: int,
        scales: int = 4,
        base_width: int = 26,
        pool_last_chunk: str = "strided",
        deep_stem: bool = True,
        avg_down: bool = True,
        **kwargs,
    ):
        if not isinstance(scales, int) or scales < 2:
            raise ValueError(f"scales must be an int >= 2, got {scales!r}")
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"base_width must be a positive int, got {base_width!r}")
        if pool_last_chunk not in POOL_LAST_CHUNK:
            raise ValueError(
                f"pool_last_chunk must be one of {POOL_LAST_CHUNK}, got {pool_last_chunk!r}"
            )
        self.scales, self.base_width, self.pool_last_chunk = scales, base_width, pool_last_chunk
        super().__init__(depth, deep_stem=deep_stem, avg_down=avg_down, **kwargs)

    @property
    def pools_at_stride_1(self) -> bool:
        # mmpretrain's Res2Layer, unlike its ResLayer, keeps the pool at stride 1, as mmdet.
        return True

    def block_kwargs(self, index: int) -> dict:
        return dict(
            scales=self.scales,
            base_width=self.base_width,
            base_channels=self.base_channels,
            stage_type="stage" if index == 0 else "normal",
            pool_last_chunk=self.pool_last_chunk,
        )
