"""Backend selection: which implementation runs a model's stem and blocks.

A model keeps the same nn.Conv2d / nn.BatchNorm2d submodules under every backend; a backend only
changes how the stem and each block compute their forward. Backends:

- 'torch': the pure-PyTorch oracle (the blocks' own `forward_reference`);
- 'native': PyTorch convolution + the fused BatchNorm ops of the C++/CUDA extension `fastres._C`;
- 'triton': the fused Triton convolution kernels (CUDA, or CPU under TRITON_INTERPRET=1);
- 'auto': per unit or block, the fastest of these that agrees with the oracle, timed once per
  machine and persisted (`select.py`); 'torch' where no fused backend can run.

Whatever the backend, a model being exported (`torch.jit.trace`, hence ONNX export with
dynamo=False; `torch.export`, hence ONNX export with dynamo=True) runs the oracle, so that the
exported graph holds standard ATen ops only and runs without fastres.

A fused backend is a `Backend` subclass (`base.py`) in its own module of this package, listed
in `_REGISTRY`: `native.py`, and `triton/` (inference, Res2Net, training). `folding.py` holds the
eval-mode BatchNorm folding both use; `plan.py` the block plans and the one executor that walks
them (the oracle included); `select.py` the selection behind 'auto'. Nothing here imports the
models: a block describes itself by its `plan()`.

A model or block resolves its backend once per (backend name, device) and keeps it (`bound`):
a forward finds it with a lookup. What `resolve` answers depends only on what this machine
and process can run, which does not change while the process runs; `set_backend`, an
assignment to a block's `backend`, `.to()` another device are seen (the name and device key
it).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from . import native, select, triton
from .base import ORACLE, Backend

BACKEND_ENV_VAR = "FASTRES_BACKEND"
BACKEND_NAMES = ("auto", "torch", "native", "triton")

_REGISTRY: dict[str, Backend] = {b.name: b for b in (ORACLE, native.BACKEND, triton.BACKEND)}
_SELECTING = select.SelectingBackend()


class BackendStatus(NamedTuple):
    """Whether a backend can run on this machine, and why not."""

    available: bool
    reason: str


def available_backends() -> dict[str, BackendStatus]:
    """Tells which backends can run here, and why the others cannot.

    Returns:
        A dict from backend name ('torch', 'native', 'triton') to its `BackendStatus`.
    """
    status = {}
    for name, backend in _REGISTRY.items():
        reason = backend.unavailable_reason()
        status[name] = BackendStatus(reason is None, reason or "available")
    return status


def check_backend_name(name: str) -> str:
    """Returns `name` if it names a backend, else raises ValueError listing the valid names."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKEND_NAMES)}")
    return name


def requested_backend(name: str) -> str:
    """The backend a model asks for: FASTRES_BACKEND replaces 'auto' (the default).

    A backend named explicitly (argument or environment) must be able to run on this machine;
    otherwise this raises RuntimeError saying why.
    """
    check_backend_name(name)
    if name == "auto" and os.environ.get(BACKEND_ENV_VAR):
        env_name = os.environ[BACKEND_ENV_VAR]
        if env_name not in BACKEND_NAMES:
            raise ValueError(
                f"{BACKEND_ENV_VAR}={env_name!r} is not a backend: expected one of "
                f"{', '.join(BACKEND_NAMES)}"
            )
        name = env_name
    if name != "auto":
        reason = _REGISTRY[name].unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return name


def exporting() -> bool:
    """Whether the forward running now is being traced into a graph to deploy without fastres.

    `torch.jit.trace` (which the ONNX exporter with dynamo=False runs) and `torch.export` (which
    the one with dynamo=True runs) are. torch.compile is not: it traces the fused ops (custom ops
    with fake implementations); is_exporting() tells it apart from torch.export, which sets
    is_compiling() too.
    """
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def resolve(name: str, device: torch.device) -> Backend:
    """The backend that runs a tensor on `device` for a model that asked for `name`.

    'auto' is the per-site selection (`select.py`) where a fused backend can run on the device,
    else 'torch'; an explicit backend that cannot run on this device raises RuntimeError. Under
    export (`exporting()`) every backend is the oracle.
    """
    if exporting():
        return ORACLE
    if name == "auto":
        if _SELECTING.default(device) is ORACLE:
            return ORACLE
        return _SELECTING
    backend = _REGISTRY[name]
    reason = backend.unavailable_reason(device.type)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors: {reason}")
    return backend


BOUND = "_fastres_bound_backend"  # the module attribute `bound` keeps its backend in


def bound(module: nn.Module, device: torch.device) -> Backend:
    """`resolve(module.backend, device)`, kept in `module` for its backend name and `device`.

    Under export every backend is still the oracle. Not through nn.Module's attribute
    machinery, which costs more than this lookup may.
    """
    if exporting():
        return ORACLE
    name = module.backend
    kept = module.__dict__.get(BOUND)
    if kept is None or kept[0] != name or kept[1] != device:
        kept = (name, device, resolve(name, device))
        module.__dict__[BOUND] = kept
    return kept[2]
