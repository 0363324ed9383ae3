"""`fastres::padded_weight` (conv weights laid out in padded channel slots, optionally with an
eval-mode BatchNorm folded in, with gradients) against the PyTorch composition it replaces:
the fold (`fastres.backends.folding`'s formula), a row gather and zero columns, in float64
(gold) and float32 (base), under the contract's rule. The whole-model paths are
tests/test_res2net_fused.py's and tests/test_triton_training.py's Res2Net cases.
"""

from __future__ import annotations

import pytest
import torch

from fastres.ops.conv2d_fused import arrange_weight, interpreting
from fastres.testing import assert_matches_oracle

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not (interpreting() or torch.cuda.is_available()), reason="needs a GPU or TRITON_INTERPRET=1"
)

# Two chunks of 3 output channels in slots of 4 (a pad row copies its chunk's first row), the
# last chunk first; input channels 0, 1 | 2, 3, 4 in slots of 3 and 4 (pads are zero columns).
ROWS, INV_ROWS = [3, 4, 5, 3, 0, 1, 2, 0], [4, 5, 6, 0, 1, 2]
COLS, INV_COLS = [0, 1, -1, 2, 3, 4, -1], [0, 1, 3, 4, 5]


def _maps(device):
    from fastres.ops.padded_weight import ChannelMap

    def as_map(*maps):
        return ChannelMap(*(torch.tensor(t, dtype=torch.int32, device=device) for t in maps))

    return as_map(ROWS, INV_ROWS), as_map(COLS, INV_COLS)


def _params(members: int, fold: bool, conv_bias: bool, device):
    """Per member (weight [6, 5, 3, 3] channels_last, fold tuple or None), leaves that want
    gradients."""
    out = []
    for _ in range(members):
        weight = torch.randn(6, 5, 3, 3, device=device).to(memory_format=torch.channels_last)
        folding = None
        if fold:
            folding = (
                torch.randn(6, device=device) if conv_bias else None,
                torch.rand(6, device=device) + 0.5, torch.randn(6, device=device),
                torch.randn(6, device=device), torch.rand(6, device=device) + 0.5, 1e-5,
            )  # fmt: skip
        out.append((weight, folding))
    return out


def _leaves(params):
    return [t for w, f in params for t in (w, *(f[:3] if f else ())) if t is not None]


def _run(params, dtype, fused: bool, device):
    """(weight, bias) and the gradients of every leaf for a fixed upstream gradient that is
    zero on the pad rows (what the model's gradients are: a pad row's output channel meets zero
    weight columns only)."""
    from fastres.ops.padded_weight import padded_weight

    params = [
        (w.detach().to(dtype).requires_grad_(),
         None if f is None else (*(None if t is None else t.detach().to(dtype).requires_grad_()
                                   for t in f[:3]), f[3].to(dtype), f[4].to(dtype), f[5]))
        for w, f in params
    ]  # fmt: skip
    rows, cols = _maps(device)
    folds = [f for _, f in params] if params[0][1] is not None else None
    if fused:
        weight, bias = padded_weight([w for w, _ in params], rows, cols, dtype, folds)
    else:
        pieces, biases = [], []
        for w, f in params:
            if f is not None:
                conv_bias, gamma, beta, mean, var, eps = f
                scale = gamma * torch.rsqrt(var + eps)
                shift = beta - mean * scale + (0 if conv_bias is None else conv_bias * scale)
                w = w * scale.view(-1, 1, 1, 1)
                biases.append(shift.index_select(0, rows.index))
            w = w.index_select(0, rows.index)
            w = torch.nn.functional.pad(w, (0, 0, 0, 0, 0, 1)).index_select(1, cols.index % 6)
            pieces.append(w)
        weight, bias = torch.cat(pieces), torch.cat(biases) if biases else None
    torch.manual_seed(1)
    real = torch.arange(8) % 4 != 3  # rows 3 and 7 are pads
    grad_w = torch.randn(weight.shape, dtype=torch.float64) * real.repeat(len(params)).view(
        -1, 1, 1, 1
    )
    loss = (weight.double() * grad_w.to(device)).sum()
    if bias is not None:
        loss = loss + (bias.double() * grad_w[:, 0, 0, 0].to(device)).sum()
    grads = torch.autograd.grad(loss, _leaves(params))
    return weight, bias, grads


@pytest.mark.parametrize(
    ("members", "fold", "conv_bias"),
    [(1, False, False), (2, False, False), (1, True, False), (2, True, True)],
    ids=["raw", "raw-stacked", "folded", "folded-stacked-conv-bias"],
)
def test_padded_weight_matches_reference(device, members, fold, conv_bias):
    torch.manual_seed(0)
    params = _params(members, fold, conv_bias, device)
    gold = _run(params, torch.float64, False, device)
    base = _run(params, torch.float32, False, device)
    fused = _run(params, torch.float32, True, device)
    assert fused[0].stride() == arrange_weight(fused[0]).stride()
    assert (fused[0].view(members, 8, 7, 3, 3)[:, :, [2, 6]] == 0).all(), "pad columns"
    pairs = [("weight", 0), ("bias", 1)] if fold else [("weight", 0)]
    for name, i in pairs:
        assert_matches_oracle(fused[i], base[i], gold[i], torch.float32, name)
    for i, (a, b, g) in enumerate(zip(fused[2], base[2], gold[2], strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_matches_oracle(a, b, g, torch.float32, f"grad {i}")


def test_padded_weight_casts_and_opcheck():
    """bf16 output in `arrange_weight`'s layout, gradients in the parameters' dtype; the fake
    implementations match the ops."""
    from fastres.ops.padded_weight import padded_weight

    rows, cols = _maps("cpu")
    ((w, f),) = _params(1, True, False, "cpu")
    w.requires_grad_()
    weight, bias = padded_weight([w], rows, cols, torch.bfloat16, [f])
    assert weight.dtype == torch.bfloat16 and bias.dtype == torch.float32
    assert weight.stride() == arrange_weight(weight.float()).stride()
    (weight.float().sum() + bias.sum()).backward()
    assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
    checks = ("test_schema", "test_faketensor")
    with torch.no_grad():
        args = ([w], rows.index, cols.index, [None], [f[1]], [f[2]], [f[3]], [f[4]], [f[5]],
                torch.bfloat16)  # fmt: skip
        torch.library.opcheck(torch.ops.fastres.padded_weight.default, args, test_utils=checks)
        backward_args = (
            torch.randn(weight.shape), torch.randn(8), [w], rows.inverse, cols.inverse, [None],
            [f[1]], [f[3]], [f[4]], [f[5]],
        )  # fmt: skip
        torch.library.opcheck(
            torch.ops.fastres.padded_weight_backward.default, backward_args, test_utils=checks
        )


def test_groups_in_one_node_match_separate_calls(device):
    """`padded_weights` (a Bottle2neck's groups as one autograd node): each group's weight, bias
    and its leaves' gradients equal a `padded_weight` call of its own; a group without a fold
    beside folded ones."""
    from fastres.ops.padded_weight import PaddedGroup, padded_weight, padded_weights

    torch.manual_seed(0)
    rows, cols = _maps(device)
    groups = [_params(2, True, True, device), _params(1, False, False, device),
              _params(1, True, False, device)]  # fmt: skip
    upstream = [torch.randn(members * 8, 7, 3, 3, device=device) for members in (2, 1, 1)]

    def run(one_node: bool):
        leaves = [
            [(w.detach().clone().requires_grad_(),
              None if f is None else (*(None if t is None else t.detach().clone().requires_grad_()
                                        for t in f[:3]), *f[3:]))
             for w, f in params]
            for params in groups
        ]  # fmt: skip
        specs = [
            ([w for w, _ in params], [f for _, f in params] if params[0][1] else None)
            for params in leaves
        ]
        if one_node:
            outs = padded_weights(
                [PaddedGroup(ws, rows, cols, folds) for ws, folds in specs], torch.float32
            )
        else:
            outs = [padded_weight(ws, rows, cols, torch.float32, folds) for ws, folds in specs]
        # b.sum(): autograd hands each bias gradient over expanded (stride 0).
        loss = sum(
            (w * g).sum() + (0 if b is None else b.sum()) for (w, b), g in zip(outs, upstream)
        )
        flat = [t for params in leaves for t in _leaves(params)]
        return outs, torch.autograd.grad(loss, flat)

    (outs, grads), (ref_outs, ref_grads) = run(True), run(False)
    for (w, b), (ref_w, ref_b) in zip(outs, ref_outs, strict=True):
        assert torch.equal(w, ref_w) and w.stride() == ref_w.stride()
        assert (b is None) == (ref_b is None) and (b is None or torch.equal(b, ref_b))
    for g, ref in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, ref)
