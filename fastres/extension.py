"""The C++/CUDA extension `fastres._C`, loaded in this one place.

Loading it registers the `fastres::bn_*` ops and the CPU block cache. `EXTENSION_ERROR` says why
it is missing (not built: FASTRES_BUILD_EXT=0; or built for another torch), None where it
loaded; every user of the extension checks it and names it in its own error.
"""

from __future__ import annotations

import torch

EXTENSION_ERROR: str | None
try:
    from . import _C

    EXTENSION_ERROR = None
except (ImportError, OSError) as exc:
    _C = None
    EXTENSION_ERROR = f"the C++ extension fastres._C is not built or does not load ({exc})"


def require(what: str) -> None:
    """Raises a RuntimeError saying that `what` needs the extension, where it is missing."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"{what} needs {EXTENSION_ERROR}")


def cuda_kernels_built() -> bool:
    """Whether the extension has CUDA kernels (it was built against a CUDA torch with nvcc)."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastres::bn_apply", "CUDA")
