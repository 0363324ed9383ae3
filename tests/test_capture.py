"""A step that CUDA graphs can capture (issue 25): no host synchronisation and no allocation
whose size depends on data in any forward or backward of any backend, and nothing timed inside
a capture.

Without a GPU the forward and backward run on CPU tensors (the Python path a CUDA step takes,
Triton through its interpreter) under `HostSyncGuard`, a dispatch mode that fails on every op
that makes the host wait for the device: reading a value (`.item()`, `int(t)`, `bool(t)`,
`torch.equal`) or producing a shape from values (`nonzero`, boolean indexing, `unique`, ...).
Tuning and selection run in a warm-up call first, as before a capture; inside a capture (the
check stood in for by a patched `tuning.capturing`) they are refused with a clear error.
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.backends import fold_cache, select
from fastres.ops import batchnorm, tuning
from fastres.testing import assert_matches_oracle, randomize_norms

aten = torch.ops.aten

# Ops that read a device value on the host, or whose output shape depends on values.
HOST_SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), int(t), float(t)
    aten.item,
    aten.is_nonzero,  # bool(t), `if t:`
    aten.equal,
    aten.allclose,
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten.masked_scatter,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.repeat_interleave,
    aten.bincount,
}

# Ops whose result is sized by the values of a boolean index (`x[mask]`).
MASK_INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_mask(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


class HostSyncGuard(TorchDispatchMode):
    """Fails on every op of `HOST_SYNC_OPS`, and on a copy from a CUDA tensor to the host.
    fastres runs under it as without a mode (`SEES_THROUGH_FASTRES`): what a step runs is
    checked."""

    SEES_THROUGH_FASTRES = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in HOST_SYNC_OPS:
            self._fail(f"{func} reads device values on the host")
        if func.overloadpacket in MASK_INDEXING_OPS and _has_mask(args[1]):
            self._fail(f"{func} with a boolean mask sizes its result from values")
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten._to_copy, aten.copy_) and _to_host(args, out):
            self._fail(f"{func} copies a CUDA tensor to the host")
        return out

    @staticmethod
    def _fail(what: str):
        where = "".join(traceback.format_stack(limit=12)[:-2])
        raise AssertionError(f"host synchronisation: {what}, at\n{where}")


def _to_host(args, out) -> bool:
    source = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    target = args[0] if isinstance(out, torch.Tensor) and out is args[0] else out
    return (
        isinstance(source, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and source.is_cuda
        and not target.is_cuda
    )


def test_the_guard_fails_on_each_kind_of_host_synchronisation():
    """The guard is no test unless it fails: every way the code could wait for the device."""
    x = torch.randn(8)
    waits = [
        lambda: x.sum().item(),
        lambda: int(x.argmax()),
        lambda: float(x.max()),
        lambda: bool(x.sum() > 0),
        lambda: torch.equal(x, x),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: x.clone().index_put_((x > 0,), torch.zeros(())),
        lambda: torch.unique(x),
        lambda: torch.repeat_interleave(x, (x > 0).long()),
    ]
    for wait in waits:
        with pytest.raises(AssertionError, match="host synchronisation"), HostSyncGuard():
            wait()
    with HostSyncGuard():  # what a step does: no wait
        (x * 2).relu().sum(0, keepdim=True)[torch.zeros(1, dtype=torch.long)]


TINY = dict(base_channels=8, zero_init_residual=False)
MODELS = {
    "resnet50": lambda **kw: fastres.ResNet(depth=50, **TINY, **kw),
    "res2net50": lambda **kw: fastres.Res2Net(depth=50, base_width=4, scales=4, **TINY, **kw),
}
# eval: inference; train: BatchNorm on batch statistics; norm_eval: BN frozen, conv training.
MODES = {"eval": dict(norm_eval=False), "train": dict(norm_eval=False), "norm_eval": {}}
BACKENDS = ["torch", "native", "auto", "triton"]


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
    """A forward, and for training its backward; the outputs."""
    with torch.set_grad_enabled(train):
        outs = list(model(x))
        if train:
            sum(o.float().square().mean() for o in outs).backward()
    return [o.detach() for o in outs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_a_step_waits_for_nothing_after_a_warm_up(arch, mode, backend, device, monkeypatch):
    """Forward (and backward in training) of every backend, after one warm-up call that tunes
    and chooses: no op reads a device value on the host or sizes a result from one."""
    device = torch.device(device)
    if backend == "triton" and device.type == "cpu":
        pytest.importorskip("triton")
        from fastres.backends import triton

        if triton.BACKEND.unavailable_reason("cpu") is not None:
            pytest.skip("the Triton interpreter is off")
    monkeypatch.setattr(select, "_TIMED_RUNS", 1)  # 'auto' tunes in the warm-up: not timed here
    model = randomize_norms(MODELS[arch](**MODES[mode])).train(mode != "eval").to(device)
    oracle = copy.deepcopy(model).set_backend("torch")
    gold = copy.deepcopy(oracle).double()
    model.set_backend(backend)
    train = mode != "eval"
    x = torch.randn(2, 3, 16, 16, device=device)
    _step(model, x, train)  # the warm-up: tuning, selection, folded weights
    with HostSyncGuard():
        outs = _step(model, x, train)
    # The guard changes nothing it lets through: inference's output is still the oracle's
    # (training's is checked by the tests of each backend, without the guard's cost).
    if mode == "eval":
        base, gold_out = _step(oracle, x, train), _step(gold, x.double(), train)
        for i, (y, b, g) in enumerate(zip(outs, base, gold_out)):
            assert_matches_oracle(y, b, g, torch.float32, f"{backend} {mode} output {i}")


# -- inside a capture --------------------------------------------------------------------------


@pytest.fixture
def capturing(monkeypatch):
    """Stands in for a CUDA graph capture on every device."""
    monkeypatch.setattr(tuning, "capturing", lambda device: True)


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Nothing chosen or tuned yet: a cache directory and process state of this test's own."""
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(select.SELECT_ENV_VAR, raising=False)
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    monkeypatch.setattr(tuning, "_CONFIGS", tuning.JsonCache(tuning.CACHE_FILE))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(tuning, "device_key", lambda device: "Fake GPU | torch 0 | triton 0")


def _auto_model(train: bool) -> torch.nn.Module:
    model = fastres.ResNet(depth=18, **TINY, norm_eval=False)
    return randomize_norms(model).train(train).set_backend("auto")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_auto_refuses_to_choose_inside_a_capture(fresh, monkeypatch, train):
    """A site that would be tuned raises inside a capture, saying what to do; nothing is timed."""
    monkeypatch.setattr(select, "_tune", lambda *args: pytest.fail("timed inside a capture"))
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    with pytest.raises(tuning.CaptureError, match="run the model once on the same shapes"):
        _step(_auto_model(train), torch.randn(2, 3, 32, 32), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_auto_inside_a_capture_uses_the_choices_of_the_warm_up(fresh, monkeypatch, train):
    """After a warm-up call every site is known: the captured step chooses without timing and
    runs what the warm-up chose, with the same result."""
    model = _auto_model(train)
    x = torch.randn(2, 3, 32, 32)
    with select.recording() as warm_up:
        _step(model, x, train)
    assert any(c.how == "tuned" for c in warm_up)
    chosen = {(id(c.module), c.site): c.chosen for c in warm_up}
    monkeypatch.setattr(select, "_tune", lambda *args: pytest.fail("timed inside a capture"))
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    with select.recording() as captured:
        _step(model, x, train)
    assert {(id(c.module), c.site): c.chosen for c in captured} == chosen
    assert {c.how for c in captured} <= {"cached", "only"}


def test_auto_without_tuning_runs_its_default_inside_a_capture(fresh, monkeypatch, capturing):
    """FASTRES_TRITON_TUNE=0 times nothing anywhere: a capture is no reason to refuse."""
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    with select.recording() as choices:
        _step(_auto_model(False), torch.randn(2, 3, 32, 32), False)
    assert choices and {c.how for c in choices} <= {"default", "only"}


def test_triton_tuning_is_refused_inside_a_capture_and_known_choices_are_used(fresh, monkeypatch):
    """The Triton launch configurations: a known one is used inside a capture, one that would
    be timed raises; untimed (FASTRES_TRITON_TUNE=0) the first candidate is used."""
    monkeypatch.setattr(tuning, "_tune", lambda key, candidates, *args: candidates[-1])
    cuda = torch.device("cuda")
    candidates = [{"BLOCK_M": 16 << i} for i in range(int(torch.randint(2, 6, ())))]
    known = tuning.choose(cuda, "conv known", candidates, None, None)
    monkeypatch.setattr(tuning, "capturing", lambda device: True)
    assert tuning.choose(cuda, "conv known", candidates, None, None) == known
    with pytest.raises(tuning.CaptureError, match="conv new"):
        tuning.choose(cuda, "conv new", candidates, None, None)
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    assert tuning.choose(cuda, "conv new", candidates, None, None) == candidates[0]


def test_a_fold_is_captured_never_taken_from_the_cache(capturing):
    """Inside a capture a cached fold would enter the graph as a constant, and every replay
    would use the weights of the last eager call: no fold key made in a capture matches."""
    conv, bn = torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4).eval()
    assert fold_cache.fold_key(conv, bn) != fold_cache.fold_key(conv, bn)


def test_sync_batchnorm_statistics_refuse_a_capture(capturing):
    """SyncBN's merged count is read on the host (the variance's unbiasing and the
    one-value check need it): inside a capture that is refused, naming the way out."""
    mean, m2 = torch.randn(4), torch.rand(4)
    with pytest.raises(tuning.CaptureError, match="SyncBatchNorm"):
        batchnorm.sync_batch_stats(mean, m2, 8, "group")
