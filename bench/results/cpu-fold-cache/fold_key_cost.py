"""What the staleness check of the folded-weight caches costs (fastres/backends/fold_cache.py).

    PYTHONPATH=$PWD .venv/bin/python bench/results/cpu-fold-cache/fold_key_cost.py

"before" is the key of c6dbb4f (each folded tensor's storage and version, eps), "after"
`fold_cache.fold_key` (the same, plus num_batches_tracked's version and the process-wide
generation); the native backend's `_folded` is the only per-forward code that changed, so the
script swaps its key function in place and times both in one process:

1. the key alone, built and compared as `_folded` does, for one unit: the main thread's CPU
   time (a shared machine deschedules it), before and after in turns, 15 rounds of 3 x 20,000
   calls each; the least per-call time;
2. ResNet-18 and ResNet-50 inference (no_grad, eval) on a 1x3x32x32 input (so that host time
   shows), backends 'native' and 'auto' (every site natively prepacked, nothing tuned), each
   forward calling the key once per fused unit: rounds of 10 forwards, before and after in
   turns (41 rounds each); min and median of the per-round means;
3. what an invalidation costs (after any optimizer step, train() / eval() switch, ...): the
   first forward after `fold_cache.invalidate()`, which folds and prepacks every unit again,
   against a forward with every fold cached: median of 11; and the same for the training
   forward of the detection preset (ResNet-50, frozen_stages=1, norm_eval=True: the frozen stem
   and stage 1 run folded), which refolds those units after every optimizer step.
"""

import math
import os
import statistics
import time
import timeit

os.environ.setdefault("FASTRES_TRITON_TUNE", "0")  # 'auto': the default candidates, untimed

import torch  # noqa: E402

import fastres  # noqa: E402
from fastres.backends import fold_cache, native  # noqa: E402
from fastres.testing import randomize_norms  # noqa: E402


def _version_key(*tensors):
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def before_key(conv, bn) -> tuple:
    """c6dbb4f's key (without the shape, which `_folded` adds in both)."""
    return (
        _version_key(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var),
        bn.eps,
    )


KEYS = {"before": before_key, "after": fold_cache.fold_key}


def key_alone() -> dict[str, float]:
    """ns per key built and compared, for ResNet-50's layer3.0.conv2 / bn2."""
    block = fastres.ResNet(depth=50).layer3[0]
    conv, bn, shape = block.conv2, block.bn2, (1, 256, 4, 4)
    best = dict.fromkeys(KEYS, math.inf)
    for _ in range(15):
        for name, key in KEYS.items():
            stored = (key(conv, bn), shape)
            times = timeit.repeat(
                lambda key=key, stored=stored: (key(conv, bn), shape) == stored,
                number=20_000,
                repeat=3,
                timer=time.thread_time,
            )
            best[name] = min(best[name], min(times) / 20_000 * 1e9)
    return best


def forwards(depth: int, backend: str) -> dict[str, tuple[float, float]]:
    """ms per forward (min, median of the rounds) with each key."""
    model = randomize_norms(fastres.ResNet(depth=depth, zero_init_residual=False))
    model = model.eval().set_backend(backend)
    x = torch.randn(1, 3, 32, 32)
    rounds = {name: [] for name in KEYS}
    with torch.no_grad():
        for _ in range(41):
            for name, key in KEYS.items():
                native.fold_key = key
                model(x)  # folds again: the key's structure changed
                rounds[name].append(timeit.timeit(lambda: model(x), number=10) / 10 * 1e3)
    native.fold_key = fold_cache.fold_key
    return {name: (min(r), statistics.median(r)) for name, r in rounds.items()}


def refold(depth: int, detection: bool = False) -> tuple[float, float]:
    """ms of a 'native' forward after an invalidation, and with every fold cached (medians):
    inference, or (`detection`) the detection preset's training forward."""
    kwargs = dict(frozen_stages=1, norm_eval=True) if detection else {}
    model = randomize_norms(fastres.ResNet(depth=depth, zero_init_residual=False, **kwargs))
    model = model.train(detection).set_backend("native")
    x = torch.randn(1, 3, 32, 32)
    cold, warm = [], []
    with torch.set_grad_enabled(detection):
        model(x)
        for _ in range(11):
            fold_cache.invalidate()
            cold.append(timeit.timeit(lambda: model(x), number=1) * 1e3)
            warm.append(timeit.timeit(lambda: model(x), number=1) * 1e3)
    return statistics.median(cold), statistics.median(warm)


def units(depth: int) -> int:
    model = fastres.ResNet(depth=depth)
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    alone = key_alone()
    print(
        f"key per unit: before {alone['before']:.0f} ns, after {alone['after']:.0f} ns, "
        f"difference {alone['after'] - alone['before']:+.0f} ns"
    )
    for depth in (18, 50):
        n = units(depth)
        extra = (alone["after"] - alone["before"]) * n / 1e3
        print(f"ResNet-{depth}: {n} fused units, key difference x units = {extra:+.1f} us/forward")
        for backend in ("native", "auto"):
            t = forwards(depth, backend)
            (b_min, b_med), (a_min, a_med) = t["before"], t["after"]
            print(
                f"  {backend:6s} 1x3x32x32 ms/forward: before min {b_min:.3f} median {b_med:.3f}"
                f" | after min {a_min:.3f} median {a_med:.3f}"
                f" | after/before median {a_med / b_med:.3f}"
            )
        cold, warm = refold(depth)
        print(f"  native forward after an invalidation {cold:.2f} ms, cached {warm:.2f} ms")
    cold, warm = refold(50, detection=True)
    print(
        f"ResNet-50 detection preset, training forward 1x3x32x32: after an invalidation "
        f"{cold:.2f} ms, cached {warm:.2f} ms"
    )
