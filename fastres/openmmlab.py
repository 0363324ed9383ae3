"""OpenMMLab registry plugin: fastres' backbones as `type='fastres.ResNet'` in a config.

In an mmdet / mmpretrain config::

    custom_imports = dict(imports=['fastres.openmmlab'], allow_failed_imports=False)
    model = dict(..., backbone=dict(type='fastres.ResNet', depth=50, ...))

and likewise 'fastres.ResNetV1c', 'fastres.ResNetV1d', 'fastres.Res2Net'. Importing this module
registers them in a registry of scope 'fastres' under mmengine's root MODELS registry, which
mmdet's and mmpretrain's MODELS registries search for a type that starts with 'fastres.'.

The arguments a config leaves out take the defaults of the library whose scope is running
(mmengine's DefaultScope, which every mmdet / mmpretrain config sets with `default_scope`): under
mmpretrain out_indices=(3,) and norm_eval=False, mmpretrain's module tree
(module_tree='mmpretrain': its state_dict keys, so that checkpoints go both ways between fastres
and mmpretrain's own backbones), and Res2Net pools the last chunk of every stage block
(pool_last_chunk='always'); elsewhere fastres' own, which are mmdet's. So changing the type
alone gives the model the config gave before.

Needs mmengine; `import fastres` never imports this module.
"""

from __future__ import annotations

from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import DefaultScope, Registry

from .models import Res2Net, ResNet, ResNetV1c, ResNetV1d

SCOPE = "fastres"

# Where mmpretrain's defaults differ from fastres' (= mmdet's), per class.
_MMPRETRAIN_DEFAULTS = {"out_indices": (3,), "norm_eval": False, "module_tree": "mmpretrain"}
_MMPRETRAIN_RES2NET_DEFAULTS = {**_MMPRETRAIN_DEFAULTS, "pool_last_chunk": "always"}

# Importing twice (a reload) must not register a second 'fastres' child.
MODELS = MMENGINE_MODELS._children.get(SCOPE) or Registry(
    "model", parent=MMENGINE_MODELS, scope=SCOPE
)


def running_scope() -> str | None:
    """The OpenMMLab library whose config is being built ('mmdet', 'mmpretrain', ...), or None."""
    scope = DefaultScope.get_current_instance()
    return None if scope is None else scope.scope_name


def _without_mmpretrain_only_arguments(cls: type, kwargs: dict) -> dict:
    """mmpretrain's ResNet takes two arguments fastres has not: drop_path_rate (stochastic
    depth; only 0 can be honoured) and expansion (only the block's own)."""
    kwargs = dict(kwargs)
    rate = kwargs.pop("drop_path_rate", 0.0)
    if rate:
        raise NotImplementedError(f"drop_path_rate={rate!r} is not supported (only 0)")
    expansion = kwargs.pop("expansion", None)
    depth = kwargs.get("depth")
    block = cls.arch_settings[depth][0] if depth in cls.arch_settings else None
    if expansion is not None and block is not None and expansion != block.expansion:
        raise NotImplementedError(
            f"expansion={expansion!r} is not supported (only {block.expansion}, the block's own)"
        )
    return kwargs


def _builder(cls: type, mmpretrain_defaults: dict):
    def build(**kwargs):
        if running_scope() == "mmpretrain":
            kwargs = {**mmpretrain_defaults, **_without_mmpretrain_only_arguments(cls, kwargs)}
        return cls(**kwargs)

    build.__name__ = build.__qualname__ = cls.__name__
    build.__doc__ = f"fastres.{cls.__name__} with the running OpenMMLab library's defaults."
    return build


for _cls, _defaults in (
    (ResNet, _MMPRETRAIN_DEFAULTS),
    (ResNetV1c, _MMPRETRAIN_DEFAULTS),
    (ResNetV1d, _MMPRETRAIN_DEFAULTS),
    (Res2Net, _MMPRETRAIN_RES2NET_DEFAULTS),
):
    MODELS.register_module(name=_cls.__name__, module=_builder(_cls, _defaults), force=True)
