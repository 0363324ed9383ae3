"""Subnormal (denormal) floats on CPU: how many a case's forward produces, and flushing them.

On x86 CPUs an arithmetic instruction that reads or produces a subnormal float takes a microcode
assist, tens to hundreds of cycles instead of one. A model whose activations go subnormal then
runs several times slower in every system alike: the speedups hold, the absolute figures
mislead. Flush-to-zero / denormals-are-zero (`torch.set_flush_denormal`) removes the assists.
It is a per-thread setting (the MXCSR register): a thread inherits it from the thread that
creates it, so it must be set before a process's first parallel region creates the OpenMP
threads, and each system's process sets it alike (`schedule.Isolated`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .check import autocast_context
from .systems import EAGER_CL

# Elements per OpenMP thread in the probe: above ATen's grain size (32,768), so that an
# elementwise op over the probe gives every intra-op thread a chunk of its own.
_PROBE_PER_THREAD = 2**16


def count_subnormal_activations(case) -> tuple[int, int]:
    """Runs the oracle (eager channels_last, the case's mode and dtype) once on the case's
    input and counts the subnormal values in the output of every leaf module.

    Returns:
        (subnormal values, all values) over those outputs.
    """
    runner = case.runner(EAGER_CL)
    counts = [0, 0]

    def count(module, inputs, output: Tensor) -> None:
        if isinstance(output, Tensor) and output.is_floating_point():
            tiny = torch.finfo(output.dtype).tiny
            counts[0] += int(((output != 0) & (output.abs() < tiny)).sum())
            counts[1] += output.numel()

    leaves = [m for m in runner.model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad(), autocast_context(runner.device, runner.dtype):
            runner.module(runner.x)
    finally:
        for hook in hooks:
            hook.remove()
    return counts[0], counts[1]


def flushes_denormals() -> bool:
    """Whether this process's CPU threads flush subnormal floats to zero.

    Raises:
        RuntimeError: some intra-op threads flush and others do not (the setting changed after
            the OpenMP threads were created).
    """
    threads = torch.get_num_threads()
    # A quarter of the smallest normal float32: subnormal, and still subnormal times 1.5.
    probe = torch.full((threads * _PROBE_PER_THREAD,), torch.finfo(torch.float32).tiny / 4)
    kept = (probe * 1.5 != 0).view(threads, -1).all(dim=1).tolist()
    if len(set(kept)) > 1:
        raise RuntimeError(
            f"only some of the {threads} intra-op threads flush subnormal floats (per thread: "
            f"{[not k for k in kept]}): set torch.set_flush_denormal before the process's first "
            "parallel operation, which creates the threads"
        )
    return not kept[0]


def set_flush_denormals(on: bool) -> None:
    """Flushes subnormal floats to zero (or stops) in this process's CPU threads.

    Call it before the process's first parallel operation, so that the OpenMP threads inherit it.

    Raises:
        RuntimeError: the CPU cannot flush them, or the threads disagree afterwards.
    """
    if not torch.set_flush_denormal(on) and on:
        raise RuntimeError("this CPU cannot flush subnormal floats (no SSE3 DAZ)")
    if flushes_denormals() != on:
        raise RuntimeError(
            f"torch.set_flush_denormal({on}) did not reach this process's intra-op threads"
        )
