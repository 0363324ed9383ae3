"""The 'auto' selection (fastres/backends/select.py): candidates are checked against the oracle
before they may win, the choices persist across processes, FASTRES_SELECT forces one, and
tuning leaves the model as it was."""

import copy
import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch import nn

import fastres
from fastres.backends import select
from fastres.backends.base import ORACLE, Backend
from fastres.backends.plan import REFERENCE, Implementation
from fastres.ops import tuning
from fastres.testing import assert_matches_oracle, randomize_norms


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A selection state of this test's own: nothing chosen, an empty cache directory."""
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(select.SELECT_ENV_VAR, raising=False)
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))
    return tmp_path / "cache" / select.SELECTION_FILE


def _model(train: bool = False, depth: int = 18) -> nn.Module:
    model = fastres.ResNet(depth=depth, base_channels=8, zero_init_residual=False, norm_eval=False)
    return randomize_norms(model).train(train)


def _run(model: nn.Module, x: torch.Tensor, train: bool = False) -> list[select.Choice]:
    with select.recording() as choices:
        if train:
            model(x)[-1].sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return choices


class _FakeClock:
    """The selection's clock in these tests: only `_Slow` candidates move it, so the timings
    are what the test says, whatever else the machine runs."""

    def __init__(self):
        self.now = 0.0
        self.loaded_until = 0.0  # until then `_Costly` candidates take three times as long

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> _FakeClock:
    fake = _FakeClock()
    monkeypatch.setattr(select, "_clock", fake)
    return fake


class _Slow(Implementation, Backend):
    """Another candidate that takes 5 ms per call (on the fake clock)."""

    def __init__(self, inner, clock: _FakeClock):
        self.inner, self.clock = inner, clock

    def _call(self, method: str, *args):
        self.clock.now += 0.005
        return getattr(self.inner, method)(*args)

    def unit(self, *args):
        return self._call("unit", *args)

    def tail(self, *args):
        return self._call("tail", *args)

    def output(self, h):
        return self.inner.output(h)

    def run_block(self, *args):
        return self._call("run_block", *args)

    def run_stem(self, *args):
        return self._call("run_stem", *args)


class _OffByOnePercent(Implementation):
    """The oracle's units, 1% off: the fastest candidate, and wrong."""

    def unit(self, unit, x):
        return REFERENCE.unit(unit, x) * 1.01

    def tail(self, unit, h, x, shortcut):
        return REFERENCE.tail(unit, h, x, shortcut) * 1.01


class _ScaledGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g * 1.5


class _WrongGradient(Backend):
    """The oracle's blocks with a right forward and a backward 1.5x too large."""

    name = "wrong"

    def run_block(self, block, x):
        return _ScaledGrad.apply(block.forward_reference(x))

    def run_stem(self, model, x):
        return _ScaledGrad.apply(model.stem_reference(x))


class _Costly(Implementation):
    """The oracle's units at `cost` seconds a call on the fake clock (three times that while
    the machine is loaded, `_FakeClock.loaded_until`)."""

    def __init__(self, clock: _FakeClock, cost: float):
        self.clock, self.cost = clock, cost

    def _charge(self) -> None:
        self.clock.now += self.cost * (3 if self.clock.now < self.clock.loaded_until else 1)

    def unit(self, unit, x):
        self._charge()
        return REFERENCE.unit(unit, x)

    def tail(self, unit, h, x, shortcut):
        self._charge()
        return REFERENCE.tail(unit, h, x, shortcut)


def _table(*candidates):
    return {"cpu": list(candidates)}


def test_a_candidate_that_disagrees_with_the_oracle_is_never_chosen(fresh, monkeypatch, clock):
    """The wrong candidate is the fastest; a right one just as fast wins where it is offered
    (so the test would see the wrong one win if the check let it)."""
    always = select._always
    slow = [
        select.Candidate("native", _Slow(select.native.UNITS, clock), select.native.runs_units),
        select.Candidate("torch", _Slow(REFERENCE, clock), always),
    ]
    monkeypatch.setattr(
        select,
        "UNIT_CANDIDATES",
        _table(select.Candidate("wrong", _OffByOnePercent(), always), *slow),
    )
    model, x = _model(), torch.randn(2, 3, 32, 32)
    choices = _run(model, x)
    assert choices and all(c.chosen != "wrong" for c in choices)
    tuned = [c for c in choices if c.how == "tuned"]
    assert tuned and all(c.times_ms["wrong"] is None for c in tuned)
    assert all(c.times_ms["torch"] is not None for c in tuned)

    fast_and_right = select.Candidate("right", REFERENCE, always)
    monkeypatch.setattr(select, "UNIT_CANDIDATES", _table(fast_and_right, *slow))
    monkeypatch.setattr(select, "_CHOSEN", select._Choices())
    monkeypatch.setenv(tuning.CACHE_ENV_VAR, str(fresh.parent.parent / "other"))
    monkeypatch.setattr(select, "_SELECTIONS", tuning.JsonCache(select.SELECTION_FILE))
    assert all(c.chosen == "right" for c in _run(model, x))


@pytest.mark.parametrize("challenger_ms", [1.2, 0.8])
def test_a_load_spike_does_not_choose_a_slower_candidate(fresh, monkeypatch, clock, challenger_ms):
    """The machine is loaded (3x slower) while the default runs its first timings, and quiet
    after: the candidates take turns, so the spike hits a round of each, not the default's
    every run. A slower challenger (1.2 ms against 1 ms) does not win the site; a faster one
    (0.8 ms) does. Timed one candidate after the other, the slower one won."""
    always = select._always
    default = select.Candidate("native", _Costly(clock, 1e-3), always)
    challenger = select.Candidate("challenger", _Costly(clock, challenger_ms * 1e-3), always)
    oracle = select.Candidate("torch", _Slow(REFERENCE, clock), always)
    monkeypatch.setattr(select, "UNIT_CANDIDATES", _table(default, challenger, oracle))
    clock.loaded_until = 0.030  # the oracle's base run, then the default's first timings
    first = next(c for c in _run(_model(), torch.randn(2, 3, 32, 32)) if c.how == "tuned")
    assert first.chosen == ("challenger" if challenger_ms < 1 else "native"), first


def test_timed_runs_use_the_cpu_block_cache_as_the_model_does(fresh, monkeypatch):
    """Native's training blocks run in their CPU block cache scope in the model, which spares
    them the page faults of fresh buffers: timed without it, they would lose sites to the
    oracle that they win in the model. The stem's 2 MiB buffers come from the cache while its
    candidates are timed."""
    from fastres import cpu_cache

    if select.native.BACKEND.unavailable_reason("cpu") is not None:
        pytest.skip("the extension is not built")
    hits = []
    timed_rounds = select._timed_rounds

    def counting(*args):
        before = cpu_cache.stats().hits
        runs = timed_rounds(*args)
        hits.append(cpu_cache.stats().hits - before)
        return runs

    monkeypatch.setattr(select, "_timed_rounds", counting)
    monkeypatch.setattr(select, "_TIMED_RUNS", 3)
    model = fastres.ResNet(depth=18, stem_channels=64, base_channels=8, zero_init_residual=False)
    stem = select._BlockSite(randomize_norms(model).train(), torch.randn(2, 3, 128, 128), True)
    select._tune(stem, select.BLOCK_CANDIDATES["cpu"], "native")
    assert hits and hits[0] > 0


def test_a_block_whose_gradient_disagrees_is_never_chosen(fresh, monkeypatch, clock):
    """In training mode the candidates are whole blocks, checked on their gradients too."""
    always = select._always
    monkeypatch.setattr(
        select,
        "BLOCK_CANDIDATES",
        _table(
            select.Candidate("wrong", _WrongGradient(), always),
            select.Candidate("torch", _Slow(ORACLE, clock), always),
        ),
    )
    model = _model(train=True)
    choices = _run(model, torch.randn(2, 3, 32, 32), train=True)
    tuned = [c for c in choices if c.how == "tuned"]
    assert tuned and {c.chosen for c in choices} == {"torch"}
    assert all(c.times_ms["wrong"] is None for c in tuned)


class _WrongGradientOnce(Backend):
    """The oracle's blocks, with a backward 1.5x too large on its first call only: what one
    pre-activation rounding across a ReLU kink does to a BatchNorm's gradients on one input."""

    name = "once"

    def __init__(self):
        self.calls = 0

    def run_block(self, block, x):
        self.calls += 1
        y = block.forward_reference(x)
        return _ScaledGrad.apply(y) if self.calls == 1 else y

    def run_stem(self, model, x):
        return model.stem_reference(x)


def test_a_gradient_that_misses_on_one_input_only_is_checked_again(fresh, monkeypatch, clock):
    """A candidate whose gradient misses on the site's inputs and agrees on fresh ones is a
    candidate (a kink flip); one that misses on every input is not (the test above)."""
    once = _WrongGradientOnce()
    block_site = select._BlockSite(_model(train=True).layer1[0], torch.randn(2, 8, 8, 8))
    table = [select.Candidate("once", once, select._always)]
    table.append(select.Candidate("torch", _Slow(ORACLE, clock), select._always))
    chosen, times = select._tune(block_site, table, "torch")
    assert chosen.name == "once" and times["once"] is not None
    assert once.calls > 2  # the first check, the one on fresh inputs, the timed rounds


def test_tuning_leaves_statistics_and_gradients_as_one_oracle_step_does(fresh):
    """Trials run each candidate several times: running statistics and .grad must still end up
    as after one forward + backward of the oracle. In float64, where every candidate computes
    the same math (no rounding across a ReLU kink), so any trace of a trial would show."""
    model, x = _model(train=True).double(), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    oracle = copy.deepcopy(model).set_backend("torch")
    choices = _run(model, x, train=True)
    assert any(c.how == "tuned" for c in choices)
    oracle(x)[-1].sum().backward()
    buffers = dict(oracle.named_buffers())
    for name, value in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(value, buffers[name]), name
        else:
            assert_matches_oracle(value, buffers[name], buffers[name], torch.float64, name)
    grads = {n: p.grad for n, p in oracle.named_parameters()}
    for name, p in model.named_parameters():
        assert_matches_oracle(p.grad, grads[name], grads[name], torch.float64, name)


def test_tuning_keeps_nothing_of_the_model_alive(fresh):
    """Trials in training mode take gradients under saved-tensor hooks: nothing of them may
    outlive the model (a graph held through C++ is beyond the garbage collector)."""
    model = _model(train=True)
    choices = _run(model, torch.randn(2, 3, 32, 32), train=True)
    assert any(c.how == "tuned" for c in choices)
    weight = weakref.ref(model.layer4[1].conv2.weight)
    del model, choices
    gc.collect()
    assert weight() is None


def test_the_persisted_choice_is_reused_by_a_new_process(fresh):
    # channels_last in and out of every candidate: each site's input layout (part of its shape
    # class) is then the same whatever the sites before it chose.
    cl = torch.channels_last
    model = _model().to(memory_format=cl)
    first = _run(model, torch.randn(2, 3, 32, 32).contiguous(memory_format=cl))
    assert any(c.how == "tuned" for c in first)
    # Rewrite every persisted choice to another candidate that can run the site: a new
    # process must take the file's word, not tune again.
    stored = json.loads(fresh.read_text())
    (device,) = stored
    for key, name in stored[device].items():
        stored[device][key] = "torch" if name != "torch" else "native"
    fresh.write_text(json.dumps(stored))
    script = textwrap.dedent(
        """
        import json, sys, torch, fastres
        from fastres.backends import select
        cl = torch.channels_last
        model = fastres.ResNet(depth=18, base_channels=8).eval().to(memory_format=cl)
        with select.recording() as choices, torch.no_grad():
            model(torch.randn(2, 3, 32, 32).contiguous(memory_format=cl))
        json.dump([(c.site, c.chosen, c.how) for c in choices], sys.stdout)
        """
    )
    env = {**os.environ, tuning.CACHE_ENV_VAR: str(fresh.parent)}
    env.pop("FASTRES_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    )
    seen = json.loads(out.stdout)
    assert {how for _, _, how in seen} <= {"persisted", "cached", "only"}
    assert all(stored[device][site] == chosen for site, chosen, how in seen if how != "only")


def test_forcing_one_implementation(fresh, monkeypatch):
    model, x = _model(), torch.randn(2, 3, 32, 32)
    monkeypatch.setenv(select.SELECT_ENV_VAR, "torch")
    choices = _run(model, x)
    assert {(c.chosen, c.how) for c in choices} == {("torch", "forced")}
    # A name forces its family where the name itself is no candidate (training: whole blocks).
    monkeypatch.setenv(select.SELECT_ENV_VAR, "native-onednn")
    assert {c.chosen for c in _run(model, x)} == {"native-onednn"}
    assert {c.chosen for c in _run(_model(train=True), x, train=True)} == {"native"}
    monkeypatch.setenv(select.SELECT_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"FASTRES_SELECT='fastest'.*native-onednn.*torch"):
        _run(model, x)


def test_without_tuning_the_default_runs(fresh, monkeypatch):
    """FASTRES_TRITON_TUNE=0: no timing; each site runs its first candidate (native's)."""
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    choices = _run(_model(), torch.randn(2, 3, 32, 32))
    assert {(c.chosen, c.how) for c in choices} == {("native-onednn", "default")}
    assert not fresh.exists()


class _Counting(Implementation, Backend):
    """The oracle, counting the sites it runs."""

    def __init__(self):
        self.calls = 0

    def unit(self, unit, x):
        self.calls += 1
        return REFERENCE.unit(unit, x)

    def tail(self, unit, h, x, shortcut):
        self.calls += 1
        return REFERENCE.tail(unit, h, x, shortcut)

    def run_block(self, block, x):
        self.calls += 1
        return ORACLE.run_block(block, x)

    def run_stem(self, model, x):
        self.calls += 1
        return ORACLE.run_stem(model, x)


def test_a_remembered_choice_follows_what_it_depends_on(fresh, monkeypatch):
    """After the first forward a site finds its choice without building its shape class, and
    still follows the forced name, the mode (eval, gradients, training) and whether tuning may
    run."""
    first, oracle = _Counting(), _Counting()
    always = select._always

    def without_grad(device, site) -> bool:
        return not torch.is_grad_enabled()

    units = _table(
        select.Candidate("first", first, without_grad), select.Candidate("torch", oracle, always)
    )
    blocks = _table(
        select.Candidate("torch", oracle, always), select.Candidate("first", first, always)
    )
    monkeypatch.setattr(select, "UNIT_CANDIDATES", units)
    monkeypatch.setattr(select, "BLOCK_CANDIDATES", blocks)
    shape_classes = []
    monkeypatch.setattr(select, "_shape_class", lambda *args: shape_classes.append(args) or "class")
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")  # each site runs its table's first candidate
    model, x = _model(), torch.randn(2, 3, 32, 32)

    def forward_calls(train: bool = False, grad: bool = False) -> tuple[int, int]:
        """(first's, the oracle's) calls in one forward."""
        before = first.calls, oracle.calls
        model.train(train)
        if train or grad:
            model(x)[-1].sum().backward()
        else:
            with torch.no_grad():
                model(x)
        return first.calls - before[0], oracle.calls - before[1]

    eval_sites, none = forward_calls()
    assert eval_sites > 0 and none == 0
    classes = len(shape_classes)
    assert forward_calls() == (eval_sites, 0)
    assert len(shape_classes) == classes, "the second forward built shape classes again"

    monkeypatch.setenv(select.SELECT_ENV_VAR, "torch")
    assert forward_calls() == (0, eval_sites)
    monkeypatch.delenv(select.SELECT_ENV_VAR)
    assert forward_calls() == (eval_sites, 0)
    # Gradients through eval-mode norms: the same sites, where `first` does not apply.
    assert forward_calls(grad=True) == (0, eval_sites)
    # Training: whole blocks, whose table puts the oracle first.
    none, train_sites = forward_calls(train=True)
    assert none == 0 and 0 < train_sites < eval_sites
    # Tuning allowed again: the remembered defaults do not stand in for a choice.
    monkeypatch.delenv(tuning.TUNE_ENV_VAR)
    assert not fresh.exists()
    forward_calls()
    assert fresh.exists()


def _gpu_like_tables(monkeypatch) -> dict[str, _Counting]:
    """CUDA's candidate names on CPU tensors: 'triton' first (the untuned default 'auto' had on
    CUDA), then 'native' and the oracle; each an oracle that counts its sites."""
    impls = {name: _Counting() for name in ("triton", "native", "torch")}
    table = _table(*(select.Candidate(n, impl, select._always) for n, impl in impls.items()))
    monkeypatch.setattr(select, "UNIT_CANDIDATES", table)
    monkeypatch.setattr(select, "BLOCK_CANDIDATES", table)
    return impls


@pytest.mark.parametrize("gpu_class", [(9, 0), (8, 6)], ids=["measured", "unmeasured"])
def test_without_a_measurement_a_gpu_runs_the_floor(fresh, monkeypatch, gpu_class):
    """Where 'auto' may not time (FASTRES_TRITON_TUNE=0; and under torch.compile) a GPU runs
    what was measured fastest on a GPU of its class (`measured.py`: on the H200, PyTorch's
    modules for training and ResNet inference, native for Res2Net blocks in inference), and
    PyTorch's modules on a class nobody measured: never the table's first, untuned Triton."""
    from fastres.backends import measured

    monkeypatch.setattr(measured, "device_class", lambda device: gpu_class)
    impls = _gpu_like_tables(monkeypatch)
    monkeypatch.setenv(tuning.TUNE_ENV_VAR, "0")
    measured_class = gpu_class in measured.MEASURED
    res2net = fastres.Res2Net(depth=50, base_channels=8, base_width=4, zero_init_residual=False)
    res2net = randomize_norms(res2net)
    x = torch.randn(2, 3, 32, 32)
    for model, train in ((_model(), False), (_model(), True), (res2net.eval(), False)):
        model.train(train)
        chosen = {(type(c.module).__name__, c.chosen, c.how) for c in _run(model, x, train)}
        expected_block = "native" if measured_class and model is res2net else "torch"
        assert all(how == "default" for _, _, how in chosen)
        for module, name, _ in chosen:
            block_site = module == "Bottle2neck"
            assert name == (expected_block if block_site else "torch"), (module, name)
    # torch.compile traces the floor's backend: nothing may be chosen while it traces.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    calls = {name: impl.calls for name, impl in impls.items()}
    with torch.no_grad():
        res2net(x)
    ran = {name for name, impl in impls.items() if impl.calls > calls[name]}
    assert ran == ({"native", "torch"} if measured_class else {"torch"})


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_selection_under_the_interpreter_with_triton_a_candidate(fresh, monkeypatch, train):
    """Under TRITON_INTERPRET=1 the Triton units take part (tests only: the interpreter is no
    real candidate on CPU), agree with the oracle, and the model's result keeps the contract.

    Training runs in float64 (the interpreter runs it through the kernels), as the Triton
    training tests do: in float32 two pre-activations of these few channels may round across a
    ReLU kink, and then the gradient check rightly refuses the candidate."""
    pytest.importorskip("triton")
    from fastres.backends import triton

    if triton.BACKEND.unavailable_reason("cpu") is not None:
        pytest.skip("the Triton interpreter is off")
    units = [select.Candidate("triton", triton.EVAL_UNITS, triton.runs_units)]
    blocks = [select.Candidate("triton", triton.BACKEND, select._always)]
    monkeypatch.setitem(select.UNIT_CANDIDATES, "cpu", units + select.UNIT_CANDIDATES["cpu"])
    monkeypatch.setitem(select.BLOCK_CANDIDATES, "cpu", blocks + select.BLOCK_CANDIDATES["cpu"])
    monkeypatch.setattr(select, "_TIMED_RUNS", 1)  # the interpreter is slow, not timed here
    dtype = torch.float64 if train else torch.float32
    model = _model(train=train, depth=50).to(dtype)
    oracle = copy.deepcopy(model).set_backend("torch")
    gold = copy.deepcopy(model).double().set_backend("torch")
    # In training 16 values per channel reach layer4's batch statistics: with 2 (1x1 pixels,
    # batch 2) they amplify float64 rounding past the float64 tolerance.
    x = torch.randn(*((4, 3, 48, 48) if train else (2, 3, 32, 32)), dtype=dtype)
    choices = _run(model, x, train=train)
    tuned = [c for c in choices if c.how == "tuned"]
    assert tuned and all(c.times_ms["triton"] is not None for c in tuned)
    for forced in ("triton", None):
        if forced:
            monkeypatch.setenv(select.SELECT_ENV_VAR, forced)
        with torch.set_grad_enabled(train):
            y, base, y64 = model(x)[-1], oracle(x)[-1], gold(x.double())[-1]
        assert_matches_oracle(y, base, y64, dtype, f"output ({forced or 'selected'})")
    assert {c.chosen for c in _run(model, x, train=train)} == {"triton"}


@pytest.mark.cuda
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_cuda_candidate_agrees_with_the_oracle(fresh, dtype, train):
    """On a GPU every candidate (Triton, native, cuDNN's fused convolutions, the oracle) passes
    its agreement check where it applies, so each takes part in the timing."""
    cl = torch.channels_last
    model = _model(train=train, depth=50).cuda().to(memory_format=cl)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=cl)
    with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
        choices = _run(model, x, train=train)
    tuned = [c for c in choices if c.how == "tuned"]
    assert tuned
    for c in tuned:
        assert "triton" in c.times_ms and all(t is not None for t in c.times_ms.values()), c
    if not train:
        assert any("native-cudnn" in c.times_ms for c in tuned)


def test_a_gradient_agrees_despite_one_kink_flip_and_not_when_wrong():
    """One channel moved by a whole upstream gradient (a ReLU kink rounded the other way) is
    rounding; a scaled gradient, a NaN, or many channels off are not."""
    gold = torch.randn(64, 32, 3, 3, dtype=torch.float64)
    base = (gold + 1e-7 * torch.randn_like(gold)).float()
    tol = 1e-5
    flipped = base.clone()
    flipped[int(torch.randint(64, ()))] += torch.randn(32, 3, 3)
    assert select.gradient_agrees(base, base, gold, tol)
    assert select.gradient_agrees(flipped, base, gold, tol)
    assert not select.gradient_agrees(base * 1.5, base, gold, tol)
    many = base.clone()
    many[:8] += torch.randn(8, 32, 3, 3)
    assert not select.gradient_agrees(many, base, gold, tol)
    nan = base.clone()
    nan[:, 0, 0, 0] = float("nan")
    assert not select.gradient_agrees(nan, base, gold, tol)


def test_new_image_sizes_share_choices_within_a_bounded_tuning(fresh, monkeypatch):
    """Detection feeds a new padded size almost every forward. Over 20 distinct sizes (four
    octaves of pixels), each site class tunes at most FASTRES_SELECT_SIZES size classes and
    persists no more, every output keeps the contract, and a new size whose size classes are
    all known costs what a known size costs: no tuning, not even a shape class built."""
    monkeypatch.setenv(select.SIZES_ENV_VAR, "2")
    tunings = []
    tune = select._tune
    monkeypatch.setattr(
        select, "_tune", lambda site, *rest: tunings.append(site) or tune(site, *rest)
    )
    # channels_last in and out of every candidate, and at least 2x2 pixels in layer4 (inputs of
    # 33 px and more): each site's layout, part of its site class, is the same at every size.
    cl = torch.channels_last
    model = _model().to(memory_format=cl)
    oracle = copy.deepcopy(model).set_backend("torch")
    gold = copy.deepcopy(model).double().set_backend("torch")

    def forward(h: int, w: int) -> int:
        """Checks one forward of a fresh 1x3xhxw input; returns how many sites it tuned."""
        x = torch.randn(1, 3, h, w).contiguous(memory_format=cl)
        before = len(tunings)
        with torch.no_grad():
            outputs, bases, golds = model(x), oracle(x), gold(x.double())
        for i, (y, base, y64) in enumerate(zip(outputs, bases, golds, strict=True)):
            assert_matches_oracle(y, base, y64, torch.float32, f"{h}x{w} stage {i}")
        return len(tunings) - before

    sizes = set()
    while len(sizes) < 20:
        h, w = torch.randint(33, 97, (2,)).tolist()
        if h != w and (w, h) not in sizes:
            sizes.add((h, w))
    sizes = sorted(sizes, key=lambda _: float(torch.rand(())))
    site_classes = forward(*sizes[0])  # the first size tunes every site class once
    assert site_classes > 0
    for h, w in sizes[1:]:
        forward(h, w)
    assert len(tunings) <= 2 * site_classes
    (entries,) = json.loads(fresh.read_text()).values()
    assert len(entries) <= 2 * site_classes

    # The first size transposed: the same pixel count in every layer, so the same size classes.
    shape_classes = []
    monkeypatch.setattr(select, "_shape_class", lambda *args: shape_classes.append(args) or "class")
    stored = fresh.read_text()
    assert forward(*reversed(sizes[0])) == 0
    assert shape_classes == [] and fresh.read_text() == stored


def test_the_size_bound_is_a_setting(fresh, monkeypatch):
    """FASTRES_SELECT_SIZES=0 tunes nothing: with nothing known, each site runs its default; a
    value that is no count is an error that names the setting."""
    monkeypatch.setenv(select.SIZES_ENV_VAR, "0")
    choices = _run(_model(), torch.randn(2, 3, 32, 32))
    assert {(c.chosen, c.how) for c in choices} == {("native-onednn", "default")}
    assert not fresh.exists()
    monkeypatch.setenv(select.SIZES_ENV_VAR, "two")
    with pytest.raises(ValueError, match="FASTRES_SELECT_SIZES='two'"):
        _run(_model(), torch.randn(2, 3, 32, 32))
