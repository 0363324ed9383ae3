"""ResNet backbones with the module tree and checkpoint keys of OpenMMLab (and torchvision).

Each block keeps plain nn.Conv2d / nn.BatchNorm2d submodules; its `forward_reference` is the
pure-PyTorch oracle. `forward` hands the block to the backend the model was built with (see
`fastres.backends`), which may fuse the same computation into fewer kernels.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils import checkpoint as torch_checkpoint

from .. import backends
from ..backends import fold_cache
from ..backends.plan import (
    KEPT_PLAN,
    REFERENCE,
    BlockPlan,
    Unit,
    kept_plan,
    run_block,
    run_units,
    shortcut_of,
    structure_changed,
)
from .norm import build_norm_layer, check_cpu_sync_bn, check_norm_cfg, norm_name

DEFAULT_NORM_CFG = {"type": "BN", "requires_grad": True}
STYLES = ("pytorch", "caffe")
# Whose module tree (and so state_dict keys and parameter order) a model reproduces.
MODULE_TREES = ("mmdet", "mmpretrain")


def _without_kept_state(state: dict) -> dict:
    """A module's pickled / copied state without what it keeps for this process's forwards
    (its plan, its bound backend): a copy builds and binds its own."""
    state.pop(KEPT_PLAN, None)
    state.pop(backends.BOUND, None)
    return state


@contextlib.contextmanager
def _preserved_batchnorm_state(module: nn.Module):
    """Keeps a recomputation (gradient checkpointing) from updating running statistics twice."""
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


class ConvNormReLU(nn.Module):
    """conv -> norm -> ReLU under the names of mmcv's ConvModule (`conv`, `bn` / `gn`,
    `activate`): a unit of mmpretrain's deep stem."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, norm_cfg: dict):
        super().__init__()
        self.conv = conv
        self.norm_name = norm_name(norm_cfg)
        self.add_module(self.norm_name, norm)
        self.activate = nn.ReLU(inplace=True)

    @property
    def norm(self) -> nn.Module:
        return getattr(self, self.norm_name)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """What every residual block shares: backend dispatch and gradient checkpointing.

    `plan()` declares how the block's units connect (built by `build_plan`, kept until the
    module structure changes: `fastres.backends.plan`); the backends run that plan and import
    no model class.
    """

    expansion = 1

    def __init__(self, with_cp: bool = False):
        super().__init__()
        self.with_cp = with_cp
        self.backend = "auto"

    def forward(self, x: Tensor) -> Tensor:
        backend = backends.bound(self, x.device)
        if self.with_cp and x.requires_grad:
            return torch_checkpoint.checkpoint(
                backend.run_block,
                self,
                x,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), _preserved_batchnorm_state(self)),
            )
        return backend.run_block(self, x)

    def plan(self) -> BlockPlan:
        """How the block's units connect (`fastres.backends.plan`)."""
        return kept_plan(self, self.build_plan)

    def build_plan(self) -> BlockPlan:
        """`plan()`, built from the block's current submodules."""
        raise NotImplementedError

    def __delattr__(self, name: str) -> None:
        structure_changed()  # the plan may hold the submodule deleted
        super().__delattr__(name)

    def __getstate__(self) -> dict:
        return _without_kept_state(super().__getstate__())

    def forward_reference(self, x: Tensor) -> Tensor:
        """The oracle: the plan run with PyTorch's modules."""
        return run_block(REFERENCE, self.plan(), x)

    @property
    def last_norm(self) -> nn.Module:
        """The norm before the residual add (zero-initialised by zero_init_residual)."""
        raise NotImplementedError


class BasicBlock(ResBlock):
    """conv3x3(stride, dilation) -> norm -> ReLU -> conv3x3 -> norm -> + shortcut -> ReLU."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        style: str = "pytorch",
        with_cp: bool = False,
        norm_cfg: dict | None = None,
    ):
        super().__init__(with_cp)
        norm_cfg = norm_cfg or DEFAULT_NORM_CFG
        self.norm1_name, self.norm2_name = norm_name(norm_cfg, 1), norm_name(norm_cfg, 2)
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False
        )
        self.add_module(self.norm1_name, build_norm_layer(norm_cfg, planes))
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.add_module(self.norm2_name, build_norm_layer(norm_cfg, planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm2

    def build_plan(self) -> BlockPlan:
        units = (Unit(self.conv1, self.norm1), Unit(self.conv2, self.norm2))
        return BlockPlan(units, shortcut_of(self.downsample))


class Bottleneck(ResBlock):
    """conv1x1 -> norm -> ReLU -> conv3x3 -> norm -> ReLU -> conv1x1 -> norm -> + shortcut -> ReLU.

    style 'pytorch' puts the stride on the 3x3 conv, 'caffe' on the first 1x1 conv.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        style: str = "pytorch",
        with_cp: bool = False,
        norm_cfg: dict | None = None,
    ):
        super().__init__(with_cp)
        norm_cfg = norm_cfg or DEFAULT_NORM_CFG
        self.inplanes, self.planes = inplanes, planes
        self.stride, self.dilation, self.style = stride, dilation, style
        self.conv1_stride, self.conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.norm1_name, self.norm2_name, self.norm3_name = (
            norm_name(norm_cfg, i) for i in (1, 2, 3)
        )
        self.conv1 = nn.Conv2d(inplanes, planes, 1, self.conv1_stride, bias=False)
        self.add_module(self.norm1_name, build_norm_layer(norm_cfg, planes))
        self.conv2 = nn.Conv2d(
            planes, planes, 3, self.conv2_stride, padding=dilation, dilation=dilation, bias=False
        )
        self.add_module(self.norm2_name, build_norm_layer(norm_cfg, planes))
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.add_module(self.norm3_name, build_norm_layer(norm_cfg, planes * self.expansion))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    @property
    def norm3(self) -> nn.Module:
        return getattr(self, self.norm3_name)

    @property
    def last_norm(self) -> nn.Module:
        return self.norm3

    def build_plan(self) -> BlockPlan:
        units = (
            Unit(self.conv1, self.norm1),
            Unit(self.conv2, self.norm2),
            Unit(self.conv3, self.norm3),
        )
        return BlockPlan(units, shortcut_of(self.downsample))


def _check_tuple(name: str, value: Sequence[int], length: int) -> tuple[int, ...]:
    if isinstance(value, int) or len(value) != length:
        raise ValueError(
            f"{name} must have one entry per stage (num_stages={length}), got {value!r}"
        )
    value = tuple(value)
    if any(not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{name} entries must be positive ints, got {value!r}")
    return value


class ResNet(nn.Module):
    """ResNet backbone (OpenMMLab defaults), or classifier when `num_classes` is given.

    Args: see the table in docs/contract.md §1. `module_tree` names whose module tree, and so
    whose state_dict keys and parameter order, the model has: 'mmdet' (the default; torchvision's
    too for a plain stem) or 'mmpretrain', whose deep stem is three ConvModules
    (`stem.{0,1,2}.conv` / `.bn`) instead of `stem.{0,1,3,4,6,7}`, and whose ResNet avg_down
    shortcuts leave out the pool where the stride is 1 (`downsample.{0,1}` there, not `.{1,2}`).
    The computation is the same in both. forward(x: [N, in_channels, H, W]) returns the stage
    outputs selected by `out_indices`, in stage order whatever the order of `out_indices` (as
    OpenMMLab), [N, C_i, H / s_i, W / s_i] each, or logits [N, num_classes] for a classifier.
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        stem_channels: int | None = None,
        base_channels: int = 64,
        num_stages: int = 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        deep_stem: bool = False,
        avg_down: bool = False,
        frozen_stages: int = -1,
        conv_cfg: dict | None = None,
        norm_cfg: dict | None = None,
        norm_eval: bool = True,
        dcn: dict | None = None,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        plugins: list | None = None,
        with_cp: bool = False,
        zero_init_residual: bool = True,
        num_classes: int | None = None,
        pretrained: str | None = None,
        init_cfg: dict | None = None,
        backend: str = "auto",
        module_tree: str = "mmdet",
    ):
        super().__init__()
        if depth not in self.arch_settings:
            raise ValueError(
                f"invalid depth {depth!r} for {type(self).__name__}: expected one of "
                f"{sorted(self.arch_settings)}"
            )
        for name, value in (("dcn", dcn), ("plugins", plugins), ("conv_cfg", conv_cfg)):
            if value is not None:
                raise NotImplementedError(f"{name}={value!r} is not supported (only None)")
        if any(stage_with_dcn):
            raise NotImplementedError(
                f"stage_with_dcn={stage_with_dcn!r} is not supported (only all False)"
            )
        if not isinstance(num_stages, int) or not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be an int in 1..4, got {num_stages!r}")
        strides = _check_tuple("strides", strides, num_stages)
        dilations = _check_tuple("dilations", dilations, num_stages)
        out_indices = tuple(out_indices)
        if any(not isinstance(i, int) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(
                f"out_indices must be stage indices in 0..{num_stages - 1} "
                f"(num_stages={num_stages}), got {out_indices!r}"
            )
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if module_tree not in MODULE_TREES:
            raise ValueError(f"module_tree must be one of {MODULE_TREES}, got {module_tree!r}")
        if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= num_stages:
            raise ValueError(
                f"frozen_stages must be an int in -1..num_stages ({num_stages}), "
                f"got {frozen_stages!r}"
            )
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        norm_cfg = copy.deepcopy(DEFAULT_NORM_CFG if norm_cfg is None else norm_cfg)
        check_norm_cfg(norm_cfg)
        checkpoint = _pretrained_checkpoint(pretrained, init_cfg)
        requested = backends.requested_backend(backend)

        self.depth = depth
        self.in_channels = in_channels
        self.stem_channels = base_channels if stem_channels is None else stem_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides, self.dilations = strides, dilations
        self.out_indices = out_indices
        self.style = style
        self.deep_stem, self.avg_down = deep_stem, avg_down
        self.module_tree = module_tree
        self.frozen_stages = frozen_stages
        self.norm_cfg = norm_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self.num_classes = num_classes
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]

        self._make_stem()
        self.inplanes = self.stem_channels
        self.res_layers = []
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2**i
            layer = self.make_stage(self.inplanes, planes, num_blocks, strides[i], dilations[i])
            self.inplanes = planes * self.block.expansion
            self.add_module(f"layer{i + 1}", layer)
            self.res_layers.append(f"layer{i + 1}")
        self.feat_dim = self.inplanes
        # Stage order, whatever the order of out_indices, as OpenMMLab returns the stages.
        self.out_channels = tuple(
            base_channels * 2**i * self.block.expansion
            for i in range(num_stages)
            if i in self.out_indices
        )
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(self.feat_dim, num_classes)

        self._pretrained = checkpoint
        self.set_backend(requested)
        self.init_weights()
        self._freeze_stages()

    # -- construction ------------------------------------------------------------------------

    def _make_stem(self) -> None:
        if self.deep_stem:
            half = self.stem_channels // 2
            units = [
                (
                    nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False),
                    build_norm_layer(self.norm_cfg, cout),
                )
                for cin, cout, stride in (
                    (self.in_channels, half, 2),
                    (half, half, 1),
                    (half, self.stem_channels, 1),
                )
            ]
            if self.module_tree == "mmpretrain":
                self.stem = nn.Sequential(
                    *(ConvNormReLU(conv, norm, self.norm_cfg) for conv, norm in units)
                )
            else:
                self.stem = nn.Sequential(
                    *(m for conv, norm in units for m in (conv, norm, nn.ReLU(inplace=True)))
                )
        else:
            self.conv1 = nn.Conv2d(self.in_channels, self.stem_channels, 7, 2, 3, bias=False)
            self.norm1_name = norm_name(self.norm_cfg, 1)
            self.add_module(self.norm1_name, build_norm_layer(self.norm_cfg, self.stem_channels))
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @property
    def pools_at_stride_1(self) -> bool:
        """Whether an avg_down shortcut at stride 1 keeps its (identity) pool: mmdet's do,
        mmpretrain's ResNet leaves it out."""
        return self.module_tree == "mmdet"

    def make_downsample(self, inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
        """The shortcut of a stage's first block, or None where it is the identity."""
        if stride == 1 and inplanes == outplanes:
            return None
        layers: list[nn.Module] = []
        conv_stride = stride
        if self.avg_down and (stride != 1 or self.pools_at_stride_1):
            conv_stride = 1
            layers.append(nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        layers += [
            nn.Conv2d(inplanes, outplanes, 1, conv_stride, bias=False),
            build_norm_layer(self.norm_cfg, outplanes),
        ]
        return nn.Sequential(*layers)

    def block_kwargs(self, index: int) -> dict:
        """Extra constructor arguments of the block at `index` within its stage."""
        return {}

    def make_stage(
        self, inplanes: int, planes: int, num_blocks: int, stride: int, dilation: int
    ) -> nn.Sequential:
        """One stage: the first block carries the stride and the shortcut."""
        outplanes = planes * self.block.expansion
        common = dict(
            dilation=dilation, style=self.style, with_cp=self.with_cp, norm_cfg=self.norm_cfg
        )
        blocks = [
            self.block(
                inplanes,
                planes,
                stride=stride,
                downsample=self.make_downsample(inplanes, outplanes, stride),
                **common,
                **self.block_kwargs(0),
            )
        ]
        blocks += [
            self.block(outplanes, planes, **common, **self.block_kwargs(i))
            for i in range(1, num_blocks)
        ]
        return nn.Sequential(*blocks)

    def init_weights(self) -> None:
        """Initialises every weight as construction did, then loads the checkpoint of
        `pretrained` / a Pretrained `init_cfg` again.

        Construction calls it; so does OpenMMLab's runner, on the whole model after building
        it, and after a parent's own init_cfg (which may re-initialise every Conv2d), so that
        the backbone's pretrained weights have the last word, as OpenMMLab's backbones do.
        """
        self._default_init()
        if self._pretrained is not None:
            from ..checkpoint import load_checkpoint

            load_checkpoint(self, **self._pretrained)

    def _default_init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResBlock):
                    nn.init.zeros_(m.last_norm.weight)
                    nn.init.zeros_(m.last_norm.bias)

    # -- train / eval ------------------------------------------------------------------------

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        # As OpenMMLab: the plain stem's conv keeps its training flag (it has no mode).
        frozen = [self.stem] if self.deep_stem else [self.norm1]
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for m in frozen:
            m.eval()
        for m in frozen + ([] if self.deep_stem else [self.conv1]):
            for param in m.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> ResNet:
        """nn.Module.train, then re-freeze frozen stages, then norm_eval keeps BN in eval."""
        if mode != self.training:
            # What training wrote without a version bump (a hand-written `p.data -= ...`
            # step) is seen by the folds of the eval forwards that follow.
            fold_cache.invalidate()
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- backend -----------------------------------------------------------------------------

    def set_backend(self, name: str) -> ResNet:
        """Runs the model with backend `name` from now on ('auto', 'torch', 'native', 'triton').

        Raises:
            ValueError: `name` is no backend.
            RuntimeError: the backend was named explicitly and cannot run on this machine.
        """
        self.backend = backends.requested_backend(name)
        for m in self.modules():
            if isinstance(m, ResBlock):
                m.backend = self.backend
        return self

    # -- folded weights ----------------------------------------------------------------------

    def refresh(self) -> ResNet:
        """Drops the folded weights the fused backends keep for this model, and builds its
        plans again at the next forward.

        Needed only after a write that bypasses PyTorch's version counters (`p.data.add_(...)`,
        `p.data = t`) with no optimizer step and no train() / eval() switch since, or after a
        submodule was deleted from inside a container of a block; every other change is seen
        (`fastres.backends.fold_cache`, `fastres.backends.plan`).
        """
        fold_cache.refresh(self.modules())
        structure_changed()
        return self

    def _apply(self, fn, recurse: bool = True):
        # .to() / dtype / device changes replace the tensors: a new one may take a freed
        # one's storage and keep the Parameter's version.
        fold_cache.invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        fold_cache.invalidate()  # load_state_dict(assign=True) replaces the tensors
        super()._load_from_state_dict(*args, **kwargs)

    # -- forward -----------------------------------------------------------------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor [N, {self.in_channels}, H, W], got {type(x)}")
        if x.dim() != 4:
            raise ValueError(
                f"expected a 4-D tensor [N, {self.in_channels}, H, W], got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels (in_channels), got {x.shape[1]} "
                f"in shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"expected a floating-point input (float32, float16, bfloat16 or float64), "
                f"got {x.dtype}"
            )
        weight = next(self.parameters())
        if x.device != weight.device:
            raise RuntimeError(
                f"input is on {x.device} but the model's weights are on {weight.device}: "
                f"move one of them (x.to({str(weight.device)!r}) or model.to({str(x.device)!r}))"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} differs from the weights' {weight.dtype}: convert the "
                f"model (model.to({x.dtype})) or run under torch.autocast"
            )

    def stem_units(self) -> tuple[Unit, ...]:
        """The stem's conv -> norm -> ReLU units, before its max-pool (kept as a block keeps
        its plan)."""
        return kept_plan(self, self._build_stem_units)

    def _build_stem_units(self) -> tuple[Unit, ...]:
        if self.deep_stem and self.module_tree == "mmpretrain":
            return tuple(Unit(m.conv, m.norm) for m in self.stem)
        if self.deep_stem:
            return tuple(Unit(self.stem[i], self.stem[i + 1]) for i in (0, 3, 6))
        return (Unit(self.conv1, self.norm1),)

    def __getstate__(self) -> dict:
        return _without_kept_state(super().__getstate__())

    def stem_reference(self, x: Tensor) -> Tensor:
        """The oracle stem: conv(s) + norm + ReLU, then the 3x3/2 max-pool."""
        return self.maxpool(run_units(REFERENCE, self.stem_units(), x))

    def forward(self, x: Tensor) -> tuple[Tensor, ...] | Tensor:
        self._check_input(x)
        backend = backends.bound(self, x.device)
        if backend is backends.ORACLE and x.device.type == "cpu":
            check_cpu_sync_bn(self)
        x = backend.run_stem(self, x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        if self.num_classes is not None:
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return tuple(outs)


# The keys of mmengine's Pretrained init_cfg (map_location does not matter: values are copied
# into the model's own tensors).
_PRETRAINED_KEYS = {"type", "checkpoint", "prefix", "map_location"}


def _pretrained_checkpoint(pretrained: str | None, init_cfg: dict | None) -> dict | None:
    """What to load after construction, from `pretrained` or a Pretrained init_cfg: the
    arguments of load_checkpoint (path, prefix), or None."""
    if pretrained is not None and init_cfg is not None:
        raise ValueError("give either pretrained or init_cfg, not both")
    if pretrained is not None:
        if not isinstance(pretrained, str):
            raise TypeError(f"pretrained must be a checkpoint path (str), got {type(pretrained)}")
        return dict(path_or_state_dict=pretrained)
    if init_cfg is None:
        return None
    if not isinstance(init_cfg, dict) or init_cfg.get("type") != "Pretrained":
        raise ValueError(
            f"init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), got {init_cfg!r}"
        )
    if "checkpoint" not in init_cfg:
        raise ValueError("init_cfg of type 'Pretrained' needs a 'checkpoint' path")
    unknown = set(init_cfg) - _PRETRAINED_KEYS
    if unknown:
        raise ValueError(
            f"init_cfg has unknown keys {sorted(unknown)}: allowed are {sorted(_PRETRAINED_KEYS)}"
        )
    return dict(path_or_state_dict=init_cfg["checkpoint"], prefix=init_cfg.get("prefix"))


class ResNetV1c(ResNet):
    """ResNet with the deep stem (three 3x3 convs): ResNet(deep_stem=True)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, **kwargs)


class ResNetV1d(ResNet):
    """ResNet with deep stem and average-pool shortcuts: ResNet(deep_stem=True, avg_down=True)."""

    def __init__(self, **kwargs):
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
