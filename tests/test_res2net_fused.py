"""The fused Res2Net block (split-conv-concat without split, concat or add tensors) against the
float64 oracle with the docs/contract.md §3 rule.

- the kernel features it is built from: the hierarchical add in the conv's input load
  (`input_add`), the grouped launch of a 'stage' block (`groups`), the last-chunk pool written
  into a slice (`fastres::res2net_pool_out`);
- single Bottle2neck blocks of each kind, both pool rules, stride 1 / 2, dilation 2, caffe
  style, widths 26 / 14 and odd ones with scales 4 and 8, in eval and in BN-frozen training;
- that the no-grad path dispatches no cat / split / add / copy between the chunk convs;
- whole Res2Net-50 / -101 on tiny images.

On CPU the kernels run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny; the same tests run on CUDA where a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres.models.res2net import Bottle2neck
from fastres.ops.batchnorm_reference import bn_stats
from fastres.testing import OpRecorder, assert_matches_oracle, randomize_norms

pytest.importorskip("triton")

from fastres.ops.conv2d_fused import arrange_weight, conv2d_fused  # noqa: E402
from fastres.ops.res2net_pool import res2net_pool  # noqa: E402

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nhwc(*shape, device, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=CL)


# -- kernel features ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_add_reads_two_slices(device, dtype):
    """conv(a + b) with a, b channel slices of two buffers, written into a third buffer's slice:
    the add happens in the input load (sum rounded to the dtype, padding zero)."""
    n, width, h, w = 2, 13, 7, 6
    chunks = nhwc(n, 4 * width, h, w, device=device)
    outputs = nhwc(n, 4 * width, h, w, device=device)
    a, b = chunks[:, 2 * width : 3 * width], outputs[:, width : 2 * width]
    weight = torch.randn(width, width, 3, 3, device=device, dtype=torch.float64) / 10
    bias = torch.randn(width, device=device, dtype=torch.float64)
    low = (chunks.to(dtype), outputs.to(dtype))
    target = low[1].clone()
    target[:, 2 * width : 3 * width] = float("nan")
    conv2d_fused(
        low[0][:, 2 * width : 3 * width], arrange_weight(weight.to(dtype)), bias.float(),
        padding=2, dilation=2, relu=True, input_add=target[:, width : 2 * width],
        out=target[:, 2 * width : 3 * width],
    )  # fmt: skip
    gold = F.conv2d(a + b, weight, bias, padding=2, dilation=2).relu()
    la, lb = low[0][:, 2 * width : 3 * width], low[1][:, width : 2 * width]
    base = F.conv2d(la + lb, weight.to(dtype), bias.to(dtype), padding=2, dilation=2).relu()
    assert_matches_oracle(target[:, 2 * width : 3 * width], base, gold, dtype, "conv(a + b)")
    untouched = torch.cat([target[:, : 2 * width], target[:, 3 * width :]], 1)
    expected = torch.cat([low[1][:, : 2 * width], low[1][:, 3 * width :]], 1)
    torch.testing.assert_close(untouched, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups,width,stride", [(3, 13, 1), (7, 7, 2), (3, 26, 2)], ids=str)
def test_grouped_launch(device, groups, width, stride, dtype):
    """groups independent convs of odd width in one launch equal nn.Conv2d(groups=...)."""
    n, h, w = 2, 7, 9
    x = nhwc(n, (groups + 1) * width, h, w, device=device)[:, width:]
    weight = torch.randn(groups * width, width, 3, 3, device=device, dtype=torch.float64) / 12
    bias = torch.randn(groups * width, device=device, dtype=torch.float64)
    xd = x.to(dtype)
    actual = conv2d_fused(
        xd, arrange_weight(weight.to(dtype)), bias.float(), stride=stride, padding=1,
        groups=groups, relu=True,
    )  # fmt: skip
    gold = F.conv2d(x, weight, bias, stride, 1, 1, groups).relu()
    base = F.conv2d(xd, weight.to(dtype), bias.to(dtype), stride, 1, 1, groups).relu()
    assert_matches_oracle(actual, base, gold, dtype, "grouped conv")


def test_grouped_stats(device):
    """Per-channel statistics of a grouped launch land in each group's channels (the epilogue
    the batch-statistics training path will use on the same launch)."""
    n, width, groups = 2, 13, 3
    x = nhwc(n, groups * width, 6, 7, device=device)
    weight = torch.randn(groups * width, width, 3, 3, device=device, dtype=torch.float64) / 12
    out, mean, m2 = conv2d_fused(
        x.float(), arrange_weight(weight.float()), padding=1, groups=groups, stats=True
    )
    gold = F.conv2d(x, weight, None, 1, 1, 1, groups)
    base = F.conv2d(x.float(), weight.float(), None, 1, 1, 1, groups)
    assert_matches_oracle(out, base, gold, torch.float32, "out")
    (base_mean, base_m2), (gold_mean, gold_m2) = bn_stats(base), bn_stats(gold)
    assert_matches_oracle(mean, base_mean, gold_mean, torch.float32, "mean")
    assert_matches_oracle(m2, base_m2, gold_m2, torch.float32, "m2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_and_group_gradients(device, dtype):
    """Gradients of the functional op through input_add and groups (the BN-frozen training
    path): x, input_add, weight, bias."""
    n, width, groups = 2, 7, 3
    f64 = dict(device=device, dtype=torch.float64)
    leaves = {
        "x": torch.randn(n, groups * width, 6, 5, **f64),
        "add": torch.randn(n, groups * width, 6, 5, **f64),
        "weight": torch.randn(groups * width, width, 3, 3, **f64) / 8,
        "bias": torch.randn(groups * width, **f64),
    }
    grad_out = torch.randn(n, groups * width, 6, 5, **f64)

    def run(fused, cast):
        t = {k: cast(v).detach().requires_grad_() for k, v in leaves.items()}
        if fused:
            y = conv2d_fused(
                t["x"], arrange_weight(t["weight"]), t["bias"], padding=1, groups=groups,
                input_add=t["add"],
            )  # fmt: skip
        else:
            y = F.conv2d(t["x"] + t["add"], t["weight"], t["bias"], 1, 1, 1, groups)
        y.backward(cast(grad_out))
        return y, {k: v.grad for k, v in t.items()}

    low = lambda t: t.to(dtype)
    y, grads = run(True, low)
    y_gold, grads_gold = run(False, lambda t: t)
    y_base, grads_base = run(False, low)
    assert_matches_oracle(y, y_base, y_gold, dtype, "out")
    for name in leaves:
        assert_matches_oracle(grads[name], grads_base[name], grads_gold[name], dtype, f"d{name}")


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("stride,hw", [(1, (7, 6)), (2, (7, 6)), (2, (8, 9))], ids=str)
def test_last_chunk_pool(device, stride, hw, dtype):
    """AvgPool2d(3, stride, 1) of a chunk slice, written into the last slice of another buffer;
    float64 sums in float64 (whole float64 models run the kernel under the interpreter)."""
    n, width = 2, 13
    src = nhwc(n, 4 * width, *hw, device=device)
    chunk = src[:, 3 * width :]
    oh, ow = (hw[0] - 1) // stride + 1, (hw[1] - 1) // stride + 1
    cat = torch.full((n, 4 * width, oh, ow), float("nan"), device=device, dtype=dtype)
    cat = cat.contiguous(memory_format=CL)
    res2net_pool(chunk.to(dtype), cat[:, 3 * width :], stride=stride)
    pool = nn.AvgPool2d(3, stride, 1)
    assert_matches_oracle(cat[:, 3 * width :], pool(chunk.to(dtype)), pool(chunk), dtype, "pool")
    assert torch.isnan(cat[:, : 3 * width]).all(), "wrote outside its channel slice"


def test_overlapping_out_is_rejected(device):
    """Disjoint channel slices of one buffer may be read and written in one launch; a slice
    that overlaps an input may not."""
    buf = nhwc(1, 24, 4, 4, device=device, dtype=torch.float32)
    weight = torch.randn(8, 8, 1, 1, device=device)
    conv2d_fused(buf[:, :8], weight, input_add=buf[:, 8:16], out=buf[:, 16:])
    with pytest.raises(ValueError, match="share memory with input_add"):
        conv2d_fused(buf[:, :8], weight, input_add=buf[:, 12:20], out=buf[:, 16:])
    with pytest.raises(ValueError, match="share memory with x"):
        res2net_pool(buf[:, :8], buf[:, 4:12])


# -- Bottle2neck blocks ---------------------------------------------------------------------

# name: (stage_type, pool_last_chunk, stride, dilation, style, planes, base_width, scales)
# planes / base_width over base_channels 16 give the width: 16 * 26 / 16 = 26, 14, 13, 7.
BLOCKS = {
    "stage-strided-s2-w26x4": ("stage", "strided", 2, 1, "pytorch", 16, 26, 4),
    "stage-strided-s1-w14x8": ("stage", "strided", 1, 1, "pytorch", 16, 14, 8),
    "stage-always-s1-w26x4": ("stage", "always", 1, 1, "pytorch", 16, 26, 4),
    "stage-always-s2-w14x8": ("stage", "always", 2, 1, "pytorch", 16, 14, 8),
    "stage-strided-s2-dil2-w13x4": ("stage", "strided", 2, 2, "pytorch", 8, 26, 4),
    "stage-always-s1-dil2-w7x8": ("stage", "always", 1, 2, "pytorch", 8, 14, 8),
    "stage-strided-s1-dil2-w13x4": ("stage", "strided", 1, 2, "pytorch", 8, 26, 4),
    "stage-always-s2-dil2-w26x8": ("stage", "always", 2, 2, "pytorch", 16, 26, 8),
    "stage-strided-caffe-s2-w13x4": ("stage", "strided", 2, 1, "caffe", 8, 26, 4),
    "stage-always-caffe-s2-w7x4": ("stage", "always", 2, 1, "caffe", 8, 14, 4),
    "normal-w26x4": ("normal", "strided", 1, 1, "pytorch", 16, 26, 4),
    "normal-w14x8": ("normal", "always", 1, 1, "pytorch", 16, 14, 8),
    "normal-dil2-w13x8": ("normal", "strided", 1, 2, "pytorch", 8, 26, 8),
    "normal-dil2-w7x4": ("normal", "always", 1, 2, "pytorch", 8, 14, 4),
}  # fmt: skip


def make_block(case, device) -> Bottle2neck:
    """A Bottle2neck with non-trivial BatchNorms; 'stage' blocks get a downsample shortcut."""
    stage_type, pool_rule, stride, dilation, style, planes, base_width, scales = case
    inplanes = planes * 4 if stage_type == "normal" else 24
    downsample = None
    if stage_type == "stage":
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
        )
    block = Bottle2neck(
        inplanes, planes, scales=scales, base_width=base_width, base_channels=16,
        stage_type=stage_type, pool_last_chunk=pool_rule, stride=stride, dilation=dilation,
        style=style, downsample=downsample,
    )  # fmt: skip
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return randomize_norms(block).to(device)


def bn_frozen(block: nn.Module) -> Bottle2neck:
    """block in training mode with every BatchNorm in eval mode (norm_eval, frozen stages)."""
    block.train()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return block


def run_triton(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return fastres.backends.resolve("triton", x.device).run_block(block, x)


@pytest.mark.parametrize("case", BLOCKS.values(), ids=BLOCKS.keys())
def test_block_eval(device, case):
    block = make_block(case, device).eval()
    x = torch.randn(2, block.conv1.in_channels, 9, 8, device=device)
    assert block.width in (26, 14, 13, 7)
    # Dtypes and layouts rotate over the cases, to keep the interpreter time down.
    index = list(BLOCKS.values()).index(case)
    dtype = DTYPES[index % 3]
    if index % 2:
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        gold = copy.deepcopy(block).double().forward_reference(x.double())
        low = copy.deepcopy(block).to(dtype)
        base = low.forward_reference(x.to(dtype))
        fused = run_triton(low, x.to(dtype))
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=CL)
    assert_matches_oracle(fused, base, gold, dtype, "block output")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_eval_dtypes(device, dtype):
    """Every dtype on the two most common blocks (a strided stage block, a normal one)."""
    for name in ("stage-always-s2-w14x8", "normal-w26x4"):
        block = make_block(BLOCKS[name], device).eval()
        x = torch.randn(2, block.conv1.in_channels, 8, 8, device=device)
        with torch.no_grad():
            gold = copy.deepcopy(block).double().forward_reference(x.double())
            low = copy.deepcopy(block).to(dtype)
            base = low.forward_reference(x.to(dtype))
            fused = run_triton(low, x.to(dtype))
        assert_matches_oracle(fused, base, gold, dtype, name)


GRAD_BLOCKS = ["stage-always-s2-w14x8", "stage-strided-s1-w14x8", "normal-dil2-w7x4"]


@pytest.mark.parametrize("params_frozen", [False, True], ids=["learning", "params-frozen"])
@pytest.mark.parametrize("name", GRAD_BLOCKS)
def test_block_bn_frozen_gradients(device, name, params_frozen):
    """BN in eval mode while training (norm_eval, frozen stages): the differentiable fused path
    gives every parameter's gradient and the input's as the oracle does; with every parameter
    frozen (the middle then runs on the cached folded weights) the input's alone."""
    block = bn_frozen(make_block(BLOCKS[name], device)).requires_grad_(not params_frozen)
    x = torch.randn(2, block.conv1.in_channels, 8, 7, device=device)
    grad_out = None

    def run(b, dtype, fused):
        nonlocal grad_out
        b = copy.deepcopy(b).to(dtype)
        xi = x.to(dtype).requires_grad_()
        y = run_triton(b, xi) if fused else b.forward_reference(xi)
        if grad_out is None:
            grad_out = torch.randn_like(y, dtype=torch.float64)
        y.backward(grad_out.to(dtype))
        return y, {n: p.grad for n, p in b.named_parameters()}, xi.grad

    gold = run(block, torch.float64, False)
    base = run(block, torch.float32, False)
    fused = run(block, torch.float32, True)
    assert_matches_oracle(fused[0], base[0], gold[0], torch.float32, "output")
    for n in gold[1]:
        if params_frozen:
            assert fused[1][n] is None, f"a gradient reached frozen {n}"
            continue
        assert fused[1][n] is not None, f"no gradient reached {n}"
        assert_matches_oracle(fused[1][n], base[1][n], gold[1][n], torch.float32, n)
    assert_matches_oracle(fused[2], base[2], gold[2], torch.float32, "input gradient")


@pytest.mark.parametrize("name", ["stage-always-s2-w14x8", "normal-w26x4"])
def test_block_bn_frozen_middle_is_one_node(device, name):
    """BN-frozen training runs conv1 and the chunk convs as inference does (no concatenation,
    add or copy forward), as one autograd node; with no gradient wanted for the input (its
    producer frozen) the parameters' gradients still match the oracle's."""
    block = bn_frozen(make_block(BLOCKS[name], device))
    x = torch.randn(2, block.conv1.in_channels, 8, 8, device=device).contiguous(memory_format=CL)
    with OpRecorder() as recorder:
        y = run_triton(block, x)
    # Views of conv1's output and of the stacked chunk weights are taken, nothing is copied.
    copies = [op for op in recorder.ops if op.split(".")[1] in ("cat", "add", "copy_", "clone")]
    assert not copies, copies
    nodes, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            stack += [next_node for next_node, _ in node.next_functions]
    assert "_FrozenMiddleBackward" in nodes, nodes
    grad_out = torch.randn_like(y, dtype=torch.float64)

    def grads(b, dtype, fused):
        b = copy.deepcopy(b).to(dtype)
        out = run_triton(b, x.to(dtype)) if fused else b.forward_reference(x.to(dtype))
        out.backward(grad_out.to(dtype))
        return {n: p.grad for n, p in b.named_parameters()}

    gold, base = grads(block, torch.float64, False), grads(block, torch.float32, False)
    fused = grads(block, torch.float32, True)
    for n in gold:
        assert_matches_oracle(fused[n], base[n], gold[n], torch.float32, n)


@pytest.mark.parametrize("mode", ["eval", "bn-frozen", "train"])
def test_inf_reaches_what_it_reaches_in_pytorch(device, mode):
    """The fused paths store each 26-channel chunk in a 32-channel slot. An Inf input pixel
    whose conv1 outputs are all -Inf (ReLU: 0) leaves PyTorch's chunk convs finite there; pad
    channels computed as 0 * Inf would be NaN and spread over the 3x3 neighbourhood. The pads
    copy a real channel instead, so exactly the oracle's elements are non-finite."""
    block = make_block(BLOCKS["normal-w26x4"], device)
    block.train(mode != "eval")
    if mode == "bn-frozen":
        bn_frozen(block)
    with torch.no_grad():
        block.conv1.weight[:, 0] = -block.conv1.weight[:, 0].abs() - 0.1
    x = torch.randn(2, block.conv1.in_channels, 7, 7, device=device)
    x[1, 0, int(torch.randint(7, ())), int(torch.randint(7, ()))] = float("inf")

    def masks(fused: bool) -> list[torch.Tensor]:
        b = copy.deepcopy(block)
        with torch.set_grad_enabled(mode != "eval"):
            xi = x.clone().requires_grad_(mode != "eval")
            y = run_triton(b, xi) if fused else b.forward_reference(xi)
            out = [~torch.isfinite(y)]
            if mode != "eval":
                y.nan_to_num().sum().backward()
                out.append(~torch.isfinite(xi.grad))
        return out

    oracle, fused = masks(False), masks(True)
    if mode != "train":  # batch statistics make the whole batch non-finite
        assert 0 < int(oracle[0].sum()) <= block.conv3.out_channels
    for i, (a, b) in enumerate(zip(fused, oracle, strict=True)):
        assert torch.equal(a, b), f"mask {i}: {int((a != b).sum())} elements differ"


# Operators the no-grad Bottle2neck middle may dispatch besides the fused kernels: allocating
# the buffers and taking channel slices of them (views, no data movement).
VIEW_OPS = {
    "aten.empty.memory_format",
    "aten.empty_strided.default",
    "aten.slice.Tensor",
    "aten.as_strided.default",
    "aten.alias.default",
}


@pytest.mark.parametrize(
    "name", ["stage-always-s2-w14x8", "stage-strided-s1-w14x8", "normal-w26x4"]
)
def test_no_split_concat_or_add_copies(device, name):
    """Inference dispatches only the fused kernels, buffer allocations and views: no cat,
    split, copy or add between the chunks, and one grouped launch for a 'stage' block."""
    block = make_block(BLOCKS[name], device).eval()
    x = torch.randn(2, block.conv1.in_channels, 8, 8, device=device).contiguous(memory_format=CL)
    with torch.no_grad():
        run_triton(block, x)  # folds and caches the weights
        with OpRecorder() as recorder:
            out = run_triton(block, x)
        gold = copy.deepcopy(block).double().forward_reference(x.double())
        base = block.forward_reference(x)
    assert_matches_oracle(out, base, gold, torch.float32, "block output")
    other = [op for op in recorder.ops if not op.startswith("fastres.") and op not in VIEW_OPS]
    assert not other, f"copies or PyTorch compute in the fused block: {other}"
    convs = [op for op in recorder.ops if op.startswith("fastres.conv2d_fused")]
    pools = [op for op in recorder.ops if op.startswith("fastres.res2net_pool")]
    middle = 1 if block.stage_type == "stage" else block.scales - 1
    shortcut = int(block.downsample is not None)
    assert len(convs) == 2 + middle + shortcut, recorder.ops
    assert len(pools) == int(block.pools_last_chunk)


# -- whole models ---------------------------------------------------------------------------

MODELS = {
    "res2net50-w7x4-fp32": (50, dict(base_width=7), torch.float32),
    "res2net50-always-w13x4-bf16": (
        50, dict(base_width=13, pool_last_chunk="always"), torch.bfloat16
    ),
    "res2net50-caffe-dilated-w7x8-fp16": (
        50, dict(base_width=7, scales=8, style="caffe", strides=(1, 2, 2, 1),
                 dilations=(1, 1, 1, 2)), torch.float16,
    ),
    "res2net101-w7x4-fp32": (101, dict(base_width=7), torch.float32),
}  # fmt: skip


@pytest.mark.parametrize("case", MODELS.values(), ids=MODELS.keys())
def test_whole_model_eval(device, case):
    """Res2Net-50 / -101 (base_channels 8: widths 7, 14, 28, 56 for base_width 7) on 32x32."""
    depth, kwargs, dtype = case
    model = fastres.Res2Net(
        depth=depth, base_channels=8, zero_init_residual=False, backend="torch", **kwargs
    )
    model = randomize_norms(model).to(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        gold = copy.deepcopy(model).double()(x.double())
        base = copy.deepcopy(model).to(dtype)(x.to(dtype))
        fused = copy.deepcopy(model).to(dtype).set_backend("triton")(x.to(dtype))
    for i, (a, b, g) in enumerate(zip(fused, base, gold, strict=True)):
        assert a.dtype == dtype and a.shape == g.shape
        assert_matches_oracle(a, b, g, dtype, f"stage {i} output")


def compile_pool_for_hopper() -> str:
    """Compiles the pool kernel to an sm_90 cubin (Triton's own ptxas, no GPU needed)."""
    import triton
    import triton.language as tl
    from fastres.kernels.res2net_pool import res2net_pool_kernel as kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(
        K=3, ACC=tl.float32, EMULATE_RTNE=0, BLOCK_M=64, BLOCK_C=64, stride_x_c=1, stride_out_c=1
    )
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return compiled.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the real kernel")
def test_pool_compiles_for_hopper():
    """Without a GPU the interpreter never sees Triton's compiler: compile the pool kernel for
    sm_90 in a subprocess without TRITON_INTERPRET. (The conv's IN_ADD specialization is
    compiled by tests/test_conv2d_fused.py.)"""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "res2net_pool_kernel"


if __name__ == "__main__":
    print(compile_pool_for_hopper())
