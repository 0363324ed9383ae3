"""The numerical contract (docs/contract.md §3): one tolerance rule for outputs, gradients and
running statistics, used by every test and benchmark.

Run the oracle in float64 as *gold* and in the working dtype as *base* on the same inputs and
weights; a fused result passes when `err(fused) <= 4 * err(base) + TOLERANCE[dtype]`, with
`err(y) = max|y - gold| / max|gold|`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

TOLERANCE = {
    # Not in the contract's rule: float64 compares exact math, so any real error is far above
    # this; below it is rounding amplified through a whole network's batch statistics (1e-11 on
    # ResNet-50).
    torch.float64: 1e-9,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Trajectory rule: fused may deviate from the oracle by 4x the oracle's own layout noise + this.
TRAJECTORY_SLACK = 1e-4


def relative_error(y: Tensor, gold: Tensor) -> float:
    """`max|y - gold| / max|gold|`, computed in float64 (0 for empty tensors)."""
    if y.shape != gold.shape:
        raise ValueError(f"shape {tuple(y.shape)} differs from gold shape {tuple(gold.shape)}")
    if gold.numel() == 0:
        return 0.0
    gold = gold.detach().double()
    diff = (y.detach().double() - gold).abs().max().item()
    scale = gold.abs().max().item()
    return diff / scale if scale > 0 else diff


def worst_index(y: Tensor, gold: Tensor) -> tuple[int, ...]:
    """Index of the largest absolute difference, for failure messages."""
    diff = (y.detach().double() - gold.detach().double()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def assert_matches_oracle(
    actual: Tensor, base: Tensor, gold: Tensor, dtype: torch.dtype, name: str = "tensor"
) -> None:
    """Asserts the docs/contract.md §3 rule for one tensor.

    Args:
        actual: the result under test, any shape.
        base: the oracle's result in `dtype`, same shape.
        gold: the oracle's result in float64, same shape.
        dtype: the working dtype that selects the tolerance.
        name: what the tensor is, for the failure message.
    """
    err_actual = relative_error(actual, gold)
    err_base = relative_error(base, gold)
    bound = 4 * err_base + TOLERANCE[dtype]
    if not err_actual <= bound:  # also catches NaN
        where = worst_index(actual, gold)
        raise AssertionError(
            f"{name}: err {err_actual:.3e} > 4 * base err {err_base:.3e} + tol "
            f"{TOLERANCE[dtype]:.1e} = {bound:.3e} ({dtype}); worst at {where}: "
            f"got {actual.detach()[where].item():.6g}, gold {gold.detach()[where].item():.6g}"
        )


def trajectory_deviation(a: Tensor, b: Tensor) -> float:
    """`max|a - b| / (max|b| + 1)` in float64, the deviation of one loss or state tensor."""
    if b.numel() == 0:
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return (a - b).abs().max().item() / (b.abs().max().item() + 1)


def sgd_trajectory(model: torch.nn.Module, xs, targets, layout: torch.memory_format) -> dict:
    """Trains a copy of `model` in `layout`: one SGD step (lr 1e-3, momentum 0.9, cross-entropy)
    per (x, target). Returns {"loss": the losses [steps], **the final state_dict}."""
    model = copy.deepcopy(model).to(memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    losses = []
    for x, target in zip(xs, targets, strict=True):
        optimizer.zero_grad()
        out = model(x.contiguous(memory_format=layout))
        loss = torch.nn.functional.cross_entropy(out, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {"loss": torch.stack(losses), **model.state_dict()}


def assert_trajectory_matches(fused: dict, oracle: dict, oracle_cl: dict, what: str = "") -> None:
    """The trajectory rule per loss and state tensor (dicts as `sgd_trajectory` returns them).

    The fused run may deviate from the oracle's (NCHW) by 4x the oracle's own channels_last
    deviation + TRAJECTORY_SLACK; integer tensors (step counts) must be equal.
    """
    for key, b in oracle.items():
        a, c = fused[key], oracle_cl[key]
        if not b.is_floating_point():
            assert torch.equal(a, b), f"{what}{key}"
            continue
        bound = 4 * trajectory_deviation(c, b) + TRAJECTORY_SLACK
        dev = trajectory_deviation(a, b)
        assert dev <= bound, f"{what}{key}: deviation {dev:.3e} > {bound:.3e}"


def randomize_norms(model: torch.nn.Module, seed: int | None = None) -> torch.nn.Module:
    """Gives every norm layer non-trivial affine parameters and running statistics.

    Freshly initialised (or zero_init_residual) models hide bugs: BN is the identity and the
    residual branches add zero. Tests and benchmarks call this so that every block matters.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)):
                c = m.weight.shape[0]
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(c, generator=gen) * 0.5 + 0.75)
    return model


class OpRecorder(TorchDispatchMode):
    """Records the names of the operators dispatched inside the context (e.g. to prove that a
    fused forward ran no PyTorch convolution or BatchNorm): `with OpRecorder() as r: ...`,
    then `r.ops`, e.g. ['fastres.conv2d_bn_train.default', 'aten.cat.default', ...]."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
