"""Launching a Triton kernel without `JITFunction.run`'s per-call work (imports Triton).

`kernel[grid](*args, **constexprs)` binds every argument to the signature, specializes each one
(about 50 calls for the fused convolution), builds a cache key from them and looks up the
compiled kernel: some 20 us of Python per launch. A launcher that knows, for one key of its own,
every argument but the pointers (the integer arguments and constexprs follow from the shapes and
strides in that key) keeps a `DirectLaunch`: its first call runs the JIT as usual and keeps the
`CompiledKernel` the JIT launched; later calls launch that kernel directly, as `JITFunction.run`
does once it has found it (`launch_compiled`).

What the JIT would still specialize on per call is the pointers' alignment: a pointer is
specialized as 16-byte aligned or not (the integers are specialized on ==1 and divisibility by
16, but they are fixed per key). So the kept kernel is looked up by the pointers' alignment
(`data_ptr() % 16`), the current device and the JIT options read from Triton's knobs (debug,
instrumentation): a new combination runs the JIT again, never an older kernel.

The direct launch is used only where it is proven to match the JIT (the Triton versions whose
`JITFunction.run` was read: `DIRECT_TRITON_VERSIONS`) and falls back to the JIT whenever the JIT
would do more than look up and launch: under the interpreter (an InterpretedFunction), with
pre-run hooks on the kernel, with a stage-inspection hook, or when a global the kernel uses has
changed (the JIT raises then).

scripts/compile_report.py's stand-in driver replaces `launch_compiled` (it launches nothing).
"""

from __future__ import annotations

import operator

import triton
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Triton versions (major.minor) whose JITFunction.run and CompiledKernel launch were read and
# match what `DirectLaunch` does; any other runs every launch through the JIT.
DIRECT_TRITON_VERSIONS = ("3.6", "3.9")
_DIRECT = ".".join(triton.__version__.split(".")[:2]) in DIRECT_TRITON_VERSIONS

# The knobs JITFunction.run passes to the compiler as options: a kernel compiled under other
# values is another kernel.
_OPTION_KNOBS = operator.attrgetter(
    "runtime.debug",
    "compilation.instrumentation_mode",
    *(
        ["compilation.fpsan_homomorphic_casts"]  # Triton 3.9
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts")
        else []
    ),
)
# A stage-inspection hook adds its hash, computed per call, to the JIT's key (Triton 3.9).
_HAS_STAGES_HOOK = hasattr(knobs.runtime, "add_stages_inspection_hook")


def launch_compiled(kernel: CompiledKernel, grid: tuple, stream, args: tuple) -> None:
    """Launches a compiled kernel on `stream` with every argument of its signature (constexprs
    too), as `JITFunction.run` does once it has the kernel."""
    kernel.run(
        grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
        kernel.function, kernel.packed_metadata, kernel.launch_metadata(grid, stream, *args),
        knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args,
    )  # fmt: skip


class DirectLaunch:
    """Launches of one kernel whose grid, integer arguments and constexprs are fixed: only the
    pointer arguments (the leading ones of the signature) change from call to call.

    Args:
        jit: the @triton.jit kernel (an InterpretedFunction under the interpreter).
        grid: the launch grid.
        pointers: how many pointer arguments lead the signature.
        scalars: the positional arguments after the pointers.
        constexprs: the keyword arguments: every constexpr of the kernel, and launch options
            (num_warps, num_stages).
    """

    __slots__ = ("jit", "grid", "scalars", "constexprs", "tail", "compiled")

    def __init__(self, jit, grid: tuple, pointers: int, scalars: tuple, constexprs: dict):
        self.jit, self.grid, self.scalars, self.constexprs = jit, grid, scalars, constexprs
        # What the JIT passes its launcher after the pointers: the scalars and the constexprs
        # in signature order. None: every launch goes through the JIT.
        self.tail = None
        # (device, pointers' dtypes and alignment, options) -> the CompiledKernel the JIT
        # launched for them.
        self.compiled: dict[tuple, CompiledKernel] = {}
        if _DIRECT and isinstance(jit, JITFunction):
            positional = pointers + len(scalars)
            leading, given = jit.params[:positional], jit.params[positional:]
            if (
                len(leading) == positional
                and not any(p.is_constexpr for p in leading)
                and all(p.is_constexpr and p.name in constexprs for p in given)
            ):
                self.tail = scalars + tuple(constexprs[p.name] for p in given)

    def __call__(self, *pointers) -> None:
        """Launches with these pointer arguments (tensors or None)."""
        jit = self.jit
        if (
            self.tail is None
            or jit.pre_run_hooks
            or (jit.used_global_vals and _global_changed(jit))
            or (_HAS_STAGES_HOOK and knobs.runtime.add_stages_inspection_hook is not None)
        ):
            self.through_jit(*pointers)
            return
        active = driver.active
        device = active.get_current_device()
        key = (
            device,
            tuple([(p.dtype, p.data_ptr() % 16 == 0) for p in pointers if p is not None]),
            jit.debug,
            _OPTION_KNOBS(knobs),
        )
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.through_jit(*pointers)
            if isinstance(kernel, CompiledKernel):
                self.compiled[key] = kernel
            return
        args = (*pointers, *self.tail)
        launch_compiled(kernel, self.grid, active.get_current_stream(device), args)

    def through_jit(self, *pointers):
        """Launches through the JIT (`kernel[grid](...)`); returns what the JIT returns."""
        return self.jit[self.grid](*pointers, *self.scalars, **self.constexprs)

    def warmup(self, *pointers) -> None:
        """Compiles the kernel for these arguments without launching it."""
        self.jit.warmup(*pointers, *self.scalars, grid=self.grid, **self.constexprs)


def _global_changed(jit: JITFunction) -> bool:
    """Whether a global the kernel read at compile time has changed (JITFunction.run raises)."""
    missing = object()
    return any(
        globals_dict.get(name, missing) != value
        for (name, _), (value, globals_dict) in jit.used_global_vals.items()
    )
