"""The 'triton' backend's fused training path (BatchNorm with batch statistics) against the oracle.

A block whose BatchNorms normalize with batch statistics runs its convolutions through
`fastres::conv2d_bn_train` (raw output + batch statistics from the epilogue, the previous BN +
ReLU applied in the input load) and its tail through `fastres::bn_train_act`. Checked here on
whole models: one training step (outputs, loss, every gradient, the running statistics, the
input gradient) under docs/contract.md §3's rule with the oracle in float32 as base and in
float64 as gold, SGD trajectories under the trajectory rule, checkpointing, autocast, torch.compile,
no_grad, and bad input.

On CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): narrow models on small images, but with enough values per channel at the
last stage that BatchNorm's 1/std does not turn float32 rounding into noise that decides the
comparison by chance.
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import pytest
import torch
from torch import nn

import fastres
from fastres.extension import EXTENSION_ERROR
from fastres.ops.conv2d_fused import interpreting
from fastres.testing import (
    OpRecorder,
    assert_matches_oracle,
    assert_trajectory_matches,
    randomize_norms,
    sgd_trajectory,
)

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=str(EXTENSION_ERROR))

CL = torch.channels_last
NCHW = torch.contiguous_format
TINY = dict(base_channels=8, zero_init_residual=False, norm_eval=False)
ONE_STAGE = dict(num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,))
# Res2Net launches scales - 1 chunk convs per 3x3: two stages cover a 'stage' block without and
# with the stride (and pool), 'normal' blocks and the avg_down shortcut.
TWO_STAGES = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))
NOT_PER_CHANNEL = "Expected more than 1 value per channel when training"


def build(cls, device, **kwargs) -> nn.Module:
    """A narrow model in train mode with non-trivial BatchNorms, on `device`, running the oracle."""
    model = cls(**{**TINY, **kwargs}, backend="torch")
    return randomize_norms(model).to(device).train()


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def assert_fused_training_forward(model: nn.Module, ops: list[str]) -> None:
    """No convolution or BatchNorm of the forward ran in PyTorch: every conv of a training-mode
    block (a Res2Net 'stage' block's chunk convs as one grouped conv) is one conv2d_bn_train."""
    assert "aten.convolution.default" not in ops, "a convolution ran in PyTorch"
    assert not [op for op in ops if "batch_norm" in op], "a BatchNorm ran in PyTorch"
    assert "fastres.bn_train_act.default" in ops, "no fused BatchNorm tail ran"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    grouped = sum(m.scales - 2 for m in model.modules() if getattr(m, "stage_type", "") == "stage")
    assert ops.count("fastres.conv2d_bn_train.default") == len(convs) - grouped


class Step(NamedTuple):
    outs: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    x_grad: torch.Tensor
    grads: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    targets: list[torch.Tensor]
    ops: list[str]


def train_step(model, x, targets=None, *, record=False, autocast=None) -> Step:
    """One forward + backward of the loss `sum((out - target)^2) / 2` over the outputs.

    targets: float64, one per output, drawn here (standard normal) where None. The gradient
    out - target then differs per element with a small per-channel mean against its spread:
    BatchNorm's backward removes that mean, and a large one (a plain sum) would leave the
    comparison to the cancellation's rounding. The loss is summed in float64, so it differs
    between runs only by their outputs, and it is a sum of squares, so no cancellation either.
    autocast: the dtype to run the forward under torch.autocast, or None.
    """
    x = x.detach().clone().requires_grad_()
    recorder = OpRecorder() if record else contextlib.nullcontext()
    amp = (
        torch.autocast(x.device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    with amp, recorder:
        outs = as_tuple(model(x))
    if targets is None:
        targets = [torch.randn(o.shape, dtype=torch.float64, device=o.device) for o in outs]
    loss = sum(((o.double() - t) ** 2).sum() / 2 for o, t in zip(outs, targets, strict=True))
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    ops = recorder.ops if record else []
    return Step(outs, loss.detach(), x.grad, grads, buffers, targets, ops)


def three_steps(model, x, layout=NCHW, **kwargs) -> tuple[Step, Step, Step]:
    """(triton in float32, oracle in float32, oracle in float64), each on a fresh copy."""
    gold = train_step(copy.deepcopy(model).double(), x.double())
    x = x.contiguous(memory_format=layout)
    base = train_step(copy.deepcopy(model).to(memory_format=layout), x, gold.targets)
    fused_model = copy.deepcopy(model).to(memory_format=layout).set_backend("triton")
    return train_step(fused_model, x, gold.targets, **kwargs), base, gold


def check_step(fused: Step, base: Step, gold: Step, dtype=torch.float32, grads=True) -> None:
    """docs/contract.md §3's rule for the outputs, the loss, the running statistics and (`grads`)
    the input gradient and every parameter gradient; num_batches_tracked exactly."""
    for i, (a, b, g) in enumerate(zip(fused.outs, base.outs, gold.outs, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        assert_matches_oracle(a, b, g, dtype, f"output {i}")
    assert_matches_oracle(fused.loss, base.loss, gold.loss, dtype, "loss")
    assert fused.buffers.keys() == gold.buffers.keys()
    for k, g in gold.buffers.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(fused.buffers[k], g), k
        else:
            assert_matches_oracle(fused.buffers[k], base.buffers[k], g, dtype, k)
    assert fused.grads.keys() == gold.grads.keys() and gold.grads
    for k, g in gold.grads.items():
        assert fused.grads[k] is not None, f"no gradient reached {k}"
        assert fused.grads[k].dtype == base.grads[k].dtype, k
        if grads:
            assert_matches_oracle(fused.grads[k], base.grads[k], g, dtype, f"grad {k}")
    assert fused.x_grad is not None and fused.x_grad.dtype == base.x_grad.dtype
    if grads:
        assert_matches_oracle(fused.x_grad, base.x_grad, gold.x_grad, dtype, "input gradient")


# (model class, kwargs, input layout, batch x height x width, whether gradients meet the rule).
#
# Gradients meet docs/contract.md §3's rule on models of up to two ResNet-50 stages (seven blocks)
# and on ResNet-18. Deeper, the float32 oracle itself is chaotic: batch-statistics BN amplifies the
# forward's rounding stage by stage (relative error 1e-6 after layer1, 1e-4 after layer4), so
# pre-activations near zero land on the other side of a ReLU than in float64 and each such element
# moves a per-channel gradient sum by a whole upstream gradient. On the whole ResNet-50 the oracle
# in channels_last fails the rule against the oracle in NCHW as base in 4-6 of 10 seeds (by up to
# 1e4x), so there only the forward, the loss and the running statistics are compared, and the
# gradients for presence, dtype and finiteness; the whole depths' gradients are compared in float64
# (test_whole_depth_training_step_float64). The whole-depth case runs at 64x64: at 32x32 layer4 is
# 1x1, its BatchNorms normalize over the batch's 4 values alone, and the float32 forward is chaotic
# there too (layer4's output off by 2e-4 to 5e-3 in the oracle itself, 3x apart between its two
# layouts; the fused run failed the 4x rule once in CI, seed 3639064001, at 5x a lucky base). At
# 64x64 (16 values) the oracle's error there is 5e-5 to 1e-4 and the fused run's is 0.4-0.8x of it
# at every output over 9 seeds.
R50_FULL = dict(depth=50)
STEP_CASES = {
    "resnet18-nchw": (fastres.ResNet, dict(depth=18), NCHW, (8, 32, 32), True),
    "resnet50-channels_last": (
        fastres.ResNet, dict(depth=50, **TWO_STAGES), CL, (4, 32, 32), True
    ),
    "resnet50-all-stages": (fastres.ResNet, R50_FULL, CL, (4, 64, 64), False),
    "resnetv1d50-odd": (fastres.ResNetV1d, dict(depth=50, **TWO_STAGES), NCHW, (4, 33, 29), True),
    "resnet50-caffe-dilated": (
        fastres.ResNet,
        dict(depth=50, style="caffe", num_stages=2, strides=(1, 2), dilations=(1, 2),
             out_indices=(0, 1)),
        CL, (4, 32, 32), True,
    ),
    "res2net50-strided": (
        fastres.Res2Net, dict(depth=50, base_width=6, **TWO_STAGES), CL, (4, 32, 32), True
    ),
    "res2net50-always-scales3": (
        fastres.Res2Net,
        dict(depth=50, base_width=6, scales=3, pool_last_chunk="always", **TWO_STAGES),
        NCHW, (4, 32, 32), True,
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    STEP_CASES.values(),
    ids=STEP_CASES.keys(),
)
def test_training_step_matches_oracle(device, case):
    """One training step with batch-statistics BN: the fused path runs, and the outputs, loss,
    running statistics, every parameter gradient and the input gradient match the oracle."""
    cls, kwargs, layout, (n, h, w), grads = case
    model = build(cls, device, **kwargs)
    x = torch.randn(n, 3, h, w, device=device)
    fused, base, gold = three_steps(model, x, layout, record=True)
    assert_fused_training_forward(model, fused.ops)
    # Under the interpreter the gradients are compared in float64 (below): a float32 ReLU-kink
    # flip, which moves a per-channel sum by a whole upstream gradient, happens to the fused
    # run and not to the oracle's in a few percent of seeds even at these depths.
    check_step(fused, base, gold, grads=grads and device.type == "cuda")
    assert all(torch.isfinite(g).all() for g in fused.grads.values())
    assert all(v.item() == 1 for k, v in fused.buffers.items() if "num_batches" in k)
    if device.type == "cpu":
        check_step(*float64_steps(model, x, layout), torch.float64)


def float64_steps(model, x, layout) -> tuple[Step, Step, Step]:
    """(triton, oracle in the other layout, oracle) in float64: exact-math checks."""
    other = NCHW if layout == CL else CL
    gold = train_step(copy.deepcopy(model).double().to(memory_format=layout),
                      x.double().contiguous(memory_format=layout))  # fmt: skip
    base_model = copy.deepcopy(model).double().to(memory_format=other)
    base = train_step(base_model, x.double().contiguous(memory_format=other), gold.targets)
    fused_model = copy.deepcopy(model).double().to(memory_format=layout).set_backend("triton")
    fused = train_step(fused_model, x.double().contiguous(memory_format=layout), gold.targets)
    return fused, base, gold


WHOLE_DEPTH = {
    "resnet50": (fastres.ResNet, dict(depth=50)),
    "resnetv1d50": (fastres.ResNetV1d, dict(depth=50)),
    "res2net50": (fastres.Res2Net, dict(depth=50, base_width=6)),
}


@pytest.mark.parametrize("case", WHOLE_DEPTH.values(), ids=WHOLE_DEPTH.keys())
def test_whole_depth_training_step_float64(case):
    """Every stage of ResNet-50 / V1d / Res2Net-50: one float64 training step through the
    kernels (the interpreter runs them in float64), every gradient and running statistic
    against the float64 oracle, whose channels_last run is the base (another summation order).
    In float32 these depths are chaotic through the ReLUs (see STEP_CASES)."""
    cls, kwargs = case
    model = build(cls, torch.device("cpu"), **kwargs)
    fused, base, gold = float64_steps(model, torch.randn(4, 3, 32, 32), NCHW)
    check_step(fused, base, gold, torch.float64)


TRAJECTORY_MODES = {
    "norm_eval=False": dict(norm_eval=False),
    "norm_eval=True": dict(norm_eval=True),
    "frozen_stages=1": dict(norm_eval=False, frozen_stages=1),
}


@pytest.mark.parametrize("mode", TRAJECTORY_MODES.values(), ids=TRAJECTORY_MODES.keys())
def test_trajectory_matches_oracle(device, mode):
    """20 SGD steps under docs/contract.md §3's trajectory rule: the fused run deviates from the
    oracle's by at most 4x the oracle's own NCHW / channels_last deviation + slack, per loss and
    per state tensor (parameters and buffers).

    In float64 where the kernels take it (the interpreter): in float32 a trajectory can fork for
    good where rounding flips a ReLU mask (seed 3847633788: one flip in layer1 at step 9 moved
    7% of a layer1 gradient, and the fork grew to 1.7e-4 by step 20), while the oracle's own two
    layouts need not flip anywhere; float64 leaves no such fork, so a deviation is a real one.
    On a GPU the kernels take no float64 and the run stays float32."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    kwargs = dict(depth=18, num_classes=5, **TWO_STAGES)
    model = build(fastres.ResNet, device, **kwargs, **mode).to(dtype)
    steps = 20
    xs = torch.randn(steps, 4, 3, 32, 32, device=device, dtype=dtype)
    targets = torch.randint(0, 5, (steps, 4), device=device)

    oracle = sgd_trajectory(model, xs, targets, NCHW)
    oracle_cl = sgd_trajectory(model, xs, targets, CL)
    fused = sgd_trajectory(copy.deepcopy(model).set_backend("triton"), xs, targets, CL)
    assert_trajectory_matches(fused, oracle, oracle_cl)


def test_with_cp_matches_plain_run(device):
    """Gradient checkpointing recomputes the fused blocks in the backward: same outputs and
    gradients as without, and the running statistics are updated once."""
    model = build(fastres.ResNetV1d, device, depth=50, **TWO_STAGES)
    cp_model = copy.deepcopy(model)
    for m in cp_model.modules():
        if hasattr(m, "with_cp"):
            m.with_cp = True
    x = torch.randn(4, 3, 32, 32, device=device)
    recorded = train_step(copy.deepcopy(model).set_backend("triton"), x, record=True)
    assert_fused_training_forward(model, recorded.ops)
    # Unrecorded, as the checkpointed run: a block is then one autograd node (see
    # test_block_is_one_node), whose gradients sum in another order than the recorded run's.
    plain = train_step(model.set_backend("triton"), x, recorded.targets)
    cp = train_step(cp_model.set_backend("triton"), x, plain.targets)
    for a, b in zip(cp.outs, plain.outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(cp.x_grad, plain.x_grad)
    torch.testing.assert_close(cp.grads, plain.grads)
    torch.testing.assert_close(cp.buffers, plain.buffers, rtol=0, atol=0)
    assert all(v.item() == 1 for k, v in cp.buffers.items() if "num_batches" in k)


def _graph_nodes(outs) -> list[str]:
    """The names of the autograd nodes behind outs."""
    seen, stack, names = set(), [o.grad_fn for o in outs], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


ONE_NODE_CASES = {
    "resnet18": (fastres.ResNet, dict(depth=18, **TWO_STAGES)),
    "resnetv1d50": (fastres.ResNetV1d, dict(depth=50, **TWO_STAGES)),
    # The tails (conv3, the shortcut, the last BN) as above, each middle one node of its own;
    # 'stage' blocks with a pooled last chunk, 'normal' blocks with the hierarchical add.
    "res2net50": (fastres.Res2Net, dict(depth=50, base_width=6, **TWO_STAGES)),
}


@pytest.mark.parametrize("variant", ["learning", "some-frozen", "cumulative"])
@pytest.mark.parametrize("case", ONE_NODE_CASES.values(), ids=ONE_NODE_CASES.keys())
def test_block_is_one_node(case, variant):
    """In eager mode with nothing watching the dispatch, the stem and each training-mode block
    are one autograd node each (`_TrainChain`: no per-convolution node); their outputs, every
    gradient and the running statistics equal those of the per-op path (which runs under a
    dispatch mode), in float64 (gradients reaching a tensor from several consumers sum in
    another order, hence not bit for bit). `some-frozen`: conv and BN parameters that want no
    gradient, in the stem and in blocks with and without a downsample, get none. A
    Bottle2neck's middle is a node of its own (`_TrainMiddle`). `cumulative`: BNs with
    momentum None, which the merge launch does not finalize: the chains run op by op, the
    middles finalize every BN by the extension's ops."""
    if not interpreting():
        pytest.skip("float64 runs through the kernels only under the interpreter")
    cls, kwargs = case
    model = build(cls, torch.device("cpu"), **kwargs).double()
    frozen, cumulative = variant == "some-frozen", variant == "cumulative"
    if cumulative:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    if frozen:
        suffixes = ("conv2.weight", "bn1.bias", "downsample.1.weight", "conv3.weight",
                    "convs.0.weight", "bns.1.weight")  # fmt: skip
        names = ("stem.0.weight", "stem.1.weight", "conv1.weight", "bn1.weight")
        for name, p in model.named_parameters():
            if name.endswith(suffixes) or name in names:
                p.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    per_op = train_step(copy.deepcopy(model).set_backend("triton"), x, record=True)
    chain_model = copy.deepcopy(model).set_backend("triton")
    chain = train_step(chain_model, x, per_op.targets)
    nodes = _graph_nodes(chain.outs)
    blocks = sum(isinstance(m, fastres.models.resnet.ResBlock) for m in model.modules())
    assert nodes.count("_TrainChainBackward") == (0 if cumulative else blocks + 1)
    middles = blocks if cls is fastres.Res2Net else 0
    assert nodes.count("_TrainMiddleBackward") == middles
    per_op_nodes = [n for n in nodes if n in ("_Conv2dBNTrainBackward", "_TrainActBackward")]
    assert bool(per_op_nodes) == cumulative
    assert "_TrainChainBackward" not in _graph_nodes(per_op.outs)
    torch.testing.assert_close(chain.outs, per_op.outs, rtol=0, atol=0)
    torch.testing.assert_close(chain.buffers, per_op.buffers, rtol=0, atol=0)
    assert chain.grads.keys() == per_op.grads.keys()
    frozen_grads = [p.grad for p in chain_model.parameters() if not p.requires_grad]
    assert bool(frozen_grads) == frozen and all(g is None for g in frozen_grads)
    # Another order of float64 sums: differences of about 1e-14 of a gradient's largest
    # element (resnetv1d50, 8 seeds); a wrong term would be of its order.
    for name, a, b in [("input", chain.x_grad, per_op.x_grad),
                       *((k, g, per_op.grads[k]) for k, g in chain.grads.items())]:  # fmt: skip
        assert (a - b).abs().max() <= 1e-11 * b.abs().max(), name


def test_autocast_bf16_training_step(device):
    """Under torch.autocast(bf16): the oracle's dtypes everywhere; outputs, loss and running
    statistics under the bf16 rule.

    Gradients are only checked for dtype: in bf16 a few outputs sit within rounding of a ReLU
    kink where the float64 gold takes the other branch, and each moves a per-channel sum by a
    whole upstream gradient (see the native backend's block test).
    """
    model = build(fastres.ResNet, device, depth=50, **TWO_STAGES)
    x = torch.randn(4, 3, 32, 32, device=device)
    gold = train_step(copy.deepcopy(model).double(), x.double())
    base = train_step(copy.deepcopy(model), x, gold.targets, autocast=torch.bfloat16)
    fused_model = copy.deepcopy(model).set_backend("triton")
    fused = train_step(fused_model, x, gold.targets, autocast=torch.bfloat16, record=True)
    assert all(o.dtype == torch.bfloat16 for o in fused.outs)
    assert_fused_training_forward(fused_model, fused.ops)
    check_step(fused, base, gold, torch.bfloat16, grads=False)
    assert all(torch.isfinite(g).all() for g in fused.grads.values())


COMPILE_CASES = {
    "resnet50": (fastres.ResNet, dict(depth=50, **TWO_STAGES)),
    "res2net50": (fastres.Res2Net, dict(depth=50, base_width=6, scales=3, **TWO_STAGES)),
}


@pytest.mark.parametrize("case", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_torch_compile_training_step(device, case):
    """torch.compile(fullgraph=True) traces a fused training step (custom ops with fake
    implementations, the running-statistics update as buffer mutations) and matches."""
    cls, kwargs = case
    # float64 under the interpreter, for the reason given in test_training_step_matches_oracle.
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    model = build(cls, device, **kwargs)
    x = torch.randn(4, 3, 32, 32, device=device)
    gold = train_step(copy.deepcopy(model).double(), x.double())
    base_model = copy.deepcopy(model).to(dtype).to(memory_format=CL)
    base = train_step(base_model, x.to(dtype).contiguous(memory_format=CL), gold.targets)
    fused_model = copy.deepcopy(model).to(dtype).set_backend("triton")
    x = x.to(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(fused_model, backend="aot_eager", fullgraph=True)
    fused = train_step(compiled, x, gold.targets)
    # The compiled module's parameter names carry an `_orig_mod.` prefix.
    fused = fused._replace(
        grads={k.removeprefix("_orig_mod."): v for k, v in fused.grads.items()},
        buffers={k.removeprefix("_orig_mod."): v for k, v in fused.buffers.items()},
    )
    check_step(fused, base, gold, dtype)


def test_no_grad_training_forward(device):
    """train() under torch.no_grad(): batch statistics and running-statistics updates, no
    autograd graph."""
    model = build(fastres.Res2Net, device, depth=50, base_width=6, **TWO_STAGES)
    x = torch.randn(4, 3, 32, 32, device=device)
    gold_model, base_model = copy.deepcopy(model).double(), copy.deepcopy(model)
    fused_model = copy.deepcopy(model).set_backend("triton")
    with torch.no_grad():
        gold, base = gold_model(x.double()), base_model(x)
        with OpRecorder() as recorder:
            fused = fused_model(x)
    assert_fused_training_forward(fused_model, recorder.ops)
    for i, (a, b, g) in enumerate(zip(fused, base, gold, strict=True)):
        assert not a.requires_grad and a.grad_fn is None
        assert_matches_oracle(a, b, g, torch.float32, f"output {i}")
    for (k, a), b, g in zip(
        fused_model.named_buffers(), base_model.buffers(), gold_model.buffers(), strict=True
    ):
        if k.endswith("num_batches_tracked"):
            assert a.item() == g.item() == 1, k
        else:
            assert_matches_oracle(a, b, g, torch.float32, k)


def test_one_value_per_channel_raises_like_torch(device):
    """A batch of one image that is 1x1 at the last stage: torch's ValueError."""
    model = build(fastres.ResNet, device, depth=18)
    x = torch.randn(1, 3, 32, 32, device=device)
    with pytest.raises(ValueError, match=NOT_PER_CHANNEL):
        copy.deepcopy(model)(x)
    with pytest.raises(ValueError, match=NOT_PER_CHANNEL):
        copy.deepcopy(model).set_backend("triton")(x)


@pytest.mark.parametrize("cls", [fastres.ResNet, fastres.Res2Net], ids=["resnet50", "res2net50"])
def test_empty_batch(device, cls):
    """An empty batch in training gives empty outputs of the oracle's shapes and leaves the
    state as the oracle does (statistics unchanged, num_batches_tracked counted)."""
    model = build(cls, device, depth=50, **TWO_STAGES)
    x = torch.randn(0, 3, 32, 32, device=device)
    oracle, fused_model = copy.deepcopy(model), copy.deepcopy(model).set_backend("triton")
    expected = oracle(x)
    outs = fused_model(x)
    assert [o.shape for o in outs] == [o.shape for o in expected]
    assert all(o.dtype == e.dtype for o, e in zip(outs, expected, strict=True))
    torch.testing.assert_close(fused_model.state_dict(), oracle.state_dict(), rtol=0, atol=0)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct 4-D tensors autograd saves in one forward (activations only)."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.dim() == 4 and t.shape[0] == x.shape[0]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_saves_only_raw_conv_outputs():
    """ResNet-50's first stage saves, per block, its input and its raw conv outputs (y1, y2, y3,
    and the shortcut conv's in the first block), never a normalized activation: per identity
    block 2 narrow + 2 wide tensors where eager saves 4 narrow (BN inputs and ReLU outputs) + 2
    wide, 10 / 12 of eager's bytes with a 4x expansion (0.76 over this three-block stage)."""
    model = build(fastres.ResNet, torch.device("cpu"), depth=50, **ONE_STAGE)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL).requires_grad_()
    narrow = x.numel() * x.element_size()  # a width-8 activation; wide ones have 32 channels
    wide = 4 * narrow
    fused = saved_activation_bytes(copy.deepcopy(model).set_backend("triton").layer1, x)
    # x and y1, y2 of each block; y3 of each block, yd, and the inputs of blocks 1 and 2.
    assert fused == (1 + 2 * 3) * narrow + (3 + 1 + 2) * wide
    eager = saved_activation_bytes(copy.deepcopy(model).to(memory_format=CL).layer1, x)
    assert eager == (1 + 4 * 3) * narrow + (3 + 1 + 3) * wide
