"""Keeps the native backend's large CPU buffers mapped from one forward to the next.

glibc returns large freed blocks to the kernel, so each fresh activation buffer takes a page
fault per 4 KiB page when it is first written: 10-30 thousand faults, about a tenth of a
ResNet-50 forward at batch 8, 224 px on 2 cores. Inside `scope()`, this thread's CPU
allocations of 1 MiB or more come from a cache of freed blocks of the same size instead
(`csrc/cpu/block_cache.cpp`, installed as the CPU allocator on first use; every other
allocation still goes to PyTorch's own). The native backend runs each CPU block in a scope,
and, in training, the backward pass from its first block on (`scope_backward`): the gradient
buffers are as large as the activations, and the backward frees the saved activations that
the next forward takes again.

A cached block that no allocation takes within 256 scopes (a few forwards of the deepest
model) is freed: after the input shape changes, or after the caller drops outputs it had kept.
So the cache holds about one forward's working set, or one training step's saved activations,
while a model runs, and keeps it when the model stops running: `release()` frees it.

The cache's blocks, and the allocations of 1 MiB or more made while `paused` (the folded,
prepacked weights), are mapped from the kernel and unmapped when freed, never taken from
glibc's heap: weights prepacked again at every new input size fragmented that heap, which kept
the freed memory resident (ResNet-18 eval at 120 random sizes: 780-960 MiB against the
oracle's 80; see bench/results/cpu-memory/). What stays per input size is bounded elsewhere:
one prepacked weight per convolution (for the last size), and oneDNN's primitives of recent
sizes (its primitive cache, at most ONEDNN_PRIMITIVE_CACHE_CAPACITY = 1024 by default).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from typing import NamedTuple

import torch
from torch import Tensor

from .extension import _C, EXTENSION_ERROR


class CacheStats(NamedTuple):
    live_bytes: int  # in cached-allocator blocks now held by tensors
    cached_bytes: int  # freed blocks kept for reuse
    hits: int  # allocations served from the cache
    misses: int  # allocations inside a scope that found no cached block


class scope:
    """Context manager: this thread's large allocations on `device` reuse cached blocks.

    A no-op for other devices, without the extension, under torch.compile (the compiled graph
    plans its own buffers), and where a CPU allocator of higher priority is installed.
    """

    __slots__ = ("_active", "_device")

    def __init__(self, device: torch.device):
        self._device = device

    def __enter__(self) -> None:
        self._active = (
            self._device.type == "cpu"
            and EXTENSION_ERROR is None
            and not torch.compiler.is_compiling()
            and _C.cpu_cache_enter()
        )

    def __exit__(self, *exc) -> None:
        if self._active:
            _C.cpu_cache_exit()


# Whether this thread's backward pass runs in a scope that `_close_backward_scope` leaves.
_backward = threading.local()


def scope_backward(output: Tensor) -> None:
    """Runs the backward pass that reaches `output`, from its grad_fn to the end, in a scope.

    The scope opens when the backward reaches `output`'s grad_fn (once per backward pass, on
    the thread that runs it) and closes when that pass ends. A no-op where `scope` is one and
    for outputs without a grad_fn.
    """
    if EXTENSION_ERROR is not None or torch.compiler.is_compiling():
        return
    if output.device.type == "cpu" and output.grad_fn is not None:
        output.grad_fn.register_prehook(_open_backward_scope)


def _open_backward_scope(grad_outputs):
    if getattr(_backward, "open", False) or not _C.cpu_cache_enter():
        return
    _backward.open = True
    # Runs when this backward pass has finished; CPU backward passes run on the calling thread.
    torch.autograd.Variable._execution_engine.queue_callback(_close_backward_scope)


def _close_backward_scope() -> None:
    if getattr(_backward, "open", False):
        _backward.open = False
        _C.cpu_cache_exit()


def close_stale_backward_scope() -> None:
    """Closes a backward scope that a failed backward pass left open (its end callback only
    runs when the pass succeeds); call where a new forward starts outside any backward."""
    if torch.compiler.is_compiling() or not getattr(_backward, "open", False):
        return
    if torch._C._current_graph_task_id() < 0:
        _close_backward_scope()


class paused:
    """Context manager: allocations inside are not cached (long-lived ones, such as weights);
    those of 1 MiB or more are mapped from the kernel (see the module's docstring)."""

    __slots__ = ("_depth",)

    def __enter__(self) -> None:
        self._depth = _C.cpu_cache_pause() if EXTENSION_ERROR is None else None

    def __exit__(self, *exc) -> None:
        if self._depth is not None:
            _C.cpu_cache_resume(self._depth)


def trim_heap() -> None:
    """Hands the C library's free heap memory back to the kernel (glibc's malloc_trim), as it
    does by itself with large blocks: the next fresh buffers are first-touched again."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def release() -> None:
    """Frees every cached block (blocks still held by tensors return when those are freed),
    and hands the C library's free heap memory back to the kernel (`trim_heap`)."""
    if EXTENSION_ERROR is None:
        _C.cpu_cache_release()
    trim_heap()


def stats() -> CacheStats:
    """The cache's counters (all zero without the extension)."""
    if EXTENSION_ERROR is None:
        return CacheStats(*_C.cpu_cache_stats())
    return CacheStats(0, 0, 0, 0)
