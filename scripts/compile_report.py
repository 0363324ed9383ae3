"""Compiles, for a GPU this machine does not have, every Triton kernel the triton backend
launches, and reports each one's shared memory, registers, spills and software pipelining.

    .venv/bin/python scripts/compile_report.py --arch 90 --json report.json [--all-candidates]
        [--check]

The models run on CPU tensors with the triton backend while Triton sees a stand-in driver
whose current target is `cuda:<arch>`: each launch compiles (with the specialization the JIT
derives from the real arguments: pointer alignment, integer divisibility) and launches nothing,
so outputs are garbage and only the kernels count. By default each shape gets its first
candidate tile, the one used when tuning is off; `--all-candidates` compiles every candidate.
`--check` exits 1 if a kernel exceeds the GPU's shared memory, spills, or (a convolution) is not
software-pipelined.
Registers and spills come from ptxas -v on the PTX (Triton fills them only on a real GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastres  # noqa: E402
from fastres.backends.triton import TritonBackend  # noqa: E402
from fastres.ops import conv2d_fused, launcher, tuning  # noqa: E402


class CompileOnlyDriver:
    """What JITFunction.run asks of the active driver, answered for a GPU that is not here."""

    def __init__(self, real, arch: int):
        self.real, self.target = real, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def __getattr__(self, name):
        return getattr(self.real, name)


class Recorder:
    """Patches the JIT to compile without launching, the direct launch of a kernel the JIT
    compiled (`fastres.ops.launcher.launch_compiled`) to launch nothing, and tuning to compile
    its candidates."""

    def __init__(self, all_candidates: bool):
        self.all_candidates = all_candidates
        self.kernels: dict[int, dict] = {}
        self.context = "?"

    @contextlib.contextmanager
    def patched(self, arch: int):
        real_run, real_choose = JITFunction.run, tuning.choose
        real_launch_compiled = launcher.launch_compiled
        real_check = conv2d_fused.check_triton_device
        real_reason = TritonBackend.unavailable_reason
        real_limit = tuning.shared_memory_limit
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = real_run(fn, *args, grid=grid, warmup=True, **kwargs)
            # One entry per compiled kernel: the JIT returns the same one for the same
            # specialization, and the entries keep them alive, so their ids stay distinct.
            # (Made on a kernel's first launch only: scripts/host_cost.py times this path.)
            if id(kernel) not in recorder.kernels:
                constexprs = {
                    k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")
                }
                recorder.kernels[id(kernel)] = {
                    "kernel": fn.__name__, "constexprs": constexprs, "compiled": kernel,
                    "first_seen": recorder.context,
                }  # fmt: skip
            return kernel

        def choose(device, key, candidates, launch, compile_only):
            for config in candidates if recorder.all_candidates else candidates[:1]:
                try:
                    compile_only(config)
                except Exception as error:  # noqa: BLE001  (reported, not fatal)
                    print(f"  {key} {config}: {type(error).__name__}: {error}", file=sys.stderr)
            return candidates[0]

        try:
            real_driver = triton_driver.active
        except RuntimeError:  # no GPU driver on this machine
            real_driver = None
        triton_driver.set_active(CompileOnlyDriver(real_driver, arch))
        JITFunction.run, tuning.choose = run, choose
        launcher.launch_compiled = lambda kernel, grid, stream, args: None
        conv2d_fused.check_triton_device = lambda x, what: None
        TritonBackend.unavailable_reason = lambda self, device_type=None: None
        tuning.shared_memory_limit = lambda device: tuning.SHARED_MEMORY_LIMIT[arch]
        try:
            yield
        finally:
            JITFunction.run, tuning.choose = real_run, real_choose
            launcher.launch_compiled = real_launch_compiled
            conv2d_fused.check_triton_device = real_check
            TritonBackend.unavailable_reason = real_reason
            tuning.shared_memory_limit = real_limit
            if real_driver is not None:
                triton_driver.set_active(real_driver)


WORKLOADS = {
    "resnet50": lambda: fastres.ResNet(depth=50, zero_init_residual=False),
    "resnet50-v1d": lambda: fastres.ResNetV1d(depth=50, zero_init_residual=False),
    "res2net50": lambda: fastres.Res2Net(depth=50, zero_init_residual=False),
    "resnet18": lambda: fastres.ResNet(depth=18, zero_init_residual=False),
}
MODES = ("infer", "bn-frozen", "train")
# Kernels with a loop over K whose loads Triton should software-pipeline (cp.async); the others
# (the Res2Net pool: nine taps, no loop) report None.
PIPELINED_KERNELS = {"conv2d_fused_kernel"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}


def run_workload(name: str, mode: str, dtype: str, batch: int, size: int) -> None:
    model = WORKLOADS[name]().set_backend("triton")
    model = model.to(memory_format=torch.channels_last)
    model.norm_eval = mode != "train"
    model.train(mode != "infer")
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    autocast = (
        torch.autocast("cpu", dtype=DTYPES[dtype]) if dtype != "tf32" else contextlib.nullcontext()
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    with torch.set_grad_enabled(mode != "infer"), autocast:
        outs = model(x)
        if mode != "infer":
            sum(o.float().mean() for o in outs).backward()


def get_ptxas(arch: int):
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(arch)
    except TypeError:  # Triton 3.6 takes no arch
        return compiler.get_ptxas()


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill stores / loads and shared memory of a kernel, from ptxas -v."""
    ptxas = get_ptxas(arch).path  # the one Triton compiles with (3.6: get_ptxas())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            [ptxas, "-v", f"-arch=sm_{arch}{'a' if arch >= 90 else ''}", path, "-o",
             os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"ptxas failed: {done.stderr.strip()[-500:]}")
        out = done.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(tuning.SHARED_MEMORY_LIMIT))
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--all-candidates", action="store_true")
    parser.add_argument("--workload", action="append", choices=tuple(WORKLOADS))
    parser.add_argument("--mode", action="append", choices=MODES)
    parser.add_argument("--dtype", action="append", choices=tuple(DTYPES))
    parser.add_argument("--batch", type=int, default=32, help="batch (32 gives b256's kernels)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--check", action="store_true", help="exit 1 on an overrun, a spill or "
                        "a convolution that is not pipelined")  # fmt: skip
    args = parser.parse_args()

    recorder = Recorder(args.all_candidates)
    start = time.perf_counter()
    with recorder.patched(args.arch):
        for name in args.workload or WORKLOADS:
            for mode in args.mode or MODES:
                for dtype in args.dtype or DTYPES:
                    recorder.context = f"{name} {mode} {dtype}"
                    before = len(recorder.kernels)
                    run_workload(name, mode, dtype, args.batch, args.image_size)
                    print(f"{recorder.context}: {len(recorder.kernels) - before} new kernels, "
                          f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

    limit = tuning.SHARED_MEMORY_LIMIT[args.arch]
    rows = []
    for entry in recorder.kernels.values():
        compiled = entry.pop("compiled")
        if compiled is None:
            continue
        ptx = compiled.asm["ptx"]
        row = {
            **entry,
            "shared_bytes": compiled.metadata.shared,
            "pipelined": "cp.async" in ptx if entry["kernel"] in PIPELINED_KERNELS else None,
            **ptxas_report(ptx, args.arch),
        }
        row["fits_shared"] = row["shared_bytes"] <= limit
        rows.append(row)
    spilling = [r for r in rows if r["spill_store_bytes"]]
    too_big = [r for r in rows if not r["fits_shared"]]
    summary = {
        "arch": args.arch,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "kernels": len(rows),
        "spilling": len(spilling),
        "over_shared_limit": len(too_big),
        "not_pipelined": sum(r["pipelined"] is False for r in rows),
        "seconds": round(time.perf_counter() - start),
    }
    print(json.dumps(summary))
    unpipelined = [r for r in rows if r["pipelined"] is False]
    for r in spilling + too_big + unpipelined:
        print(f"  {r['kernel']} {r['first_seen']}: shared {r['shared_bytes']}, "
              f"spills {r['spill_store_bytes']} B, pipelined {r['pipelined']}, "
              f"{r['constexprs']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "kernels": rows}, f, indent=1, default=str)
    return int(args.check and bool(spilling or too_big or unpipelined))


if __name__ == "__main__":
    sys.exit(main())
