"""What 'auto' costs on top of the work it chooses: the host time of finding each site's choice.

    python bench/results/cpu-select/choice_cost.py

Every choice is persisted beforehand (in a temporary cache directory), as after `fastres tune`.

1. One ResNet-50 block (layer3.0: two units and a tail with its downsample) under 'auto', each
   site's choice a no-op that returns the oracle's output computed beforehand: the selection and
   the executor alone. Best 5 of 21 rounds of 1,000 calls.
2. ResNet-50 inference on a 1x3x32x32 input (so that host time shows), 'native' against 'auto'
   whose every site chose native-onednn (native's own convolutions): min of 7 interleaved
   rounds of 20 forwards each.
"""

import functools
import os
import tempfile
import timeit
from collections.abc import Callable

import torch

import fastres
from fastres.backends import select
from fastres.backends.plan import REFERENCE, Implementation, run_block
from fastres.ops import tuning

_OUTPUTS = {}


class _Recorder(Implementation):
    def unit(self, unit, x):
        _OUTPUTS[unit.conv] = REFERENCE.unit(unit, x)
        return _OUTPUTS[unit.conv]

    def tail(self, unit, h, x, shortcut):
        _OUTPUTS[unit.conv] = REFERENCE.tail(unit, h, x, shortcut)
        return _OUTPUTS[unit.conv]


class _Replay(Implementation):
    def unit(self, unit, x):
        return _OUTPUTS[unit.conv]

    def tail(self, unit, h, x, shortcut):
        return _OUTPUTS[unit.conv]


def _persist(forward: Callable[[], object], name: str, x: torch.Tensor) -> int:
    """Persists `name` for every site `forward` visits; returns how many sites it has."""
    os.environ[tuning.TUNE_ENV_VAR] = "0"
    with select.recording() as choices:
        forward()
    del os.environ[tuning.TUNE_ENV_VAR]
    for choice in choices:
        select._SELECTIONS.put(select._device_key(x.device), choice.site, name)
    with select.recording() as choices:
        forward()
    assert {c.chosen for c in choices} == {name}, choices
    assert {c.how for c in choices} <= {"persisted", "cached"}, choices
    return len(choices)


def block_of_no_ops() -> float:
    """us per call of 'auto' on layer3.0 whose three sites chose `_Replay`."""
    select.UNIT_CANDIDATES["cpu"].insert(0, select.Candidate("replay", _Replay(), select._always))
    block = fastres.ResNet(depth=50).eval().layer3[0]
    x = torch.randn(1, 512, 4, 4).to(memory_format=torch.channels_last)
    auto = select.SelectingBackend()
    try:
        with torch.no_grad():
            run_block(_Recorder(), block.plan(), x)
            assert _persist(lambda: auto.run_block(block, x), "replay", x) == 3
            times = timeit.repeat(lambda: auto.run_block(block, x), number=1000, repeat=21)
    finally:
        select.UNIT_CANDIDATES["cpu"].pop(0)
    return sum(sorted(times)[:5]) / 5 / 1000 * 1e6


def small_forward() -> dict[str, float]:
    """ms per ResNet-50 forward at 1x3x32x32: 'native', and 'auto' choosing native-onednn."""
    x = torch.randn(1, 3, 32, 32).to(memory_format=torch.channels_last)
    models = {
        name: fastres.ResNet(depth=50, backend=name).eval().to(memory_format=torch.channels_last)
        for name in ("native", "auto")
    }
    best = dict.fromkeys(models, float("inf"))
    with torch.no_grad():
        _persist(lambda: models["auto"](x), "native-onednn", x)
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(7):
            for name, model in models.items():
                seconds = timeit.timeit(functools.partial(model, x), number=20)
                best[name] = min(best[name], seconds / 20 * 1e3)
    return best


if __name__ == "__main__":
    os.environ[tuning.CACHE_ENV_VAR] = tempfile.mkdtemp()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"auto, one block of no-op sites (2 units + tail): {block_of_no_ops():.1f} us")
    forward = small_forward()
    print(
        f"ResNet-50 forward 1x3x32x32: native {forward['native']:.2f} ms, "
        f"auto {forward['auto']:.2f} ms, difference {forward['auto'] - forward['native']:.2f} ms"
    )
