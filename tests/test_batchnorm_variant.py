"""The CUDA kernel variant of the `fastres::bn_*` ops (`variant` 1:
csrc/cuda/batchnorm_fast_kernels.cu) and its 'auto' candidate `native-fastbn`.

On CPU: the wiring (the candidate is offered on CUDA only and is never the default; the variant
reaches every op, a backward's included; CPU ignores it). On a GPU: the kernels against the
float64 reference (docs/contract.md §3) at the channel counts of the issue, odd spatial sizes,
both layouts and three dtypes, with enough rows that the grid reductions merge several slices.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastres
from fastres.backends import native, select
from fastres.backends.plan import Unit
from fastres.extension import EXTENSION_ERROR, cuda_kernels_built
from fastres.ops import batchnorm as bn_ops
from fastres.ops import batchnorm_reference as ref
from fastres.testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TAILS = ["plain", "residual", "two_bn"]
# The variant's op arguments: those of every bn_* op but bn_finalize, by name.
VARIANT_OPS = ("bn_stats", "bn_apply", "bn_backward_reduce", "bn_backward_elemt", "bn_backward")


def _rand(shape, dtype, layout, device="cpu"):
    return (
        torch.randn(shape, dtype=torch.float64, device=device)
        .to(dtype)
        .contiguous(memory_format=layout)
    )


def _tail_args(shape, dtype, layout, tail, device="cpu"):
    """x, scale, shift, residual, scale_r, shift_r (per-channel ones in fp32)."""
    c = shape[1]

    def channel(kind):
        v = (
            torch.rand(c, device=device) * 1.5 + 0.25
            if kind == "scale"
            else torch.randn(c, device=device)
        )
        return v.float()

    residual = _rand(shape, dtype, layout, device) if tail != "plain" else None
    two_bn = tail == "two_bn"
    return (
        _rand(shape, dtype, layout, device), channel("scale"), channel("shift"), residual,
        channel("scale") if two_bn else None, channel("shift") if two_bn else None,
    )  # fmt: skip


def _cases(shape, dtype, layout, tail, device="cpu"):
    """(op name, args without the variant) of every op with a variant, training terms on."""
    x, scale, shift, residual, scale_r, shift_r = _tail_args(shape, dtype, layout, tail, device)
    grad = _rand(shape, dtype, layout, device)
    c, count = shape[1], x.numel() // shape[1]
    mean = torch.randn(c, device=device)
    mean_r = torch.randn(c, device=device) if tail == "two_bn" else None
    tail_args = (scale, shift, residual, scale_r, shift_r, True)
    reduce_args = (grad, x, *tail_args, mean, mean_r)
    sums = ref.bn_backward_reduce(*reduce_args)
    elemt_args = (
        grad, x, *tail_args, mean, scale.abs(), sums[0], sums[1], mean_r,
        scale_r.abs() if scale_r is not None else None,
        sums[2] if tail == "two_bn" else None, count, residual is not None,
    )  # fmt: skip
    return [
        ("bn_stats", (x,)),
        ("bn_apply", (x, *tail_args)),
        ("bn_backward_reduce", reduce_args),
        ("bn_backward_elemt", elemt_args),
    ]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


# ---------------------------------------------------------------------------------------------
# CPU: the wiring


@pytest.mark.parametrize("table", ["UNIT_CANDIDATES", "BLOCK_CANDIDATES"])
def test_fast_bn_candidate_is_offered_on_cuda_only_and_never_the_default(table):
    candidates = getattr(select, table)
    cuda = [c.name for c in candidates["cuda"]]
    assert "native-fastbn" in cuda
    # After the current kernels: it can win a timing, never be the untimed default.
    assert cuda.index("native-fastbn") > cuda.index("native")
    assert "native-fastbn" not in [c.name for c in candidates["cpu"]]
    fast = next(c for c in candidates["cuda"] if c.name == "native-fastbn")
    site_on_cpu = None  # the predicates decide on the device before they look at the site
    assert not fast.applies(torch.device("cpu"), site_on_cpu)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("tail", TAILS)
def test_cpu_ignores_the_variant(tail, layout):
    for name, args in _cases((2, 6, 3, 5), torch.float32, layout, tail):
        op = getattr(torch.ops.fastres, name)
        for a, b in zip(_outputs(op(*args, variant=0)), _outputs(op(*args, variant=1))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class _RecordVariants(TorchDispatchMode):
    """Records (op name, variant) of each fastres::bn_* op with a variant that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        if namespace == "fastres" and name in VARIANT_OPS:
            index = [a.name for a in func._schema.arguments].index("variant")
            variant = kwargs.get("variant", args[index] if index < len(args) else 0)
            self.calls.append((name, variant))
        return func(*args, **kwargs)


def _unit(train: bool) -> Unit:
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    norm = nn.BatchNorm2d(6)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    norm.train(train)
    return Unit(conv, norm, relu=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("impl, variant", [("UNITS", 0), ("FAST_BN_UNITS", 1)])
def test_the_candidate_runs_every_op_with_its_variant_forward_and_backward(impl, variant, train):
    """`native-fastbn` runs variant 1 in every bn_* op, the backward's too (which runs after its
    scope has closed); `native` runs 0; the results are the same on CPU."""
    unit = _unit(train)
    x = torch.randn(2, 4, 5, 7, requires_grad=True)
    recorder = _RecordVariants()
    with recorder:
        out = getattr(native, impl).unit(unit, x)
        out.sum().backward()
    names = {name for name, _ in recorder.calls}
    # The composite op's backward, and in training the statistics (the forward's apply runs
    # inside bn_train_act, below the recorder).
    expected = {"bn_backward"} | ({"bn_stats"} if train else set())
    assert names == expected, recorder.calls
    assert {v for _, v in recorder.calls} == {variant}, recorder.calls
    reference = native.UNITS.unit(unit, x.detach())
    torch.testing.assert_close(out.detach(), reference, rtol=0, atol=0)


@pytest.mark.parametrize("backend, variant", [("BACKEND", 0), ("FAST_BN_BACKEND", 1)])
def test_the_block_candidate_runs_every_op_with_its_variant(backend, variant):
    """The block candidate (training sites): the stem and a block's statistics, applies and
    backward, all on its variant."""
    model = fastres.ResNet(depth=18, base_channels=4, norm_eval=False).train()
    x = torch.randn(2, 3, 16, 16)
    impl = getattr(native, backend)
    recorder = _RecordVariants()
    with recorder:
        h = impl.run_stem(model, x)
        out = impl.run_block(model.layer1[0], h)
        out.sum().backward()
    assert {name for name, _ in recorder.calls} >= {"bn_stats", "bn_backward"}, recorder.calls
    assert {v for _, v in recorder.calls} == {variant}, recorder.calls


def test_kernel_variant_scope_nests_and_restores():
    assert bn_ops.current_variant() == 0
    with bn_ops.kernel_variant(1):
        assert bn_ops.current_variant() == 1
        with bn_ops.kernel_variant(0):
            assert bn_ops.current_variant() == 0
        assert bn_ops.current_variant() == 1
    assert bn_ops.current_variant() == 0


# ---------------------------------------------------------------------------------------------
# CUDA: the kernels of variant 1 against the reference

# C = 3, 26 (Res2Net), 64, 256, 2048; odd spatial sizes; rows enough for several slices per
# channel tile in the grid reductions (the last block's merge) at C <= 256.
CUDA_SHAPES = {
    "c3": (8, 3, 33, 31),
    "c26": (4, 26, 17, 19),
    "c64": (8, 64, 33, 31),
    "c256": (4, 256, 15, 17),
    "c2048": (4, 2048, 7, 7),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _poison_cached_memory(like: torch.Tensor) -> None:
    """Leaves NaN in the allocator's cache, where the op's outputs and workspace will lie, so
    that an element a kernel fails to write shows."""
    blocks = [torch.full((4 * like.numel(),), float("nan"), device=like.device) for _ in range(4)]
    del blocks


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels_built(), reason="fastres._C built without CUDA kernels")
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES.values(), ids=CUDA_SHAPES.keys())
def test_fast_cuda_kernels_match_the_reference(shape, dtype, layout):
    for tail in TAILS:
        for name, args in _cases(shape, dtype, layout, tail, device="cuda"):
            _poison_cached_memory(args[0])
            actual = _outputs(getattr(torch.ops.fastres, name)(*args, variant=1))
            base = _outputs(getattr(ref, name)(*args))
            gold = _outputs(
                getattr(ref, name)(
                    *(a.double() if isinstance(a, torch.Tensor) else a for a in args)
                )
            )
            for i, (a, b, g) in enumerate(zip(actual, base, gold, strict=True)):
                assert a.shape == b.shape and a.dtype == b.dtype, (name, i)
                if a.dim() == 4:
                    assert a.is_contiguous(memory_format=layout), (name, i)
                assert_matches_oracle(a, b, g, dtype, f"{name}[{i}] {tail} {shape}")


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_kernels_built(), reason="fastres._C built without CUDA kernels")
def test_fast_cuda_reductions_are_deterministic():
    """The last block merges the slices in a fixed order: the same input, the same bits."""
    x = _rand((16, 64, 29, 31), torch.bfloat16, torch.channels_last, "cuda")
    first = torch.ops.fastres.bn_stats(x, variant=1)
    for _ in range(3):
        again = torch.ops.fastres.bn_stats(x, variant=1)
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
