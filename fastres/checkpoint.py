"""Checkpoint loading (docs/contract.md §4): torchvision, timm, OpenMMLab and fastres' own layouts.

`load_checkpoint` reads a file (or takes a dict / module), unwraps it, recognises its layout from
its keys, renames the keys to the model's own names, checks every name and shape against
`model.state_dict()`, and only then writes, so a failed load never half-loads.

Layouts (detected automatically, several may combine):

- fastres' own keys = OpenMMLab detection backbone keys = torchvision / timm keys for a plain
  stem: `conv1`, `bn1`, `layer{s}.{b}.conv*/bn*`, `downsample.{0,1}` (`.{1,2}` with avg_down,
  where `.0` is the parameter-free pool in every layout), Res2Net `convs.{i}` / `bns.{i}`, `fc`,
  OpenMMLab deep stem `stem.{0,1,3,4,6,7}`;
- timm deep stem (resnet*d, res2net*d): `conv1.{0,1,3,4,6}` + `bn1` -> `stem.{0,1,3,4,6,7}`;
- mmpretrain deep stem (ConvModules): `stem.{i}.conv` -> `stem.{3i}`,
  `stem.{i}.bn` / `stem.{i}.gn` -> `stem.{3i+1}`;
- mmpretrain avg_down shortcuts: mmpretrain's ResNet adds the average pool only where the
  stride is not 1, so a stride-1 shortcut (`layer1.0`, dilated stages) is `downsample.{0,1}` =
  conv, norm, where the mmdet tree has `.{1,2}` after an identity pool;
- wrappers `state_dict` / `model` (mmengine, DeiT-style), the DDP prefix `module.`, the OpenMMLab
  prefix `backbone.` (keys outside it, such as a detector's neck and heads, are ignored) and the
  mmpretrain classifier head `head.fc.*` -> `fc.*`.

A model built with mmpretrain's module tree (`module_tree='mmpretrain'`) has those last two
layouts as its own keys: the model's keys and the checkpoint's are both renamed onto the mmdet
tree and matched there, so either tree loads a checkpoint of either.

Keys that the model lacks by construction are ignored, not unexpected: `fc.*` for a backbone
(num_classes None) and stages beyond `num_stages`. A missing `num_batches_tracked` (checkpoints
older than PyTorch 0.4.1) keeps the model's current value.

The same key can name different tensors in two layouts (timm's deep-stem `bn1` is the last stem
BN; with avg_down `layer1.0.downsample.1.weight` is a 4-D conv weight, without it a 1-D BN
weight): the layout is decided from the stem keys first, and every shape is then checked, so a
checkpoint with another shortcut or stem type fails with a message that says so.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

# How many entries of each list an error message shows before "... and N more".
MAX_LISTED = 12

_WRAPPERS = ("state_dict", "model")
_TIMM_DEEP_STEM = {
    "conv1.0": "stem.0",
    "conv1.1": "stem.1",
    "conv1.3": "stem.3",
    "conv1.4": "stem.4",
    "conv1.6": "stem.6",
    "bn1": "stem.7",
}
# mmcv's ConvModule names its norm after the norm type: `bn` (BN, SyncBN) or `gn` (GN).
_MMPRETRAIN_DEEP_STEM = {
    f"stem.{i}.{part}": f"stem.{3 * i + offset}"
    for i in range(3)
    for part, offset in (("conv", 0), ("bn", 1), ("gn", 1))
}
_BLOCK_KEY = re.compile(r"layer(\d+)\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the model was left unchanged.

    Attributes:
        report: what was found (missing / unexpected / wrongly shaped keys), or None when the
            file or object could not be read as a state_dict at all.
    """

    def __init__(self, message: str, report: LoadReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """What `load_checkpoint` did (or, attached to a CheckpointError, would have done).

    Keys are the model's own names, except `unexpected` and `ignored`, which are the
    checkpoint's original names.

    Attributes:
        layout: the detected layout, e.g. "timm deep stem (conv1.0/1/3/4/6 + bn1)".
        loaded: model keys given a value from the checkpoint.
        missing: model keys the checkpoint lacks (left as they were; only with strict=False).
        unexpected: checkpoint keys the model lacks (skipped; only with strict=False).
        mismatched: (model key, model shape, checkpoint shape) of wrongly shaped tensors (only
            in a failed load's report: a wrong shape is always an error).
        ignored: checkpoint keys dropped by design: outside `backbone.`, `fc.*` for a
            backbone, stages beyond num_stages.
        filled: `num_batches_tracked` buffers absent from the checkpoint, left as they were.
    """

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors ({self.layout}); {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} wrongly shaped; "
            f"{len(self.ignored)} ignored, {len(self.filled)} num_batches_tracked kept"
        )


def load_checkpoint(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike | Mapping | nn.Module,
    strict: bool = True,
    *,
    prefix: str | None = None,
    weights_only: bool = True,
) -> LoadReport:
    """Loads a checkpoint of any docs/contract.md §4 layout into `model`, all or nothing.

    Args:
        model: a fastres model (any nn.Module whose keys follow fastres' naming works).
        path_or_state_dict: a checkpoint file (`torch.save` output, or `.safetensors` where the
            safetensors package is installed), a state_dict, a checkpoint dict with a
            `state_dict` / `model` entry, or a module whose state_dict to copy. A URL or an
            OpenMMLab model name (`open-mmlab://`, `torchvision://`, `mmcls://`; resolved with
            mmengine's tables) is read from torch.hub's checkpoint folder, where torch.hub and
            OpenMMLab keep their downloads; fastres downloads nothing.
        strict: True: any missing or unexpected key is an error. False: load the keys that
            match and report the others. A wrongly shaped tensor is an error either way.
        prefix: load only the keys under this module prefix (e.g. 'backbone', as mmengine's
            Pretrained init_cfg takes it), without it; others are ignored.
        weights_only: passed to `torch.load`. Keep True (the file cannot run code); False only
            for trusted files whose metadata holds other Python objects (e.g. numpy scalars in
            an mmengine `meta`).

    Returns:
        A LoadReport; the values are copied into the model's own parameters and buffers (their
        dtype and device, in place, so optimizers holding them stay valid).

    Raises:
        FileNotFoundError: the path does not exist, or a URL's file is not in torch.hub's
            checkpoint folder (the message names the URL and where to put its file).
        CheckpointError (a ValueError): the file is not a checkpoint, or it does not fit the
            model; the message lists the missing, unexpected and wrongly shaped keys, and the
            model is left exactly as it was.
    """
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        source = _read_file(_local_file(os.fspath(source)), weights_only)
    state, notes = _unwrap(source)
    ignored = []
    if prefix is not None:
        state, ignored = _under_prefix(state, prefix)
        notes.append(f"prefix {prefix!r} given")
    report, candidates = _match(model, state, notes)
    report.ignored[:0] = ignored

    if report.mismatched or (strict and (report.missing or report.unexpected)):
        raise CheckpointError(_describe_failure(model, report, candidates, strict), report)
    if not report.loaded:
        raise CheckpointError(
            _describe_failure(model, report, candidates, strict, nothing_matched=True), report
        )
    _warn_res2net_pool_rule(model, report.layout)

    # Convert everything first: a failing conversion (or allocation) must not leave a
    # half-written model, and load_state_dict then only copies.
    loaded = set(report.loaded)
    new_state = {
        key: candidates[key][1].detach().to(device=value.device, dtype=value.dtype)
        if key in loaded
        else value
        for key, value in model.state_dict().items()
    }
    model.load_state_dict(new_state, strict=True)
    return report


# -- reading -----------------------------------------------------------------------------------

# Model names of OpenMMLab's checkpoint loader, resolved through mmengine's own tables.
_NAMED_SCHEMES = ("open-mmlab://", "openmmlab://", "torchvision://", "modelzoo://", "mmcls://")


def _local_file(source: str) -> str:
    """The local file behind `source`: a path as it is; for a URL or an OpenMMLab model name,
    the copy in torch.hub's checkpoint folder (`$TORCH_HOME/hub/checkpoints`), where torch.hub
    and OpenMMLab keep what they download. fastres downloads nothing.

    Raises:
        FileNotFoundError: the name cannot be resolved, or its file is not there; the message
            says which URL to fetch and where to put it.
    """
    if "://" not in source or os.path.exists(source):
        return source
    url = _openmmlab_url(source) if source.startswith(_NAMED_SCHEMES) else source
    if not url.startswith(("http://", "https://")):
        if os.path.isfile(url):  # an open-mmlab:// name of a file in mmengine's home
            return url
        raise FileNotFoundError(f"checkpoint {source!r} not found ({url!r} is no local file)")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if os.path.isfile(cached):
        return cached
    raise FileNotFoundError(
        f"checkpoint {source!r} is not a local file, and fastres does not download: fetch {url} "
        f"to {cached} (torch.hub's and OpenMMLab's download folder), or give a local path"
    )


def _openmmlab_url(source: str) -> str:
    """The URL (or mmengine-home file) that an OpenMMLab model name stands for."""
    scheme, name = source.split("://", 1)
    try:
        from mmengine.runner import checkpoint as mm_checkpoint
    except ImportError as e:
        raise FileNotFoundError(
            f"checkpoint {source!r} is an OpenMMLab model name; resolving it needs mmengine "
            "(pip install mmengine), or give the path of a local copy"
        ) from e
    if scheme in ("torchvision", "modelzoo"):
        try:
            table = mm_checkpoint.get_torchvision_models()
        except ImportError as e:
            raise FileNotFoundError(
                f"checkpoint {source!r}: resolving torchvision:// names needs torchvision; "
                "give the path of a local copy instead"
            ) from e
    elif scheme == "mmcls":
        table = mm_checkpoint.get_mmcls_models()
    else:
        table = mm_checkpoint.get_external_models()
        name = mm_checkpoint.get_deprecated_model_names().get(name, name)
    if name not in table:
        raise FileNotFoundError(
            f"checkpoint {source!r}: {name!r} is not among the {len(table)} models OpenMMLab "
            f"knows as {scheme}:// names"
        )
    url = table[name]
    if url.startswith(("http://", "https://")):
        return url
    return os.path.join(mm_checkpoint._get_mmengine_home(), url)


def _read_file(path: str, weights_only: bool) -> object:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory, expected a checkpoint file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise CheckpointError(
                f"{path!r}: reading .safetensors files needs the safetensors package "
                "(pip install safetensors)"
            ) from e
        try:
            return load_file(path, device="cpu")
        except Exception as e:
            raise CheckpointError(f"{path!r} is not a readable safetensors file: {e}") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if weights_only and blocked:
            raise CheckpointError(
                f"{path!r} holds Python objects besides tensors (first: {blocked.group(1)}), "
                "which torch.load(weights_only=True) refuses to unpickle because unpickling can "
                "run code. Save model.state_dict() instead of the model, or, only if you trust "
                "the file, pass weights_only=False"
            ) from e
        raise CheckpointError(f"{path!r} is not a PyTorch checkpoint: {e}") from e
    except Exception as e:
        # torch.load reports a non-checkpoint file as anything from KeyError to EOFError.
        raise CheckpointError(
            f"{path!r} is not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e


def _unwrap(source: object) -> tuple[dict[str, Tensor], list[str]]:
    """The flat {key: tensor} dict inside `source`, and notes on the wrappers removed."""
    notes = []
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise CheckpointError(
            f"expected a state_dict (a dict of tensors) or a checkpoint dict with a 'state_dict' "
            f"or 'model' entry, got {type(source).__name__}"
        )
    for wrapper in _WRAPPERS:
        inner = source.get(wrapper)
        if isinstance(inner, (Mapping, nn.Module)):
            notes.append(f"'{wrapper}' entry")
            source = inner.state_dict() if isinstance(inner, nn.Module) else inner
            break
    not_tensors = [k for k, v in source.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if not_tensors or not source:
        keys = ", ".join(repr(k) for k in list(source)[:MAX_LISTED])
        what = (
            f"entries {', '.join(repr(k) for k in not_tensors[:MAX_LISTED])} are not tensors"
            if not_tensors
            else "it holds no tensors"
        )
        raise CheckpointError(
            f"not a state_dict: {what} (keys: {keys or 'none'}); expected a dict of tensors or "
            f"a checkpoint dict with one of the entries {_WRAPPERS}"
        )
    state = dict(source)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
        notes.append("prefix 'module.'")
    return state, notes


def _under_prefix(state: dict[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """The entries under module `prefix`, without it, and the keys of the others."""
    head = prefix.rstrip(".") + "."
    kept = {k[len(head) :]: v for k, v in state.items() if k.startswith(head)}
    if not kept:
        raise CheckpointError(
            f"no key of the checkpoint starts with {head!r} (prefix {prefix!r}); first keys: "
            f"{', '.join(list(state)[:MAX_LISTED])}"
        )
    return kept, [k for k in state if not k.startswith(head)]


# -- matching ----------------------------------------------------------------------------------


def _rename(key: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if key.startswith(old + "."):
            return new + key[len(old) :]
    return key


def _avg_down_shortcuts(model: nn.Module) -> dict[str, nn.Sequential]:
    """The model's avg_down shortcuts by name ([pool,] conv, norm), or {} where it has none."""
    shortcuts = {
        name: m
        for name, m in model.named_modules()
        if name.endswith("downsample") and isinstance(m, nn.Sequential)
    }
    pooled = any(isinstance(m[0], nn.AvgPool2d) for m in shortcuts.values())
    return shortcuts if getattr(model, "avg_down", pooled) else {}


def _at_stride_1(shortcut: nn.Sequential) -> bool:
    """Whether an avg_down shortcut's pool is the identity (stride 1) or left out (mmpretrain's
    module tree)."""
    pool = shortcut[0]
    return not isinstance(pool, nn.AvgPool2d) or pool.stride in (1, (1, 1))


def _model_renames(keys, shortcuts: dict[str, nn.Sequential]) -> dict[str, str]:
    """Renames of a model's keys onto the mmdet module tree, where checkpoints are matched: a
    model with mmpretrain's module tree has its deep stem and its pool-less stride-1 avg_down
    shortcuts (conv, norm at .0, .1) renamed."""
    table = {}
    if any(k.startswith("stem.0.conv.") for k in keys):
        table.update(_MMPRETRAIN_DEEP_STEM)
    for p, shortcut in shortcuts.items():
        if not isinstance(shortcut[0], nn.AvgPool2d):
            table.update({f"{p}.{i}": f"{p}.{i + 1}" for i in (1, 0)})
    return table


def _mmpretrain_shortcut_renames(shortcuts: dict[str, nn.Sequential], keys) -> dict[str, str]:
    """Renames of an mmpretrain avg_down checkpoint's stride-1 shortcuts (conv, norm at .0, .1)
    onto the mmdet tree's (identity pool, conv, norm), or {} where the checkpoint is not one:
    its strided shortcuts must have the pool (or the model must have none), so that a
    checkpoint without avg_down still fails on them, with the hint that says so."""
    keys = set(keys)
    identity = [p for p, shortcut in shortcuts.items() if _at_stride_1(shortcut)]
    strided = [p for p, shortcut in shortcuts.items() if not _at_stride_1(shortcut)]
    shifted = [p for p in identity if f"{p}.0.weight" in keys]
    if not shifted or not all(f"{p}.2.weight" in keys for p in strided):
        return {}
    return {f"{p}.{i}": f"{p}.{i + 1}" for p in shifted for i in (1, 0)}


def _match(
    model: nn.Module, state: dict[str, Tensor], notes: list[str]
) -> tuple[LoadReport, dict[str, tuple[str, Tensor]]]:
    """Maps the checkpoint onto the model's keys and sorts every key into the report.

    Returns the report and the candidates {model key: (checkpoint key, tensor)}.
    """
    expected = model.state_dict()
    ignored = []
    if any(k.startswith("backbone.") for k in state):
        notes.append("prefix 'backbone.'")
        kept = {}
        for key, value in state.items():
            if key.startswith(("backbone.", "head.fc.")):
                kept[key] = value
            else:
                ignored.append(key)
        state = kept

    def original_to_model(key: str) -> str:
        key = key.removeprefix("backbone.")
        return "fc." + key[len("head.fc.") :] if key.startswith("head.fc.") else key

    stem_table = None
    if any(k.removeprefix("backbone.").startswith("stem.0.conv.") for k in state):
        stem_table, stem = _MMPRETRAIN_DEEP_STEM, "mmpretrain deep stem (stem.i.conv/bn)"
    elif any(k.removeprefix("backbone.").startswith("conv1.0.") for k in state):
        stem_table, stem = _TIMM_DEEP_STEM, "timm deep stem (conv1.0/1/3/4/6 + bn1)"
    elif any(k.removeprefix("backbone.").startswith("stem.") for k in state):
        stem = "fastres/OpenMMLab deep stem"
    else:
        stem = "fastres/torchvision/timm/OpenMMLab keys"
    layout = stem + "".join(f", {note}" for note in notes)

    # Both sides meet in the mmdet module tree, then the targets take the model's own names.
    shortcuts = _avg_down_shortcuts(model)
    model_renames = _model_renames(expected, shortcuts)
    model_key = {_rename(key, model_renames): key for key in expected}
    targets = {}
    for key in state:
        target = original_to_model(key)
        targets[key] = target if stem_table is None else _rename(target, stem_table)
    shortcut_renames = _mmpretrain_shortcut_renames(shortcuts, targets.values())
    if shortcut_renames:
        layout += ", mmpretrain shortcuts without a stride-1 pool"
        targets = {key: _rename(target, shortcut_renames) for key, target in targets.items()}
    targets = {key: model_key.get(target, target) for key, target in targets.items()}

    model_stages = {int(m.group(1)) for k in expected if (m := _BLOCK_KEY.match(k))}
    has_fc = any(k.startswith("fc.") for k in expected)
    candidates: dict[str, tuple[str, Tensor]] = {}
    unexpected = []
    for key, value in state.items():
        target = targets[key]
        stage = _BLOCK_KEY.match(target)
        if (target.startswith("fc.") and not has_fc) or (
            stage and model_stages and int(stage.group(1)) not in model_stages
        ):
            ignored.append(key)
        elif target in candidates:
            # Two checkpoint keys for one model key (a mix of layouts): neither is trusted
            # more, so the second one is reported.
            unexpected.append(key)
        else:
            candidates[target] = (key, value)

    report = LoadReport(layout=layout, ignored=ignored)
    for key, value in expected.items():
        if key in candidates:
            got = tuple(candidates[key][1].shape)
            if got == tuple(value.shape):
                report.loaded.append(key)
            else:
                report.mismatched.append((key, tuple(value.shape), got))
        elif key.endswith("num_batches_tracked"):
            report.filled.append(key)
        else:
            report.missing.append(key)
    report.unexpected = unexpected + [
        original for target, (original, _) in candidates.items() if target not in expected
    ]
    return report, candidates


# -- messages ----------------------------------------------------------------------------------


def _grouped(keys: list[str]) -> list[tuple[str, int]]:
    """'m.weight', 'm.bias' -> ('m.{weight, bias}', 2), in order: BN keys come in fives."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        groups.setdefault(module, []).append(leaf)
    return [
        (
            f"{module}.{leaves[0]}" if len(leaves) == 1 else f"{module}.{{{', '.join(leaves)}}}",
            len(leaves),
        )
        for module, leaves in groups.items()
    ]


def _listing(title: str, entries: list[tuple[str, int]]) -> str:
    """A titled, indented list of (line, number of keys it stands for), cut at MAX_LISTED."""
    total = sum(n for _, n in entries)
    shown = entries[:MAX_LISTED]
    text = f"{total} {title}:\n" + "".join(f"    {line}\n" for line, _ in shown)
    if len(entries) > len(shown):
        text += f"    ... and {total - sum(n for _, n in shown)} more\n"
    return text


def _blocks_per_stage(keys) -> dict[int, int]:
    blocks: dict[int, int] = {}
    for key in keys:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
    return dict(sorted(blocks.items()))


def _features(keys) -> dict[str, str]:
    keys = list(keys)
    if any(".convs.0." in k for k in keys):
        block = "Res2Net Bottle2neck"
    elif any(".conv3." in k for k in keys):
        block = "Bottleneck (depth 50+)"
    elif any(".conv2." in k for k in keys):
        block = "BasicBlock (depth 18/34)"
    else:
        block = None
    stem = (
        "a deep stem (stem.*)"
        if any(k.startswith("stem.") for k in keys)
        else "a plain 7x7 stem (conv1)"
        if any(k.startswith("conv1.") for k in keys)
        else None
    )
    shortcuts = [k for k in keys if ".downsample." in k]
    if any(".downsample.2." in k for k in shortcuts):
        shortcut = "avg_down shortcuts (downsample.0 pool, .1 conv, .2 norm)"
    elif shortcuts:
        shortcut = "plain shortcuts (downsample.0 conv, .1 norm)"
    else:
        shortcut = None
    return {"block": block, "stem": stem, "shortcut": shortcut}


def _hints(model_keys, checkpoint_keys) -> list[str]:
    hints = []
    ours, theirs = _features(model_keys), _features(checkpoint_keys)
    for what in ("block", "stem", "shortcut"):
        if ours[what] and theirs[what] and ours[what] != theirs[what]:
            hints.append(f"the checkpoint has {theirs[what]}, the model {ours[what]}")
    ours, theirs = _blocks_per_stage(model_keys), _blocks_per_stage(checkpoint_keys)
    if theirs and ours != {s: n for s, n in theirs.items() if s in ours}:
        hints.append(
            f"the checkpoint has {tuple(theirs.values())} blocks per stage, the model "
            f"{tuple(ours.values())}: a checkpoint of another depth"
        )
    if any(".gn" in k for k in model_keys) != any(".gn" in k for k in checkpoint_keys):
        hints.append("the model and the checkpoint use different norm types (bn* vs gn*)")
    return hints


def _describe_failure(
    model: nn.Module,
    report: LoadReport,
    candidates: dict[str, tuple[str, Tensor]],
    strict: bool,
    nothing_matched: bool = False,
) -> str:
    name = type(model).__name__
    if nothing_matched:
        head = f"no tensor of the checkpoint fits {name}"
    else:
        head = (
            f"checkpoint does not fit {name}: {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(report.mismatched)} wrongly shaped keys"
        )
    lines = [f"{head} (layout: {report.layout})."]
    lines += [f"Hint: {hint}." for hint in _hints(model.state_dict(), candidates)]
    text = "\n".join(lines) + "\n"
    if report.mismatched:
        shapes = []
        for key, ours, theirs in report.mismatched:
            original = candidates[key][0]
            source = "" if original == key else f" (checkpoint key {original})"
            shapes.append(f"{key}{source}: model {ours}, checkpoint {theirs}")
        text += _listing(
            "wrongly shaped keys (model shape vs checkpoint shape)", [(s, 1) for s in shapes]
        )
    if report.missing:
        text += _listing(
            "missing keys (in the model, not in the checkpoint)",
            _grouped(report.missing),
        )
    if report.unexpected:
        text += _listing(
            "unexpected keys (in the checkpoint, not in the model)",
            _grouped(report.unexpected),
        )
    text += "The model was left unchanged."
    if not strict and report.mismatched:
        text += " strict=False skips missing and unexpected keys, never wrongly shaped ones."
    return text


def _warn_res2net_pool_rule(model: nn.Module, layout: str) -> None:
    # timm and mmpretrain Res2Nets pool the last chunk in every 'stage' block; the checkpoint
    # cannot say so (the pool has no parameters), but these two stem layouts name the source.
    if getattr(model, "pool_last_chunk", None) == "strided" and (
        layout.startswith("timm") or layout.startswith("mmpretrain")
    ):
        warnings.warn(
            f"loading {layout.split(' (')[0]} Res2Net weights into a model with "
            "pool_last_chunk='strided'; timm and mmpretrain train with 'always' "
            "(Res2Net(..., pool_last_chunk='always'))",
            stacklevel=3,
        )
