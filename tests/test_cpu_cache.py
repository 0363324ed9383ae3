"""The native backend's CPU block cache (fastres.cpu_cache, csrc/cpu/block_cache.cpp)."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import fastres
from fastres import ResNet, cpu_cache
from fastres.extension import EXTENSION_ERROR

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

CPU = torch.device("cpu")
MIB = 1 << 20


@pytest.fixture(autouse=True)
def empty_cache():
    cpu_cache.release()
    yield
    cpu_cache.release()


def _delta(before: cpu_cache.CacheStats, after: cpu_cache.CacheStats) -> dict[str, int]:
    return {name: getattr(after, name) - getattr(before, name) for name in ("hits", "misses")}


def test_a_freed_block_serves_the_next_allocation_of_its_size():
    with cpu_cache.scope(CPU):
        first = torch.rand(MIB)  # 4 MiB
        ptr = first.data_ptr()
        assert cpu_cache.stats().live_bytes == 4 * MIB
        del first
        assert cpu_cache.stats().cached_bytes == 4 * MIB
        before = cpu_cache.stats()
        second = torch.empty(MIB)
        assert second.data_ptr() == ptr
        assert _delta(before, cpu_cache.stats()) == {"hits": 1, "misses": 0}
        assert cpu_cache.stats().cached_bytes == 0


def test_small_allocations_and_allocations_outside_a_scope_are_not_cached():
    before = cpu_cache.stats()
    outside = torch.empty(2 * MIB)
    with cpu_cache.scope(CPU):
        small = torch.empty(MIB // 4 - 1)  # just under 1 MiB
    assert cpu_cache.stats() == before
    del outside, small
    assert cpu_cache.stats() == before


def test_other_threads_are_not_cached():
    held = []
    worker = threading.Thread(target=lambda: held.append(torch.empty(2 * MIB)))
    with cpu_cache.scope(CPU):
        before = cpu_cache.stats()
        worker.start()
        worker.join()
    assert cpu_cache.stats().live_bytes == before.live_bytes
    assert held[0].numel() == 2 * MIB


def test_a_cached_tensor_outlives_its_scope():
    with cpu_cache.scope(CPU):
        kept = torch.arange(MIB, dtype=torch.float32)
    assert kept[-1].item() == MIB - 1
    assert cpu_cache.stats().live_bytes == 4 * MIB
    del kept
    assert cpu_cache.stats().live_bytes == 0
    assert cpu_cache.stats().cached_bytes == 4 * MIB


def test_blocks_no_allocation_takes_are_freed_after_256_scopes():
    with cpu_cache.scope(CPU):
        torch.empty(MIB)  # freed at once
    assert cpu_cache.stats().cached_bytes == 4 * MIB
    for _ in range(200):
        with cpu_cache.scope(CPU):
            pass
    assert cpu_cache.stats().cached_bytes == 4 * MIB  # still inside the window
    for _ in range(100):
        with cpu_cache.scope(CPU):
            pass
    assert cpu_cache.stats().cached_bytes == 0


def test_a_block_taken_again_stays_cached():
    before = cpu_cache.stats()
    for _ in range(20):
        with cpu_cache.scope(CPU):
            torch.empty(MIB)
        for _ in range(100):
            with cpu_cache.scope(CPU):
                pass
    assert cpu_cache.stats().cached_bytes == 4 * MIB
    assert _delta(before, cpu_cache.stats()) == {"hits": 19, "misses": 1}


def test_release_frees_what_is_cached_and_paused_allocations_are_not_cached():
    with cpu_cache.scope(CPU):
        torch.empty(MIB)  # freed at once
        with cpu_cache.paused():
            weights = torch.empty(2 * MIB)
        assert cpu_cache.stats().live_bytes == 0
        more = torch.empty(3 * MIB)  # the scope is back after the pause
    assert cpu_cache.stats().live_bytes == 12 * MIB
    cpu_cache.release()
    assert cpu_cache.stats().cached_bytes == 0
    del weights, more
    assert cpu_cache.stats().cached_bytes == 12 * MIB  # a block held during release comes back


def test_the_native_backend_repeats_a_forward_from_cached_blocks():
    torch.manual_seed(0)
    model = ResNet(depth=18, backend="native").eval()
    x = torch.randn(4, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        first = model(x)
        del first
        before = cpu_cache.stats()
        second = model(x)
    delta = _delta(before, cpu_cache.stats())
    assert delta["misses"] == 0 and delta["hits"] > 0
    model.set_backend("torch")
    with torch.no_grad():
        torch.testing.assert_close(second, model(x), rtol=1e-4, atol=1e-4)


def test_a_native_training_step_reuses_the_last_steps_blocks():
    torch.manual_seed(0)
    model = ResNet(depth=18, backend="native").train()
    x = torch.randn(4, 3, 96, 96)
    # The first backward allocates the gradients (kept), the second settles what remains.
    for _ in range(2):
        model(x)[-1].sum().backward()
    before = cpu_cache.stats()
    model(x)[-1].sum().backward()
    delta = _delta(before, cpu_cache.stats())
    assert delta["misses"] == 0 and delta["hits"] > 0


def _allocation_is_cached() -> bool:
    before = cpu_cache.stats().live_bytes
    probe = torch.empty(MIB)
    cached = cpu_cache.stats().live_bytes == before + 4 * MIB
    del probe
    return cached


def test_a_native_backward_runs_in_a_scope_from_the_model_to_its_end():
    torch.manual_seed(0)
    model = ResNet(depth=18, backend="native").train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    outs = model(x)
    seen = {}

    def probe(name):
        def hook(grad):
            seen[name] = _allocation_is_cached()

        return hook

    # The head's gradient runs before the backward reaches the model; the input's, last.
    outs[-1].register_hook(probe("head"))
    x.register_hook(probe("input"))
    before = cpu_cache.stats()
    (outs[-1] * 2).sum().backward()
    assert seen == {"head": False, "input": True}
    assert cpu_cache.stats().hits + cpu_cache.stats().misses > before.hits + before.misses
    assert not _allocation_is_cached()  # closed when the backward pass ended


def test_a_failed_native_backward_leaves_a_scope_the_next_forward_closes():
    torch.manual_seed(0)
    model = ResNet(depth=18, backend="native").train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)

    def fail(grad):
        raise RuntimeError("failed in backward")

    x.register_hook(fail)
    with pytest.raises(RuntimeError, match="failed in backward"):
        model(x)[-1].sum().backward()
    assert _allocation_is_cached()  # the end-of-pass callback did not run
    model(x.detach())
    assert not _allocation_is_cached()


def test_torch_profiler_sees_cached_blocks():
    with cpu_cache.scope(CPU):
        torch.empty(MIB)  # the block the profiled allocation takes
    with torch.profiler.profile(profile_memory=True) as prof, cpu_cache.scope(CPU):
        torch.empty(MIB)
    usage = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage]
    assert 4 * MIB in usage and -4 * MIB in usage


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_frees_and_takes_cached_blocks():
    """DataLoader workers are forked: the child frees the parent's blocks and caches its own."""
    with cpu_cache.scope(CPU):
        inherited = torch.empty(MIB)
    pid = os.fork()
    if pid == 0:  # the child: no pytest from here on, only an exit status
        status = 1
        try:
            del inherited
            with cpu_cache.scope(CPU):
                taken = torch.empty(MIB)
            status = 0 if cpu_cache.stats().live_bytes == 4 * MIB and taken.numel() else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert cpu_cache.stats().live_bytes == 4 * MIB  # the parent's block is still its own


# One eval run in a fresh process: ResNet-18, a forward at batch 2, 224 px (its blocks stay
# cached), then batch 1 at the input sizes of argv[2], then `release()`. Prints the resident
# memory figures (VmRSS) as JSON.
_RSS_AT_MANY_SIZES = """
import json, sys
import torch
import fastres
from fastres import cpu_cache

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

backend, sizes, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(seed)
model = fastres.ResNet(depth=18, backend=backend).eval()
with torch.no_grad():
    model(torch.randn(2, 3, 224, 224))
    start = rss()
    for h, w in sizes:
        model(torch.randn(1, 3, h, w))
grown = rss() - start
cached = cpu_cache.stats().cached_bytes
before_release = rss()
cpu_cache.release()
print(json.dumps({"grown": grown, "cached": cached, "released": before_release - rss()}))
"""


def _rss_at_many_sizes(backend: str, sizes: list[tuple[int, int]], seed: int) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _RSS_AT_MANY_SIZES, backend, json.dumps(sizes), str(seed)],
        capture_output=True, text=True, cwd=Path(fastres.__file__).parents[1],  # this fastres
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_native_memory_at_many_input_sizes_stays_near_the_oracles_and_release_returns_it():
    """A new input size prepacks every weight again; the memory that churn leaves behind must
    not pile up (it once grew ~9 MiB a forward in glibc's heap, which release() kept)."""
    sizes = torch.randint(32, 97, (24, 2)).tolist()
    seed = int(torch.randint(2**31, ()))
    oracle = _rss_at_many_sizes("torch", sizes, seed)
    native = _rss_at_many_sizes("native", sizes, seed)
    # The budget: the block cache's blocks (a few forwards at these sizes) and the oneDNN
    # primitives of the new shapes (its primitive cache holds at most 1024).
    assert native["grown"] <= 1.5 * oracle["grown"] + 64 * MIB, (native, oracle)
    assert native["cached"] > 0
    assert native["released"] >= 0.75 * native["cached"], native
