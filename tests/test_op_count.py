"""No backend dispatches more ops per ResNet-50 / Res2Net-50 step than PyTorch's own modules
(issue 25).

Each dispatched op that computes something is, on CUDA, at least one kernel launch, so the count
of ops a step dispatches is the launch count's proxy that runs on CPU tensors: under bf16
autocast the CPU path is the code path a CUDA run takes (the same folding, the same BatchNorm
ops; only fp32 CPU inference has a path of its own, oneDNN's prepacked convolutions).

What is counted (`StepOps`): every op the dispatcher hands to a TorchDispatchMode, except

- views (`func.is_view`: view, expand, permute, detach, split, ...) and `_unsafe_view`, which
  only describe memory that exists;
- allocations without a fill (`_ALLOCATIONS`: empty, empty_like, ...), which launch nothing;
- ops on no tensor (`promote_types`, which `Tensor.to` dispatches), which compute no data;
- the Python custom ops of fastres (compositions of other ops, e.g. `bn_train_act`, and the
  Triton launchers): they are opened and what they run counted instead, their ops and each
  Triton launch (one kernel; under the interpreter, the ops the interpreter itself dispatches to
  copy the arguments are not counted).

Ops that C++ kernels call internally are not seen by a dispatch mode: fastres's C++ ops do their
per-channel arithmetic in their kernels (csrc/batchnorm_math.h), not in ATen calls.

Run as a script for the table (bench/results/cpu-op-count/):
`PYTHONPATH=$PWD python tests/test_op_count.py`.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import fastres
from fastres.testing import randomize_norms

_ALLOCATIONS = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::_unsafe_view",
}

TRITON_LAUNCH = "triton launch"


def _no_tensor(func) -> bool:
    schema = func._schema
    return not any(
        isinstance(a.type, torch.TensorType) or "Tensor" in str(a.type)
        for a in (*schema.arguments, *schema.returns)
    )


class StepOps(TorchDispatchMode):
    """Counts the dispatched ops that compute (see the module docstring): `ops` their names;
    `counting_launches` adds the Triton launches. It opens fastres's custom ops, so fastres
    runs under it as without a mode (`SEES_THROUGH_FASTRES`: their bodies called directly, the
    blocks' one-node paths), and the count is what a step runs."""

    SEES_THROUGH_FASTRES = True

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    @contextlib.contextmanager
    def counting_launches(self):
        """This mode on, and each Triton launch inside counted (`_counting_launches`)."""
        with _counting_launches(self.ops), self:
            yield self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        opdef = OPDEFS.get(name)
        if opdef is not None:  # a Python custom op: open it
            with self:
                return opdef._init_fn(*args, **kwargs)
        if not (func.is_view or name in _ALLOCATIONS or _no_tensor(func)):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def _counting_launches(ops: list[str]):
    """Appends TRITON_LAUNCH to ops for each Triton launch inside the context; the launch runs
    with the dispatch modes off (the interpreter's own copies are not the step's ops)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def counting(run):
        def launch(fn, *args, **kwargs):
            if not kwargs.get("warmup"):
                ops.append(TRITON_LAUNCH)
            with _disable_current_modes():
                return run(fn, *args, **kwargs)

        return launch

    for cls, run in originals.items():
        cls.run = counting(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def _model(mode: str, arch: str = "resnet50") -> torch.nn.Module:
    """ResNet-50 with narrow channels (the op count does not depend on the widths), or Res2Net-50
    with narrow channels and its first two stages (a 'stage' block with a pooled last chunk and
    'normal' blocks, strided and not, chunks of 26 and 52 channels in padded slots: every kind
    of Res2Net unit; the Triton interpreter makes each block cost a second)."""
    norm_eval = mode == "train-frozen-bn"
    if arch == "res2net50":
        model = fastres.models.Res2Net(
            depth=50, base_channels=8, stem_channels=8, num_stages=2, strides=(1, 2),
            dilations=(1, 1), out_indices=(0, 1), norm_eval=norm_eval,
        )  # fmt: skip
    else:
        model = fastres.models.ResNet(
            depth=50, base_channels=8, stem_channels=8, norm_eval=norm_eval
        )
    model = randomize_norms(model).to(memory_format=torch.channels_last)
    return model.eval() if mode == "inference" else model.train()


def _step(model: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    if mode == "inference":
        with torch.no_grad():
            model(x)
        return
    model.zero_grad(set_to_none=True)
    outs = model(x)
    sum(o.float().sum() for o in outs).backward()


def _optimizer_step(model: torch.nn.Module, mode: str) -> None:
    """What happens between two training steps: the weights change (so a step counted after it
    pays for whatever a backend keeps per weight version, as every real training step does)."""
    if mode != "inference":
        torch.optim.SGD(model.parameters(), lr=1e-3).step()


@functools.cache
def step_ops(backend: str, mode: str, dtype: torch.dtype, arch: str = "resnet50") -> list[str]:
    """The counted ops of one step of `mode` ('inference', 'train', 'train-frozen-bn') on
    `backend`, in `dtype` (bfloat16: fp32 model under CPU autocast; float32: plain), after one
    warm-up step (folding, 'auto''s selection) and, when training, an optimizer step."""
    torch.manual_seed(0)
    model = _model(mode, arch).set_backend(backend)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        _step(model, x, mode)
        _optimizer_step(model, mode)
        with StepOps().counting_launches() as recorder:
            _step(model, x, mode)
    return recorder.ops


MODES = ["inference", "train", "train-frozen-bn"]
BACKENDS = ["native", "auto", "triton"]
DTYPES = [torch.bfloat16, torch.float32]


def _cases():
    for backend in BACKENDS:
        for mode in MODES:
            for dtype in DTYPES:
                yield pytest.param(backend, mode, dtype, id=f"{backend}-{mode}-{dtype}")


@pytest.mark.parametrize(("backend", "mode", "dtype"), list(_cases()))
def test_no_more_ops_than_eager(backend, mode, dtype):
    eager = step_ops("torch", mode, dtype)
    ours = step_ops(backend, mode, dtype)
    assert eager, "the step dispatched nothing: the recorder is broken"
    assert len(ours) <= len(eager), _difference(ours, eager)


# Res2Net-50 on the triton backend (the other backends run its units as ResNet's) where its
# training step pays per-forward weight preparation: BNs frozen, and with batch statistics
# ('train'), where the padded chunk slots' BNs finalize in their convolutions' merge launches.
RES2NET_CASES = [
    pytest.param(mode, dtype, id=f"{mode}-{'bf16' if dtype == torch.bfloat16 else 'fp32'}")
    for mode in ("train", "train-frozen-bn")
    for dtype in (torch.bfloat16, torch.float32)
]


@pytest.mark.parametrize(("mode", "dtype"), RES2NET_CASES)
def test_res2net_no_more_ops_than_eager(mode, dtype):
    eager = step_ops("torch", mode, dtype, "res2net50")
    ours = step_ops("triton", mode, dtype, "res2net50")
    assert eager, "the step dispatched nothing: the recorder is broken"
    assert len(ours) <= len(eager), _difference(ours, eager)


def _difference(ours: list[str], eager: list[str]) -> str:
    def histogram(ops):
        counts: dict[str, int] = {}
        for op in ops:
            counts[op] = counts.get(op, 0) + 1
        return counts

    a, b = histogram(ours), histogram(eager)
    rows = [f"  {op}: {a.get(op, 0)} vs eager {b.get(op, 0)}" for op in sorted(set(a) | set(b))]
    return f"{len(ours)} ops vs eager's {len(eager)}:\n" + "\n".join(rows)


def test_recorder_counts_the_inside_of_composite_ops():
    """bn_train_act is opened: its finalize and apply count, the op itself does not."""
    from fastres.ops import batchnorm as bn_ops

    y = torch.randn(2, 4, 3, 3)
    stats = (*bn_ops.bn_stats(y), 18)
    with StepOps() as recorder:
        bn_ops.bn_train_act(y, stats, torch.ones(4), torch.zeros(4), 1e-5)
    assert "fastres.bn_train_act.default" not in recorder.ops
    assert "fastres.bn_apply.default" in recorder.ops


if __name__ == "__main__":
    print(f"torch {torch.__version__}; ops per ResNet-50 step (base 8, 2x3x32x32, channels_last)")
    print("| dtype | mode | " + " | ".join(["torch", *BACKENDS]) + " |")
    print("|---|---|" + "---|" * (1 + len(BACKENDS)))
    for dtype in DTYPES:
        for mode in MODES:
            start = time.perf_counter()
            counts = [len(step_ops(b, mode, dtype)) for b in ["torch", *BACKENDS]]
            print(f"  ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
            print(f"| {str(dtype)[6:]} | {mode} | " + " | ".join(map(str, counts)) + " |")
            sys.stdout.flush()
