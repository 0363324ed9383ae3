"""How the systems of a case are prepared and timed: each built, checked and warmed up
(`prepare_system`), in this process or in one of its own (`Isolated`), then stepped in turns
(`run_group`) or alone (`run_system`)."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from .case import Case, Runner
from .check import CheckResult
from .denormals import flushes_denormals, set_flush_denormals
from .memory import MemoryMeter, faults_since, free_memory, minor_page_faults
from .report import Result
from .systems import System, synchronize


class Sample(NamedTuple):
    """One timed step."""

    seconds: float
    page_faults: int | None  # minor page faults of the step's process during it


def time_steps(
    step: Callable[[], None], device: torch.device, iters: int, warmup: int
) -> list[float]:
    """Seconds per call of `step`, each synchronised, after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


class PreparedSystem(Protocol):
    """A system built, checked once against the oracle and warmed up, with its peak memory
    measured alone: what `run_group` times, in this process (`Prepared`) or in a process of its
    own (`Isolated`).

    `run_timed_step()` runs one synchronised step and returns its seconds and page faults;
    `close()` releases what the system holds and is called once, when the timing is over or
    has failed.
    """

    check: CheckResult
    first_call_s: float  # building the model and the check (torch.compile's compilation)
    peak_memory_bytes: int | None
    memory_kind: str
    denormals_flushed: bool  # in the system's process (`denormals.flushes_denormals`)

    @property
    def system(self) -> System: ...

    def run_timed_step(self) -> Sample: ...

    def close(self) -> None: ...


@dataclass
class Prepared:
    """A `PreparedSystem` in this process."""

    runner: Runner
    check: CheckResult
    first_call_s: float
    peak_memory_bytes: int | None
    memory_kind: str
    denormals_flushed: bool

    @property
    def system(self) -> System:
        return self.runner.system

    def run_timed_step(self) -> Sample:
        """One synchronised step: its seconds and this process's page faults during it."""
        before = minor_page_faults()
        seconds = time_steps(self.runner.step, self.runner.device, 1, 0)[0]
        return Sample(seconds, faults_since(before))

    def close(self) -> None:
        """Nothing to release: the runner's model goes with the last reference to it."""


def prepare_system(case: Case, system: System, warmup: int) -> Prepared:
    """Builds `system`, checks it once against the oracle, then runs `max(warmup, 1)` untimed
    steps; its peak memory is that of those steps, above the memory in use before it was
    built (so it counts weights, gradients, optimizer state and activations)."""
    meter = MemoryMeter(case.device)
    case.gold()  # before the baseline: the gold model is not part of any system's memory
    meter.free_and_set_baseline()
    start = time.perf_counter()
    runner = case.runner(system)
    check = case.check(runner)  # the first call: includes torch.compile's compilation
    first_call_s = time.perf_counter() - start
    meter.reset_peak()
    for _ in range(max(warmup, 1)):
        runner.step()
    peak = meter.peak()
    return Prepared(runner, check, first_call_s, peak, meter.kind, flushes_denormals())


def _what_ran(case: Case, system: System) -> dict:
    """The fields of a Result that name the case and the system."""
    config = case.config
    return dict(
        group=config.group,
        model=config.label,
        mode=config.mode,
        system=system.name,
        backend=system.backend,
        batch=config.batch,
        image_size=config.image_size,
        image_width=config.input_shape[3],
        preset=config.preset,
        dtype=config.dtype,
        device=str(case.device),
    )


def _result(
    case: Case, prepared: PreparedSystem, times: list[float], page_faults: int | None
) -> Result:
    """page_faults: the total over the timed steps, or None where they were not counted."""
    config, system, check = case.config, prepared.system, prepared.check
    median = statistics.median(times)
    return Result(
        **_what_ran(case, system),
        img_per_s=config.batch / median,
        ms_per_iter=median * 1e3,
        times_ms=[t * 1e3 for t in times],
        first_call_s=prepared.first_call_s,
        max_error=check.max_error,
        worst_tensor=check.worst,
        check_passed=check.passed,
        check_failures=check.failures[:5],
        worst_grad_error=check.worst_grad_error,
        worst_grad=check.worst_grad,
        peak_memory_bytes=prepared.peak_memory_bytes,
        memory_kind=prepared.memory_kind,
        page_faults_per_iter=None if page_faults is None else page_faults / len(times),
        denormals_flushed=prepared.denormals_flushed,
    )


def _failed_result(case: Case, system: System, error: Exception) -> Result:
    """The result of a system that could not be built, checked or warmed up: no timing, a
    failed check whose failure is the error (its first and last lines)."""
    lines = f"{type(error).__name__}: {error}".splitlines()
    if len(lines) > 5:
        lines = [lines[0], "...", *lines[-3:]]
    nan = float("nan")
    return Result(
        **_what_ran(case, system),
        img_per_s=nan,
        ms_per_iter=nan,
        times_ms=[],
        first_call_s=nan,
        max_error=float("inf"),
        worst_tensor="error",
        check_passed=False,
        check_failures=["\n".join(lines)],
        worst_grad_error=None,
        worst_grad=None,
        peak_memory_bytes=None,
        memory_kind="",
    )


def run_system(
    case: Case, system: System, iters: int, warmup: int, timer: Callable | None = None
) -> Result:
    """Prepares `system` for `case` (build, check, warm up), then times it alone.

    Args:
        timer: replaces `time_steps(step, device, iters, 0)` (pytest-benchmark passes its
            own); it returns the seconds per iteration.
    """
    prepared = prepare_system(case, system, warmup)
    step = prepared.runner.step
    before = minor_page_faults()
    times = time_steps(step, case.device, iters, 0) if timer is None else timer(step)
    result = _result(case, prepared, times, faults_since(before))
    del prepared, step
    free_memory()
    return result


# More than libgomp's default spin-wait (300,000 pauses, a few ms) before it sleeps.
SPIN_SETTLE_S = 0.05


class Isolated:
    """A `PreparedSystem` in a process of its own (`_isolated_worker`), stepped on request;
    `close()` stops that process. The process flushes subnormal floats where this one does."""

    def __init__(self, case: Case, system: System, warmup: int):
        self.system = system
        # Spawned, not forked: a fork would inherit this process's heap, threads and CUDA state.
        ctx = torch.multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        layouts = {system.channels_last}
        state = (case.config, case.seed, case.gold(), {k: case.base(k) for k in layouts})
        self._process = ctx.Process(
            target=_isolated_worker,
            args=(child, state, system, warmup, torch.get_num_threads(), flushes_denormals()),
            daemon=True,
        )
        self._process.start()
        child.close()
        try:
            (
                self.check,
                self.first_call_s,
                self.peak_memory_bytes,
                self.memory_kind,
                self.denormals_flushed,
            ) = self._receive()
        except BaseException:
            self.close()
            raise

    def _receive(self):
        try:
            ok, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the benchmark process of {self.system.name} died "
                f"(exit code {self._process.exitcode})"
            ) from None
        if not ok:
            raise RuntimeError(f"{self.system.name} failed in its benchmark process:\n{payload}")
        return payload

    def run_timed_step(self) -> Sample:
        # The system that stepped last is another process, whose OpenMP threads spin-wait for
        # a few milliseconds after its step (libgomp's default policy) on the cores this step
        # needs: let them go to sleep first.
        time.sleep(SPIN_SETTLE_S)
        self._conn.send("step")
        return self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send("stop")
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()


def _isolated_worker(
    conn, state, system: System, warmup: int, threads: int, flush_denormals: bool
) -> None:
    """The body of an `Isolated` system's process: prepare, then one step per "step" message."""
    try:
        # First: the OpenMP threads inherit the setting when the first parallel op creates them.
        set_flush_denormals(flush_denormals)
        torch.set_num_threads(threads)
        config, seed, gold, bases = state
        case = Case(config, seed)
        case._gold, case._bases = gold, bases
        ready = prepare_system(case, system, warmup)
        conn.send((True, (ready.check, ready.first_call_s, ready.peak_memory_bytes,
                          ready.memory_kind, ready.denormals_flushed)))  # fmt: skip
        while conn.recv() == "step":
            conn.send((True, ready.run_timed_step()))
    except Exception:  # reported to the parent, which raises it
        conn.send((False, traceback.format_exc()))
    finally:
        conn.close()


def isolates_by_default(device: torch.device | str) -> bool:
    """Whether `run_group` gives each system a process of its own on `device` (CPU).

    Systems in one process share the C library's heap: which of them takes page faults on
    fresh buffers, and how many, depends on what the others freed before it. In a process of
    its own each system runs as a user's training or inference process does. (CUDA memory
    comes from PyTorch's caching allocator, so GPU systems share a process.)
    """
    return torch.device(device).type == "cpu"


def run_group(
    case: Case,
    systems: Sequence[System],
    iters: int,
    warmup: int,
    on_phase: Callable[[str], None] | None = None,
    isolate: bool | None = None,
) -> list[Result]:
    """Prepares every system of `case`, then times them in turns, one step each per round.

    Taking turns spreads whatever else runs on the machine (other processes on shared CPU
    cores, GPU clock changes) over all systems alike, so the speedups stay fair when the
    absolute figures are noisy. A system whose preparation raises is not timed: its result
    carries the error as a failed check, and the other systems go on.

    Args:
        on_phase: called with a label as each system's preparation, then the timing, starts
            (progress display).
        isolate: each system in a process of its own (default:
            `isolates_by_default(case.device)`).
    """
    report = on_phase or (lambda label: None)
    if isolate is None:
        isolate = isolates_by_default(case.device)
    prepared: list[PreparedSystem] = []
    failed: dict[str, Result] = {}
    try:
        for system in systems:
            where = " (own process)" if isolate else ""
            report(f"{system.name}: build, check, warmup{where}")
            try:
                if isolate:
                    prepared.append(Isolated(case, system, warmup))
                else:
                    prepared.append(prepare_system(case, system, warmup))
            except Exception as error:
                # One broken system must not cost the figures of the others.
                traceback.print_exc()
                failed[system.name] = _failed_result(case, system, error)
        report(f"timing {len(prepared)} systems in turns, {iters} rounds")
        samples: list[list[Sample]] = [[] for _ in prepared]
        for _ in range(iters):
            for p, p_samples in zip(prepared, samples):
                p_samples.append(p.run_timed_step())
        timed = {p.system.name: _result(case, p, *_totals(s)) for p, s in zip(prepared, samples)}
        return [timed.get(s.name) or failed[s.name] for s in systems]
    finally:
        for p in prepared:
            p.close()
        del prepared
        free_memory()


def _totals(samples: list[Sample]) -> tuple[list[float], int | None]:
    """The seconds of each step, and the page faults of all of them (None if uncounted)."""
    faults = [s.page_faults for s in samples]
    return [s.seconds for s in samples], None if None in faults else sum(faults)
