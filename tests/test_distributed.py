"""SyncBatchNorm and DistributedDataParallel on the fused backends, in two CPU processes (gloo).

PyTorch's own SyncBatchNorm refuses CPU tensors once torch.distributed is initialized, so the
gold is not torch's SyncBN but what SyncBN means: SyncBN over processes that hold parts of a
batch is BatchNorm over the whole batch. The oracle (plain BatchNorm where no process group
exists) runs the whole batch in this process. The processes' outputs and input gradients are
its slices; their parameter gradients sum to its gradients (as in torch's SyncBN, the backward
all-reduces the sums that the input gradient needs, while the weight and bias gradients stay
per process until DDP reduces them); every process's running statistics are its statistics.

DistributedDataParallel refuses SyncBatchNorm in CPU modules, so the DDP tests train plain-BN
models (per-process batch statistics) and replay DDP in this process with one oracle copy per
rank: rank 0's buffers broadcast before every forward, the gradients averaged over the ranks.

Each test spawns two processes that read their task from a file, run it and torch.save their
results. A process's exception fails the test with its traceback; a collective that one process
never joins fails at the gloo timeout, and the parent kills what still runs after its own.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastres
from fastres.extension import EXTENSION_ERROR
from fastres.ops import batchnorm as bn_ops
from fastres.testing import (
    OpRecorder,
    assert_matches_oracle,
    assert_trajectory_matches,
    randomize_norms,
)

pytestmark = [
    pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR)),
    pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available"),
]

WORLD = 2
GLOO_TIMEOUT_S = 60
JOIN_TIMEOUT_S = 150
NCHW, CL = torch.contiguous_format, torch.channels_last
LR, MOMENTUM = 1e-3, 0.9  # docs/contract.md §3's trajectory rule asks for a small learning rate

TWO_STAGES = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))
MODELS = {
    "resnet18": (fastres.ResNet, dict(depth=18)),
    "resnet50": (fastres.ResNet, dict(depth=50)),
    "res2net50": (fastres.Res2Net, dict(depth=50)),
}
# The Triton interpreter is slow: two narrow stages (Res2Net: 'stage' and 'normal' blocks).
TRITON_MODELS = {
    "resnet18": (fastres.ResNet, dict(depth=18, **TWO_STAGES)),
    "res2net50": (fastres.Res2Net, dict(depth=50, base_width=6, scales=3, **TWO_STAGES)),
}
TRITON_ON_CPU = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors run through Triton only under TRITON_INTERPRET=1 (conftest sets it "
    "where there is no GPU)",
)
# An op that runs only on each backend's fused training path (not in the oracle fallback).
FUSED_TRAINING_OP = {
    "native": "fastres.bn_train_act.default",
    "triton": "fastres.conv2d_bn_train.default",
}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread here as in the processes: these tiny ops only lose to threading
    (several times slower with two threads on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cls, kwargs: dict, norm: str, **extra) -> nn.Module:
    """A narrow model running the oracle in train mode, with non-trivial BatchNorms."""
    model = cls(
        **kwargs,
        **extra,
        norm_cfg={"type": norm},
        norm_eval=False,
        base_channels=8,
        zero_init_residual=False,
        backend="torch",
    )
    return randomize_norms(model).train()


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def split(t: torch.Tensor, sizes) -> list[torch.Tensor]:
    return [part.clone() for part in t.split(list(sizes))]


# -- the processes ---------------------------------------------------------------------------------


def _worker(rank: int, job: str, workdir: str) -> None:
    # TRITON_INTERPRET comes with the parent's environment (tests/conftest.py sets it).
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(workdir, 'store')}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=GLOO_TIMEOUT_S),
    )
    try:
        task = torch.load(os.path.join(workdir, "task.pt"), weights_only=False)
        result = JOBS[job](rank, **task)
        torch.save(result, os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(job: str, workdir, **task) -> list:
    """Runs JOBS[job](rank, **task) in WORLD gloo processes; returns each rank's result."""
    torch.save(task, workdir / "task.pt")
    context = mp.start_processes(
        _worker, args=(job, str(workdir)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not context.join(timeout=1):  # raises with a failed process's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{job}: the processes did not finish within {JOIN_TIMEOUT_S} s")
    return [torch.load(workdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def step(model: nn.Module, x: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    """One forward and backward of `sum(out * weight)` over the outputs."""
    x = x.detach().clone().requires_grad_(True)
    recorder = OpRecorder()
    with recorder:
        outs = as_tuple(model(x))
    sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights, strict=True)).backward()
    return {
        "outs": [o.detach() for o in outs],
        "x_grad": x.grad,
        "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
        "buffers": {k: b.detach().clone() for k, b in model.named_buffers()},
        "ops": set(recorder.ops),
    }


def _syncbn_step(rank, model, backend, xs, weights):
    model.set_backend(backend)
    syncbns = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert syncbns and all(bn_ops.sync_group_name(m) for m in syncbns)
    return step(model, xs[rank], weights[rank])


def _ddp_train(rank, model, backend, xs, targets, layout):
    layout = getattr(torch, layout)  # by name: torch.save cannot pickle a memory format
    model = model.set_backend(backend).to(memory_format=layout)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR, momentum=MOMENTUM)
    losses, recorder = [], OpRecorder()
    for i, (x, t) in enumerate(zip(xs, targets, strict=True)):
        opt.zero_grad()
        with recorder if i == 0 else contextlib.nullcontext():
            out = ddp(x[rank].contiguous(memory_format=layout))
        loss = nn.functional.cross_entropy(out, t[rank])
        loss.backward()
        if i == 0:
            grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        opt.step()
        losses.append(loss.detach())
    state = {"loss": torch.stack(losses), **model.state_dict()}
    return {"state": state, "grads": grads, "ops": set(recorder.ops)}


def _cpu_syncbn_errors(rank, model):
    """The errors of a CPU SyncBN model under DDP and on the 'torch' backend, as text."""
    errors = {}
    for what, run in {
        "ddp": lambda: nn.parallel.DistributedDataParallel(model),
        "torch backend": lambda: model.set_backend("torch")(torch.randn(2, 3, 16, 16)),
    }.items():
        try:
            run()
        except (RuntimeError, ValueError) as e:
            errors[what] = str(e)
    return errors


JOBS = {
    "syncbn_step": _syncbn_step,
    "ddp_train": _ddp_train,
    "cpu_syncbn_errors": _cpu_syncbn_errors,
}


# -- SyncBatchNorm: one training step against the whole-batch oracle -------------------------------


def syncbn_runs(tmp_path, model, backend, x, sizes, dtype, base_layout):
    """(the ranks' steps, the oracle's whole-batch step in dtype, and in float64).

    The base runs in `base_layout`; the ranks and the gold in NCHW.
    """
    with torch.no_grad():
        outs = as_tuple(copy.deepcopy(model)(x[:2]))
    weights = [torch.randn(x.shape[0], *o.shape[1:], dtype=torch.float64) for o in outs]
    gold = step(copy.deepcopy(model).double(), x.double(), weights)
    base_model = copy.deepcopy(model).to(dtype).to(memory_format=base_layout)
    base = step(base_model, x.to(dtype).contiguous(memory_format=base_layout), weights)
    ranks = spawn(
        "syncbn_step",
        tmp_path,
        model=copy.deepcopy(model).to(dtype),
        backend=backend,
        xs=split(x.to(dtype), sizes),
        weights=list(zip(*(split(w, sizes) for w in weights), strict=True)),
    )
    assert all(FUSED_TRAINING_OP[backend] in r["ops"] for r in ranks), "the fused path did not run"
    return ranks, base, gold


def check_syncbn(ranks, base, gold, dtype):
    """docs/contract.md §3's rule for the ranks' concatenated outputs and input gradients, their
    summed parameter gradients, and each rank's running statistics."""
    for i, (b, g) in enumerate(zip(base["outs"], gold["outs"], strict=True)):
        a = torch.cat([r["outs"][i] for r in ranks])
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert_matches_oracle(a, b, g, dtype, f"output {i}")
    x_grad = torch.cat([r["x_grad"] for r in ranks])
    assert_matches_oracle(x_grad, base["x_grad"], gold["x_grad"], dtype, "input gradient")
    for k, g in gold["grads"].items():
        a = sum(r["grads"][k].double() for r in ranks)
        assert_matches_oracle(a, base["grads"][k], g, dtype, f"grad {k} summed over the ranks")
    for rank, r in enumerate(ranks):
        assert r["grads"].keys() == gold["grads"].keys()
        for k, g in gold["buffers"].items():
            if k.endswith("num_batches_tracked"):
                assert torch.equal(r["buffers"][k], g), k
            else:
                assert_matches_oracle(
                    r["buffers"][k], base["buffers"][k], g, dtype, f"rank {rank} {k}"
                )


@pytest.mark.parametrize("name", MODELS)
def test_native_syncbn_matches_whole_batch_oracle(tmp_path, name):
    """Unequal parts (3 and 5): the statistics merge weighs each process by its count.

    In float64, with the oracle's float64 channels_last run as base (another summation order).
    """
    model = build(*MODELS[name], "SyncBN")
    sizes = (3, 5)
    x = torch.randn(sum(sizes), 3, 32, 32)
    runs = syncbn_runs(tmp_path, model, "native", x, sizes, torch.float64, CL)
    check_syncbn(*runs, torch.float64)


@TRITON_ON_CPU
@pytest.mark.parametrize("name", TRITON_MODELS)
def test_triton_syncbn_matches_whole_batch_oracle(tmp_path, name):
    """In float64 (the interpreter runs the kernels in float64), as the native test: float32
    through batch statistics of small batches is chaotic at ReLU kinks."""
    pytest.importorskip("triton")
    model = build(*TRITON_MODELS[name], "SyncBN")
    sizes = (3, 5)
    x = torch.randn(sum(sizes), 3, 32, 32)
    runs = syncbn_runs(tmp_path, model, "triton", x, sizes, torch.float64, CL)
    check_syncbn(*runs, torch.float64)


def test_cpu_syncbn_errors_say_what_to_do(tmp_path):
    """DDP refuses SyncBatchNorm in a CPU module (torch's check, whatever the backend; the README
    says so), and the 'torch' backend, where torch's SyncBatchNorm would refuse a CPU batch,
    raises an error that says what to do instead."""
    model = build(fastres.ResNet, dict(depth=18, **TWO_STAGES), "SyncBN")
    for errors in spawn("cpu_syncbn_errors", tmp_path, model=model):
        assert "SyncBatchNorm layers only work with GPU modules" in errors["ddp"]
        assert "norm_cfg=dict(type='BN')" in errors["torch backend"]
        assert "revert_sync_batchnorm" in errors["torch backend"]


# -- DistributedDataParallel: SGD steps against the replayed oracle --------------------------------


def ddp_replay(model, xs, targets, layout) -> tuple[list[dict], dict]:
    """DDP in one process with one oracle copy per rank.

    Returns each rank's losses and state after the steps, and the first step's gradients.
    """
    models = [copy.deepcopy(model).to(memory_format=layout) for _ in range(WORLD)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for m in models]
    losses = [[] for _ in range(WORLD)]
    for i, (x, t) in enumerate(zip(xs, targets, strict=True)):
        with torch.no_grad():
            for m in models[1:]:
                for b, b0 in zip(m.buffers(), models[0].buffers(), strict=True):
                    b.copy_(b0)
        for rank, (m, opt) in enumerate(zip(models, opts, strict=True)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x[rank].contiguous(memory_format=layout)), t[rank])
            loss.backward()
            losses[rank].append(loss.detach())
        for params in zip(*(m.parameters() for m in models), strict=True):
            mean = sum(p.grad for p in params) / WORLD
            for p in params:
                p.grad = mean.clone()
        if i == 0:
            grads = {k: p.grad.clone() for k, p in models[0].named_parameters()}
        for opt in opts:
            opt.step()
    states = [
        {"loss": torch.stack(rank_losses), **m.state_dict()}
        for rank_losses, m in zip(losses, models, strict=True)
    ]
    return states, grads


def check_ddp(tmp_path, model, backend, per_rank, steps, dtype):
    """Trains `model` wrapped in DDP on `backend` (channels_last, `dtype`) and checks it.

    The first step's gradients (averaged by DDP) under docs/contract.md §3's rule; the parameters
    stay identical across the ranks; each rank follows the oracle's replay under the trajectory
    rule: its deviation from the NCHW replay is at most 4x that of the channels_last replay +
    TRAJECTORY_SLACK, per loss and per state tensor.
    """
    model = model.to(dtype)
    num_classes = model.fc.out_features
    sizes = [per_rank] * WORLD
    xs = [split(torch.randn(per_rank * WORLD, 3, 32, 32, dtype=dtype), sizes) for _ in range(steps)]
    targets = [split(torch.randint(0, num_classes, (per_rank * WORLD,)), sizes) for _ in xs]
    oracle, base = ddp_replay(model, xs, targets, NCHW)
    oracle_cl, base_cl = ddp_replay(model, xs, targets, CL)
    if dtype == torch.float64:
        gold, base = base, base_cl  # the channels_last run: another summation order
    else:
        gold_xs = [[x.double() for x in s] for s in xs]
        _, gold = ddp_replay(copy.deepcopy(model).double(), gold_xs, targets, NCHW)
    ranks = spawn(
        "ddp_train",
        tmp_path,
        model=copy.deepcopy(model),
        backend=backend,
        xs=xs,
        targets=targets,
        layout="channels_last",
    )
    assert all(FUSED_TRAINING_OP[backend] in r["ops"] for r in ranks), "the fused path did not run"
    for rank, r in enumerate(ranks):
        for k, g in gold.items():
            assert_matches_oracle(r["grads"][k], base[k], g, dtype, f"rank {rank} step 0 grad {k}")
    for name, _ in model.named_parameters():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    for rank, r in enumerate(ranks):
        assert_trajectory_matches(r["state"], oracle[rank], oracle_cl[rank], f"rank {rank} ")


def test_native_ddp_matches_oracle(tmp_path):
    """In float64, where the trajectory rule's bound is its slack (see the native tests)."""
    model = build(*MODELS["resnet50"], "BN", num_classes=5, **TWO_STAGES)
    check_ddp(tmp_path, model, "native", per_rank=2, steps=3, dtype=torch.float64)


@TRITON_ON_CPU
def test_triton_ddp_matches_oracle(tmp_path):
    pytest.importorskip("triton")
    model = build(*TRITON_MODELS["resnet18"], "BN", num_classes=5)
    check_ddp(tmp_path, model, "triton", per_rank=4, steps=3, dtype=torch.float32)
