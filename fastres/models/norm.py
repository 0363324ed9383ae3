"""Normalization layers from an OpenMMLab-style `norm_cfg`, named as OpenMMLab names them."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.batchnorm import sync_group_name

# norm type -> (module class, name abbreviation used in module names: bn1, gn1, ...)
NORM_TYPES = {
    "BN": (nn.BatchNorm2d, "bn"),
    "BN2d": (nn.BatchNorm2d, "bn"),
    "SyncBN": (nn.SyncBatchNorm, "bn"),
    "GN": (nn.GroupNorm, "gn"),
}
_ALLOWED_KEYS = {"type", "requires_grad", "eps", "momentum", "num_groups"}


def check_norm_cfg(norm_cfg: dict) -> None:
    """Raises KeyError / ValueError when `norm_cfg` is not one this library builds."""
    if not isinstance(norm_cfg, dict) or "type" not in norm_cfg:
        raise KeyError(f"norm_cfg must be a dict with a 'type' key, got {norm_cfg!r}")
    if norm_cfg["type"] not in NORM_TYPES:
        raise KeyError(
            f"norm_cfg type {norm_cfg['type']!r} is not supported: expected one of "
            f"{', '.join(NORM_TYPES)}"
        )
    unknown = set(norm_cfg) - _ALLOWED_KEYS
    if unknown:
        raise KeyError(
            f"norm_cfg has unknown keys {sorted(unknown)}: allowed are {sorted(_ALLOWED_KEYS)}"
        )
    if norm_cfg["type"] == "GN" and "num_groups" not in norm_cfg:
        raise KeyError("norm_cfg type 'GN' needs num_groups")


def norm_name(norm_cfg: dict, postfix: int | str = "") -> str:
    """The module name OpenMMLab gives this norm: 'bn1', 'gn3', ..."""
    return f"{NORM_TYPES[norm_cfg['type']][1]}{postfix}"


def build_norm_layer(norm_cfg: dict, num_features: int) -> nn.Module:
    """Builds the normalization layer of `norm_cfg` over `num_features` channels.

    `requires_grad=False` freezes the affine parameters; `eps` and `momentum` are passed on.
    """
    layer_type = NORM_TYPES[norm_cfg["type"]][0]
    kwargs = {k: norm_cfg[k] for k in ("eps", "momentum") if k in norm_cfg}
    if layer_type is nn.GroupNorm:
        kwargs.pop("momentum", None)
        if num_features % norm_cfg["num_groups"]:
            raise ValueError(
                f"GN num_groups={norm_cfg['num_groups']} does not divide {num_features} channels"
            )
        layer = nn.GroupNorm(norm_cfg["num_groups"], num_features, **kwargs)
    else:
        layer = layer_type(num_features, **kwargs)
    for param in layer.parameters():
        param.requires_grad = norm_cfg.get("requires_grad", True)
    return layer


def check_cpu_sync_bn(model: nn.Module) -> None:
    """Raises RuntimeError, saying what to do instead, where a SyncBatchNorm of `model` would
    synchronize over several processes through torch's own SyncBatchNorm on CPU, which refuses
    ("expected input tensor to be on GPU") without saying so. Call it where the oracle runs a
    CPU input.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return  # nothing synchronizes: no walk over the modules on every forward
    if any(sync_group_name(m) for m in model.modules()):
        raise RuntimeError(
            "SyncBatchNorm would synchronize this CPU batch with other processes on the 'torch' "
            "backend, but torch's SyncBatchNorm runs only on GPU, and DistributedDataParallel "
            "refuses SyncBatchNorm in a CPU module whatever the backend. To train on CPU under "
            "DistributedDataParallel, build the model with norm_cfg=dict(type='BN') or convert "
            "it with mmengine.model.revert_sync_batchnorm(model) (each process normalizes with "
            "its own batch statistics). Backend 'native' (or 'auto' with the extension built) "
            "synchronizes SyncBatchNorm on CPU, but only without DistributedDataParallel: "
            "all-reduce the gradients yourself"
        )
