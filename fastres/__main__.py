"""Command line: `python -m fastres {bench,tune,profile,info}`.

python -m fastres bench                 # ResNet-50 and Res2Net-50 against PyTorch
python -m fastres tune --batch 8        # choose 'auto's implementations ahead, per layer
python -m fastres bench --model resnet --mode train --batch 16 --json out.json
python -m fastres bench --preset detection   # the backbone as mmdet trains it, 800x1333
python -m fastres profile --model res2net --trace trace.json
python -m fastres info                  # versions, device, backends and why not
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch

from . import backends
from . import benchmark as bm

LAYOUTS = ("channels_last", "nchw")


def image_size(text: str) -> tuple[int, int]:
    """argparse type of --image-size: see fastres.benchmark.parse_image_size."""
    try:
        return bm.parse_image_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_config_arguments(parser: argparse.ArgumentParser, profile: bool) -> None:
    parser.add_argument("--depth", type=int, default=50, help="network depth (default 50)")
    parser.add_argument(
        "--model",
        choices=("resnet", "res2net") if profile else ("resnet", "res2net", "both"),
        default="resnet" if profile else "both",
    )
    parser.add_argument(
        "--preset",
        choices=bm.PRESETS,
        default="classification",
        help="classification: the ImageNet classifier (default); detection: the backbone as "
        "mmdet trains it (frozen_stages=1, norm_eval, ~800x1333 images padded to 32, batch 2)",
    )
    # The defaults in the help texts come from the one table, fastres.benchmark.DEVICE_DEFAULTS.
    default = bm.describe_default
    parser.add_argument("--batch", type=int, help=f"batch size ({default('batch')})")
    parser.add_argument(
        "--image-size",
        type=image_size,
        help=f"H or HxW ({default('image_size')}, each padded up to a multiple of "
        f"{bm.DETECTION_PAD})",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(bm.DTYPES),
        help=f"fp32, or autocast to bf16/fp16 ({default('dtype')})",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument(
        "--iters",
        type=int,
        help=f"timed iterations; bench: systems take turns ({default('iters')})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed steps before timing; bench: after the check call, at least 1 "
        f"({default('warmup')})",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and input seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastres",
        description="fastres: fused ResNet / Res2Net backbones. Benchmarks, profiling, info.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="time ResNet / Res2Net against PyTorch eager and torch.compile",
        description=(
            "Runs ResNet-50 and Res2Net-50 (inference and a training step: fwd + bwd + SGD) "
            "with every available fastres backend and the PyTorch peers (eager NCHW, eager "
            "channels_last, torch.compile), checks each once against the float64 oracle, "
            "and prints img/s, the speedup over eager channels_last, the error and peak memory."
        ),
    )
    _add_config_arguments(bench, profile=False)
    bench.add_argument(
        "--backend",
        action="append",
        choices=backends.BACKEND_NAMES,
        help="fastres backend to run (repeatable; default: every fused backend that can run "
        "here, and 'auto', the per-layer selection among them; 'torch', the oracle, is the "
        "same computation as eager-cl)",
    )
    bench.add_argument(
        "--mode", choices=("infer", "train", "both"), default="both", help="default both"
    )
    bench.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    bench.add_argument(
        "--compile-train",
        action="store_true",
        help="on CPU, also compile the training step (off by default: it compiles for ~2 min "
        "on 2 cores and runs slower than eager; no CPU training target is set against it)",
    )
    bench.add_argument(
        "--same-process",
        action="store_true",
        help="time every system in this process (default on CPU: each system in a process of "
        "its own, as a user runs it; systems sharing a process share the C library's heap, "
        "and with it each other's page faults)",
    )
    bench.add_argument(
        "--process-per-system",
        action="store_true",
        help="each system in a process of its own also on CUDA (a system that breaks the "
        "CUDA context then costs only its own figures)",
    )
    bench.add_argument(
        "--flush-denormals",
        action="store_true",
        help="flush subnormal floats to zero (torch.set_flush_denormal) in every system's "
        "process and threads alike: on x86 CPUs each subnormal value an op reads or writes "
        "costs a microcode assist, which slows every system where a model's activations go "
        "subnormal (the header counts them)",
    )
    bench.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON to PATH (rewritten after every group, so that an "
        "interrupted run keeps what it measured)",
    )

    tune = sub.add_parser(
        "tune",
        help="choose the implementation of every layer for 'auto' ahead of time, and report it",
        description=(
            "Runs ResNet-50 and Res2Net-50 (inference and a training step) once with the 'auto' "
            "backend, as `bench` runs it: every layer shape not chosen yet times its candidate "
            "implementations that agree with the float64 oracle and keeps the fastest, persisted "
            "for every later process on this machine (the cache directory: $FASTRES_CACHE_DIR, "
            "else $XDG_CACHE_HOME/fastres, else ~/.cache/fastres). Prints which implementation "
            "runs each layer, and the candidates' times where they were measured now."
        ),
    )
    _add_config_arguments(tune, profile=False)
    tune.add_argument(
        "--mode", choices=("infer", "train", "both"), default="both", help="default both"
    )
    tune.add_argument("--layout", choices=LAYOUTS, default="channels_last")
    tune.add_argument("--json", metavar="PATH", help="write the per-layer report as JSON to PATH")

    profile = sub.add_parser(
        "profile",
        help="run one configuration for N iterations with NVTX ranges and torch.profiler",
        description=(
            "Runs one configuration; every block and the stem sit in an NVTX range (CUDA) and a "
            "torch.profiler record_function range. Prints the time per iteration and the top "
            "ops; --trace writes a Chrome trace (chrome://tracing, Perfetto)."
        ),
    )
    _add_config_arguments(profile, profile=True)
    profile.add_argument(
        "--backend",
        default="auto",
        choices=backends.BACKEND_NAMES,
        help="fastres backend (default auto)",
    )
    profile.add_argument("--mode", choices=("infer", "train"), default="infer")
    profile.add_argument("--layout", choices=LAYOUTS, default="channels_last")
    profile.add_argument("--compile", action="store_true", help="torch.compile the model")
    profile.add_argument("--trace", metavar="PATH", help="write a Chrome trace to PATH")
    profile.add_argument(
        "--profile-iters",
        type=int,
        default=2,
        help="iterations recorded by torch.profiler after the timed ones (0: no profiler, "
        "e.g. under nsys)",
    )
    profile.add_argument("--top", type=int, default=15, help="rows of the op table")

    sub.add_parser("info", help="versions, device and which backends can run here")
    return parser


def _resolve_common(args: argparse.Namespace) -> None:
    """Fills the device-dependent defaults into `args`."""
    args.device = args.device or bm.default_device()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    defaults = bm.device_defaults(args.preset, args.device)
    for key in bm.SETTING_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    args.image_size = bm.input_size(args.preset, *args.image_size)
    for key in ("batch", "iters"):
        if getattr(args, key) < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("error: --warmup must be >= 0")


def compile_modes(args: argparse.Namespace) -> set[str]:
    """The modes in which torch.compile is one of the peers."""
    if args.no_compile:
        return set()
    if args.compile_train:
        return {"infer", "train"}
    return set(bm.device_defaults(args.preset, args.device)["compile_modes"])


def run_bench(args: argparse.Namespace) -> int:
    if args.flush_denormals:
        # Before any parallel op: the OpenMP threads inherit the setting when they are created.
        bm.set_flush_denormals(True)
    _resolve_common(args)
    models = ("resnet", "res2net") if args.model == "both" else (args.model,)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    reasons = bm.backend_reasons(args.device)
    if args.backend:
        chosen = list(dict.fromkeys(args.backend))
        for name in chosen:
            if reasons[name] is not None:
                raise SystemExit(
                    f"error: backend {name!r} cannot run on {args.device}: {reasons[name]}"
                )
    else:
        chosen = bm.default_backends(args.device)
    compiled = compile_modes(args)

    configs = []
    for model in models:
        try:
            bm.check_model_depth(model, args.depth)
        except ValueError as err:
            print(f"skipping {model}: {err}")
            continue
        configs += [bm.config_from_args(args, model, mode) for mode in modes]
    if not configs:
        raise SystemExit("error: nothing to run")

    def systems_for(config: bm.BenchConfig) -> list[bm.System]:
        peers = [bm.EAGER, bm.EAGER_CL] + ([bm.COMPILE] if config.mode in compiled else [])
        return peers + [bm.fastres_system(name) for name in chosen]

    if args.same_process and args.process_per_system:
        raise SystemExit("error: --same-process and --process-per-system exclude each other")
    isolate = args.process_per_system or (
        bm.isolates_by_default(args.device) and not args.same_process
    )
    print(f"fastres bench on {bm.device_name(args.device)}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        busy = load > 0.5 * (os.cpu_count() or 1)
        print(
            f"  load average {load:.1f} on {os.cpu_count()} CPUs"
            + (": other processes are running, timings will be noisy" if busy else "")
        )
    print(
        f"  models {', '.join(c.label for c in configs[:: len(modes)])}, modes {', '.join(modes)}, "
        f"{args.preset}, batch {args.batch}, image {args.image_size[0]}x{args.image_size[1]}, "
        f"{args.dtype}"
        f"{' (autocast)' if args.dtype != 'fp32' else ''}, iters {args.iters} "
        f"(+{max(args.warmup, 1)} warmup; the systems of a group take turns"
        f"{', each in its own process' if isolate else ''}), seed {args.seed}"
    )
    compile_note = f"compile (channels_last; {', '.join(sorted(compiled))}), " if compiled else ""
    print(
        f"  systems: eager (NCHW), eager-cl (channels_last), {compile_note}"
        f"fastres backends {chosen or 'none'}"
    )
    skipped = {name: reason for name, reason in reasons.items() if reason is not None}
    for name, reason in skipped.items():
        print(f"  backend {name} not run: {reason}")
    print(
        "  max err: largest max|y - gold| / max|gold| over the checked tensors against the "
        "float64 oracle; check: the contract's rule err <= 4 * err(eager) + tol"
    )
    print(
        "  peak mem: "
        + (
            "torch.cuda.max_memory_allocated above the memory in use before the system was built"
            if args.device.startswith("cuda")
            else "peak RSS (VmHWM, reset through /proc/self/clear_refs) above the RSS before "
            "the system was built"
        ),
    )
    print(
        "  faults/it: the process's minor page faults per timed step (first touches of memory "
        "the C library had given back to the kernel)",
        flush=True,
    )
    flushed = bm.flushes_denormals()
    subnormal = {}
    if not args.device.startswith("cuda"):
        for config in configs:
            subnormal[config.group] = dict(
                zip(("subnormal", "values"), bm.count_subnormal_activations(bm.Case(config)))
            )
        counts = ", ".join(
            f"{group} {c['subnormal']:,} of {c['values']:,}" for group, c in subnormal.items()
        )
        print(f"  subnormal activations (the oracle's forward, every module's output): {counts}")
    print(
        "  subnormal floats "
        + ("flushed to zero in every system's threads (--flush-denormals)" if flushed else "kept")
    )
    if any(c["subnormal"] for c in subnormal.values()) and not flushed:
        print(
            "  WARNING: activations go subnormal: on x86 CPUs every op that reads or writes one "
            "takes a microcode assist, so every system's absolute times are inflated (the "
            "speedups hold); --flush-denormals flushes them in every system alike"
        )

    settings = {
        key: getattr(args, key)
        for key in ("preset", "model", "depth", "batch", "image_size", "dtype", "device", "mode")
    }
    settings.update(
        iters=args.iters,
        warmup=args.warmup,
        seed=args.seed,
        backends=chosen,
        compile_modes=sorted(compiled),
        process_per_system=isolate,
        flush_denormals=flushed,
        subnormal_activations=subnormal,
        command=" ".join(sys.argv),
    )

    # Per group: the float64 oracle, each system's build + check + warmup, the timed rounds.
    total = sum(len(systems_for(c)) + 2 for c in configs)
    progress = bm.Progress(total)
    results: list[bm.Result] = []
    start = time.perf_counter()
    for config in configs:
        case = bm.Case(config, seed=args.seed)
        progress.show(f"{config.group}: float64 oracle")
        case.gold()

        def on_phase(label: str, group: str = config.group) -> None:
            progress.advance()
            progress.show(f"{group}: {label}")

        results += bm.run_group(
            case, systems_for(config), args.iters, args.warmup, on_phase, isolate=isolate
        )
        progress.advance()
        del case
        bm.add_speedups(results)
        if args.json:
            bm.write_json(args.json, results, {**settings, "total_s": time.perf_counter() - start})
    progress.finish()
    print()
    print(bm.format_table(results))
    elapsed = time.perf_counter() - start
    print(f"\ntotal {elapsed:.0f} s; speedup = img/s over {bm.SPEEDUP_BASELINE} in the same group")
    failed = [r for r in results if not r.check_passed]
    for r in failed:
        print(f"CHECK FAILED {r.group} {r.system}:")
        for line in r.check_failures:
            print(f"  {line}")
    if args.json:
        print(f"results written to {args.json}")
    return 1 if failed else 0


def run_tune(args: argparse.Namespace) -> int:
    from .backends import select

    _resolve_common(args)
    models = ("resnet", "res2net") if args.model == "both" else (args.model,)
    modes = ("infer", "train") if args.mode == "both" else (args.mode,)
    configs = [bm.config_from_args(args, m, mode) for m in models for mode in modes]
    system = bm.System("fastres-auto", backend="auto", channels_last=args.layout != "nchw")
    print(f"fastres tune on {bm.device_name(args.device)}: cache {select.selection_file()}")
    report = []
    for config in configs:
        runner = bm.Case(config, seed=args.seed).runner(system)
        blocks = [m for m in runner.model.modules() if hasattr(m, "plan")]
        progress = bm.Progress(len(blocks) + 1)
        hooks = [b.register_forward_hook(lambda *_, p=progress: p.advance()) for b in blocks]
        progress.show(f"{config.group}: choosing")
        with select.recording() as choices:
            runner.step()
        progress.advance()
        progress.finish()
        for hook in hooks:
            hook.remove()
        rows = select.layer_report(runner.model, choices)
        report.append({"group": config.group, "layers": rows})
        print(f"\n{config.group}")
        print(select.format_report(rows))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(
                {"device": bm.device_name(args.device), "command": " ".join(sys.argv),
                 "groups": report}, f, indent=1,
            )  # fmt: skip
        print(f"report written to {args.json}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    device = bm.default_device()
    print(f"fastres {bm.versions()['fastres']}")
    for key, value in bm.versions().items():
        if key != "fastres":
            print(f"  {key:8s} {value}")
    print(f"default device: {device} ({bm.device_name(device)})")
    print("backends (fastres.available_backends()):")
    for name, status in backends.available_backends().items():
        print(f"  {name:7s} {'available' if status.available else 'unavailable'}: {status.reason}")
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        benchable = bm.benchable_backends(dev)
        print(f"benchmarked on {dev}: {', '.join(benchable) or 'none'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m fastres` and the `fastres` script."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "tune":
        return run_tune(args)
    if args.command == "profile":
        from .profiling import run_profile

        _resolve_common(args)
        return run_profile(args)
    return run_info(args)


if __name__ == "__main__":
    sys.exit(main())
