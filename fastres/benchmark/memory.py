"""What a system costs besides time: its peak memory (`MemoryMeter`) and the minor page faults
of its steps (`minor_page_faults`)."""

from __future__ import annotations

import gc

import torch

from .. import cpu_cache
from .systems import synchronize

try:
    import resource
except ImportError:  # not a Unix: page faults are not counted
    resource = None


def free_memory() -> None:
    """Returns cached memory, so that the next peak measurement starts from a clean slate."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # glibc keeps freed heap pages; without trimming, RSS deltas under-report.
    cpu_cache.trim_heap()


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryMeter:
    """Peak memory of one system, as a delta over the memory in use before it was built.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only, not the allocator's cache).
    CPU: the process's peak resident set (VmHWM in /proc/self/status), whose high-water mark
    Linux resets when "5" is written to /proc/self/clear_refs; without that (not Linux, or not
    permitted) the peak is reported as None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu peak RSS"
        self.baseline = 0
        self.resettable = True

    def _current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        kib = _proc_status_kib("VmRSS")
        return 0 if kib is None else kib * 1024

    def free_and_set_baseline(self) -> None:
        """Frees cached memory (`free_memory`), then takes the memory in use as the baseline.
        Call before the system's model is built."""
        free_memory()
        synchronize(self.device)
        self.baseline = self._current()

    def reset_peak(self) -> None:
        """Call after the correctness check, before the timed iterations."""
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def peak(self) -> int | None:
        """Bytes above the baseline at the peak since `reset_peak`."""
        synchronize(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = _proc_status_kib("VmHWM")
        if hwm is None or not self.resettable:
            return None
        return hwm * 1024 - self.baseline


def minor_page_faults() -> int | None:
    """This process's minor page faults so far, all threads (None where they are not counted).

    On CPU they are first touches of memory that the C library had returned to the kernel, and
    they cost: glibc gives large freed blocks back, so a step that allocates fresh activation
    buffers faults every 4 KiB page of them in again (tens of thousands per ResNet-50 step).
    """
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_since(before: int | None) -> int | None:
    """The minor page faults since `minor_page_faults()` returned `before`."""
    return None if before is None else minor_page_faults() - before
