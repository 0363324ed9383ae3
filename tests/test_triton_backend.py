"""The 'triton' backend: whole models through the fused Triton convolution against the oracle.

On CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so the models are tiny (base_channels 8, 32x32 images); the same tests run
on CUDA where a GPU is present.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fastres
from fastres.testing import OpRecorder, assert_matches_oracle, randomize_norms

pytest.importorskip("triton")

CL = torch.channels_last
TINY = dict(base_channels=8, zero_init_residual=False)
ONE_STAGE = dict(num_stages=1, strides=(1,), dilations=(1,), out_indices=(0,))
# Res2Net launches scales - 1 convs per 3x3: two stages keep the interpreter time down while
# covering stage and normal blocks, a strided stage block and the avg_down shortcut.
TWO_STAGES = dict(num_stages=2, strides=(1, 2), dilations=(1, 1), out_indices=(0, 1))


def build(cls, device, **kwargs) -> torch.nn.Module:
    """A tiny model with non-trivial BatchNorms, on `device`, running the oracle backend."""
    model = cls(**{**TINY, **kwargs}, backend="torch")
    return randomize_norms(model).to(device)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def check_eval_forward(model, x, dtype, *, channels_last_input=False):
    """Runs `model` in eval mode with the triton backend and checks it against the oracle."""
    model.eval()
    if channels_last_input:
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        gold = as_tuple(copy.deepcopy(model).double()(x.double()))
        base = as_tuple(copy.deepcopy(model).to(dtype)(x.to(dtype)))
        fused_model = copy.deepcopy(model).to(dtype).set_backend("triton")
        with OpRecorder() as recorder:
            fused = as_tuple(fused_model(x.to(dtype)))
    convs = [m for m in fused_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert "aten.convolution.default" not in recorder.ops, "a convolution ran in PyTorch"
    assert not [op for op in recorder.ops if "batch_norm" in op], "a BatchNorm ran in PyTorch"
    fused_calls = [op for op in recorder.ops if op.startswith("fastres.conv2d_fused")]
    # A Res2Net 'stage' block runs its scales - 1 chunk convolutions as one grouped launch.
    grouped = sum(
        m.scales - 2 for m in fused_model.modules() if getattr(m, "stage_type", None) == "stage"
    )
    assert len(fused_calls) == len(convs) - grouped, "every convolution is one fused kernel"
    assert len(fused) == len(gold)
    for i, (a, b, g) in enumerate(zip(fused, base, gold, strict=True)):
        assert a.dtype == b.dtype and a.shape == g.shape
        if a.dim() == 4:
            # The backend keeps activations channels_last whatever the input's layout.
            assert a.is_contiguous(memory_format=CL)
        assert_matches_oracle(a, b, g, dtype, f"output {i}")


EVAL_CASES = {
    "resnet18-fp32-nchw": (fastres.ResNet, dict(depth=18), torch.float32, False, (32, 32)),
    "resnet18-classifier-bf16": (
        fastres.ResNet, dict(depth=18, num_classes=10), torch.bfloat16, True, (32, 32)
    ),
    "resnet50-fp32-channels_last": (fastres.ResNet, dict(depth=50), torch.float32, True, (32, 32)),
    "resnet50-bf16": (fastres.ResNet, dict(depth=50), torch.bfloat16, False, (32, 32)),
    "resnet50-caffe-dilated-fp16": (
        fastres.ResNet,
        dict(depth=50, style="caffe", strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)),
        torch.float16, False, (32, 32),
    ),
    "resnetv1c50-fp32": (fastres.ResNetV1c, dict(depth=50), torch.float32, False, (32, 32)),
    "resnetv1d50-fp32-odd": (fastres.ResNetV1d, dict(depth=50), torch.float32, False, (35, 29)),
    "res2net50-fp32": (
        fastres.Res2Net, dict(depth=50, base_width=6, **TWO_STAGES), torch.float32, True, (32, 32)
    ),
    "res2net50-always-bf16": (
        fastres.Res2Net,
        dict(depth=50, base_width=6, scales=3, pool_last_chunk="always", **TWO_STAGES),
        torch.bfloat16, False, (32, 32),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", EVAL_CASES.values(), ids=EVAL_CASES.keys())
def test_eval_forward_matches_oracle(device, case):
    cls, kwargs, dtype, channels_last_input, hw = case
    model = build(cls, device, **kwargs)
    x = torch.randn(2, 3, *hw, device=device)
    check_eval_forward(model, x, dtype, channels_last_input=channels_last_input)


GRAD_CASES = {
    "resnet50-norm_eval-frozen1": (fastres.ResNet, dict(depth=50, frozen_stages=1)),
    "resnetv1d50-norm_eval": (fastres.ResNetV1d, dict(depth=50)),
    "res2net50-norm_eval": (
        fastres.Res2Net, dict(depth=50, base_width=6, scales=3, **TWO_STAGES)
    ),
    "resnet18-frozen-bn-params": (
        fastres.ResNet, dict(depth=18, norm_cfg=dict(type="BN", requires_grad=False))
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_bn_eval_training_gradients(device, case):
    """In training with BN in eval mode (norm_eval, frozen stages) the fused folded path runs,
    and every gradient (conv weights, BN weight / bias through the fold, the input) matches.

    Under the interpreter the gradients are compared in float64, as in test_triton_training: in
    float32 a pre-activation within rounding of a ReLU kink (seen at 3e-9 of the tensor's
    largest value) lands on the other side in the fused run, and its element then moves an
    upstream weight gradient by a whole gradient (stem.0.weight by 3%)."""
    cls, kwargs = case
    model = build(cls, device, **kwargs).train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, 3, 32, 32, device=device)
    grad_outs = None

    def run(m, dtype, layout=torch.contiguous_format):
        nonlocal grad_outs
        m = m.to(dtype).to(memory_format=layout)
        xi = x.to(dtype, memory_format=layout, copy=True).requires_grad_()
        outs = as_tuple(m(xi))
        if grad_outs is None:
            grad_outs = [torch.randn_like(o, dtype=torch.float64) for o in outs]
        loss = sum((o * g.to(dtype)).sum() for o, g in zip(outs, grad_outs, strict=True))
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        return outs, grads, xi.grad

    def check(fused, base, gold, dtype, grads=True):
        for i, (a, b, g) in enumerate(zip(fused[0], base[0], gold[0], strict=True)):
            assert_matches_oracle(a, b, g, dtype, f"output {i}")
        assert gold[1].keys() == fused[1].keys() and gold[1]
        for name in gold[1]:
            assert fused[1][name] is not None, f"no gradient reached {name}"
            if grads:
                assert_matches_oracle(fused[1][name], base[1][name], gold[1][name], dtype, name)
        if grads:
            assert_matches_oracle(fused[2], base[2], gold[2], dtype, "input gradient")

    gold = run(copy.deepcopy(model), torch.float64)
    base = run(copy.deepcopy(model), torch.float32)
    fused_model = copy.deepcopy(model).set_backend("triton")
    with OpRecorder() as recorder:
        fused = run(fused_model, torch.float32)
    assert "aten.convolution.default" not in recorder.ops, "forward ran a PyTorch convolution"
    check(fused, base, gold, torch.float32, grads=device.type == "cuda")
    for name, p in fused_model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen parameter {name} got a gradient"
    if device.type == "cpu":
        # The float64 oracle in channels_last (another summation order) is the base.
        base = run(copy.deepcopy(model), torch.float64, torch.channels_last)
        with OpRecorder() as recorder:
            fused = run(copy.deepcopy(model).set_backend("triton"), torch.float64)
        assert "aten.convolution.default" not in recorder.ops, "float64 ran the oracle"
        check(fused, base, gold, torch.float64)


def test_groupnorm_falls_back_and_float64_runs_only_interpreted(device):
    gn = build(
        fastres.ResNet, device, depth=18, norm_cfg=dict(type="GN", num_groups=4), **ONE_STAGE
    )
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        gold = gn.eval()(x)
        torch.testing.assert_close(copy.deepcopy(gn).set_backend("triton")(x), gold)
        bn = build(fastres.ResNet, device, depth=18, **ONE_STAGE).eval().double()
        gold = bn(x.double())
        fused = bn.set_backend("triton")(x.double())
    if device.type == "cuda":
        torch.testing.assert_close(fused, gold, rtol=0, atol=0)  # the oracle ran
    else:
        # The interpreter runs float64 through the kernels, for float64 tests of whole models.
        torch.testing.assert_close(fused, gold)


def test_fold_cache_tracks_parameter_updates(device):
    """The folded weights are cached, follow in-place updates, and never change the model."""
    model = build(fastres.ResNet, device, depth=18, **ONE_STAGE).eval()
    fused_model = copy.deepcopy(model).set_backend("triton")
    before = copy.deepcopy(fused_model.state_dict())
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        first = fused_model(x)
        torch.testing.assert_close(fused_model.state_dict(), before, rtol=0, atol=0)
        for m in (model, fused_model):
            m.layer1[1].bn2.weight.mul_(-2.0)
            m.layer1[0].conv1.weight.add_(0.5)
            m.bn1.running_var.mul_(3.0)
        second = fused_model(x)
        gold = copy.deepcopy(model).double()(x.double())
        base = model(x)
    assert (first[0] - second[0]).abs().max() > 0.1, "stale folded weights were used"
    assert_matches_oracle(second[0], base[0], gold[0], torch.float32, "after update")


def test_autocast(device):
    model = build(fastres.ResNet, device, depth=18, **ONE_STAGE).eval()
    x = torch.randn(2, 3, 16, 16, device=device)
    with torch.no_grad():
        gold = copy.deepcopy(model).double()(x.double())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            base = model(x)
            fused = copy.deepcopy(model).set_backend("triton")(x)
    assert fused[0].dtype == base[0].dtype == torch.bfloat16
    assert_matches_oracle(fused[0], base[0], gold[0], torch.bfloat16, "autocast")


def test_deepcopy_and_pickle(device):
    model = build(fastres.ResNet, device, depth=18, **ONE_STAGE).eval().set_backend("triton")
    x = torch.randn(1, 3, 16, 16, device=device)
    with torch.no_grad():
        expected = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_unavailable_reason(monkeypatch):
    from fastres.ops import conv2d_fused

    backend = fastres.backends._REGISTRY["triton"]
    # TRITON_INTERPRET as fastres.ops.conv2d_fused was imported (it is read once).
    monkeypatch.setattr(conv2d_fused, "INTERPRET", True)
    assert backend.unavailable_reason("cpu") is None
    assert fastres.available_backends()["triton"].available
    monkeypatch.setattr(conv2d_fused, "INTERPRET", False)
    assert "TRITON_INTERPRET" in backend.unavailable_reason("cpu")
    assert "Triton" in backend.unavailable_reason("mps")
    if not torch.cuda.is_available():
        assert "CUDA" in backend.unavailable_reason("cuda")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fastres.ResNet(depth=18, backend="triton")


COMPILE_CASES = {
    "aot_eager-resnet18": ("aot_eager", fastres.ResNet, dict(depth=18, **ONE_STAGE)),
    "aot_eager-res2net50": (
        "aot_eager",
        fastres.Res2Net,
        dict(depth=50, base_width=6, scales=3, pool_last_chunk="always", **ONE_STAGE),
    ),
    # Inductor compiles C++ on CPU (a minute on a cold cache): one model is enough.
    "inductor-resnet18": pytest.param(
        ("inductor", fastres.ResNet, dict(depth=18, **ONE_STAGE)), marks=pytest.mark.slow
    ),
}


@pytest.mark.parametrize("case", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_torch_compile_fullgraph(device, case):
    """torch.compile(fullgraph=True) traces the fused model (custom ops with fake
    implementations, the fold as ordinary ops) in inference and in BN-eval training."""
    compiler, cls, kwargs = case
    model = build(cls, device, **kwargs)
    x = torch.randn(2, 3, 16, 16, device=device)
    gold_model = copy.deepcopy(model).double()
    fused_model = copy.deepcopy(model).set_backend("triton")
    compiled = torch.compile(fused_model, backend=compiler, fullgraph=True)

    fused_model.eval()
    gold_model.eval()
    with torch.no_grad():
        gold, base, fused = gold_model(x.double()), model.eval()(x), compiled(x)
    assert_matches_oracle(fused[0], base[0], gold[0], torch.float32, "compiled eval output")

    # Training with norm_eval: BN stays in eval mode, the fold is differentiated.
    torch._dynamo.reset()
    for m in (model, gold_model, fused_model):
        m.train()
    compiled = torch.compile(fused_model, backend=compiler, fullgraph=True)
    grad_out = torch.randn_like(gold[0])
    for m, inp, out_grad in (
        (gold_model, x.double(), grad_out),
        (model, x, grad_out.float()),
        (compiled, x, grad_out.float()),
    ):
        (m(inp)[0] * out_grad).sum().backward()
    for (name, p_fused), p_base, p_gold in zip(
        fused_model.named_parameters(), model.parameters(), gold_model.parameters(), strict=True
    ):
        assert p_fused.grad is not None, f"no gradient reached {name}"
        assert_matches_oracle(p_fused.grad, p_base.grad, p_gold.grad, torch.float32, name)


def test_auto_units_convert_what_another_implementation_hands_them():
    """Under autocast the triton backend converts a block's input once; the eval units 'auto'
    runs (`EVAL_UNITS`) may get a unit's input from another implementation, in another dtype
    (here float32 under bf16 autocast), and take it to the compute dtype themselves."""
    from fastres.backends import triton
    from fastres.backends.plan import REFERENCE

    block = build(fastres.ResNet, "cpu", depth=18, **TWO_STAGES).eval().layer2[0]
    gold_plan = copy.deepcopy(block).double().plan()
    h = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL)  # conv1's input (stride 2)
    h2 = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)  # conv2's
    cases = {
        "unit": lambda impl, plan, t: impl.unit(plan.units[0], t(h)),
        "tail": lambda impl, plan, t: impl.tail(plan.units[1], t(h2), t(h), plan.shortcut),
    }
    for name, run in cases.items():
        with torch.no_grad():
            gold = run(REFERENCE, gold_plan, torch.Tensor.double)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = run(triton.EVAL_UNITS, block.plan(), lambda t: t)
                base = run(REFERENCE, block.plan(), lambda t: t)
        assert out.dtype == torch.bfloat16, name
        assert_matches_oracle(out, base, gold, torch.bfloat16, name)
