"""The correctness check a system passes before it is timed: what one run of it yields
(`collect_outputs`) and the docs/contract.md §3 rule applied to that against the float64 oracle
(`compare`). The loss and the autocast of a step are here too: the timed step (`Runner.step`)
computes exactly what was checked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..testing import assert_matches_oracle, relative_error

GRAD_PREFIX = "grad "
ALL_GRADS = "grads (all parameters)"


def training_loss(out: Tensor | tuple[Tensor, ...], y: Tensor | None) -> Tensor:
    """classification: cross-entropy of the logits. detection: a stand-in for the neck and
    heads, the mean square of each stage's features, whose gradient reaches every stage."""
    if isinstance(out, Tensor):
        return F.cross_entropy(out.float(), y)
    return sum(f.float().square().mean() for f in out)


def _named_outputs(out: Tensor | tuple[Tensor, ...]) -> dict[str, Tensor]:
    """The logits, or each stage's features."""
    if isinstance(out, Tensor):
        return {"logits": out.detach().cpu()}
    return {f"stage {i}": f.detach().cpu() for i, f in enumerate(out)}


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast to fp16 / bf16; nothing for fp32 and fp64."""
    if dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def collect_outputs(
    module: Callable[[Tensor], Tensor], model: nn.Module, x: Tensor, y: Tensor, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Runs `module` (the model, or its compiled wrapper) once and gathers what is checked."""
    device = x.device
    if not model.training:
        with torch.no_grad(), autocast_context(device, dtype):
            return _named_outputs(module(x))
    model.zero_grad(set_to_none=True)
    with autocast_context(device, dtype):
        result = module(x)
        loss = training_loss(result, y)
    loss.backward()
    out = {**_named_outputs(result), "loss": loss.detach().cpu()}
    for name, param in model.named_parameters():
        if param.grad is not None:
            out[GRAD_PREFIX + name] = param.grad.detach().cpu()
    for name, buf in model.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            out[name] = buf.detach().cpu()
    model.zero_grad(set_to_none=True)
    return out


@dataclass
class CheckResult:
    """Outcome of the correctness check of one system against the float64 oracle.

    `max_error` / `worst` cover the tensors the rule is applied to; `worst_grad_error` /
    `worst_grad` the single parameter gradient furthest from gold (information only).
    """

    max_error: float
    worst: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    worst_grad_error: float | None = None
    worst_grad: str | None = None


def _checked_tensors(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the rule is applied to: every output except single gradients, which are replaced
    by the vector of all parameter gradients.

    Through training-mode BatchNorm (a few values per channel in the last stages) single
    gradient tensors of a whole model are rounding noise in float32 — PyTorch's own fp32
    gradients are off by up to tens of percent there, and by different amounts in NCHW and
    channels_last — so per tensor the rule would judge noise. The whole gradient vector is
    dominated by its well-conditioned large entries.
    """
    checked = {k: v for k, v in outputs.items() if not k.startswith(GRAD_PREFIX)}
    grads = [v.flatten() for k, v in outputs.items() if k.startswith(GRAD_PREFIX)]
    if grads:
        # float64 so that the concatenation itself adds no rounding; relative_error compares
        # in float64 anyway.
        checked[ALL_GRADS] = torch.cat([g.double() for g in grads])
    return checked


def compare(
    actual: dict[str, Tensor], base: dict[str, Tensor], gold: dict[str, Tensor], dtype: torch.dtype
) -> CheckResult:
    """Applies the docs/contract.md §3 rule to the checked tensors; reports the largest error."""
    if actual.keys() != gold.keys():
        missing = sorted(gold.keys() - actual.keys())
        extra = sorted(actual.keys() - gold.keys())
        return CheckResult(float("inf"), "keys", False, [f"missing {missing}, extra {extra}"])
    result = CheckResult(0.0, "", True)
    checked_actual, checked_base = _checked_tensors(actual), _checked_tensors(base)
    for name, gold_tensor in _checked_tensors(gold).items():
        err = relative_error(checked_actual[name], gold_tensor)
        if not err <= result.max_error:  # NaN counts as worst
            result.max_error, result.worst = err, name
        try:
            assert_matches_oracle(
                checked_actual[name], checked_base[name], gold_tensor, dtype, name
            )
        except AssertionError as failure:
            result.failures.append(str(failure))
    result.passed = not result.failures
    for name in (k for k in gold if k.startswith(GRAD_PREFIX)):
        err = relative_error(actual[name], gold[name])
        if result.worst_grad_error is None or not err <= result.worst_grad_error:
            result.worst_grad_error, result.worst_grad = err, name[len(GRAD_PREFIX) :]
    return result
