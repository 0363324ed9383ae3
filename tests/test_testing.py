"""The tolerance helper itself: it must pass what the rule allows and fail what it does not."""

import pytest
import torch

from fastres.testing import (
    TOLERANCE,
    assert_matches_oracle,
    randomize_norms,
    relative_error,
    trajectory_deviation,
)


def test_relative_error_is_max_abs_diff_over_max_abs_gold():
    gold = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    y = torch.tensor([1.5, -4.0, 1.0])
    assert relative_error(y, gold) == pytest.approx(1.0 / 4.0)
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        relative_error(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rule_accepts_base_noise_and_rejects_more(dtype):
    gold = torch.randn(1000, dtype=torch.float64)
    base = gold.to(dtype)
    assert_matches_oracle(base, base, gold, dtype)
    scale = gold.abs().max().item()
    bound = 4 * relative_error(base, gold) + TOLERANCE[dtype]
    bad = gold.clone()
    bad[17] += 1.01 * bound * scale
    with pytest.raises(AssertionError, match=r"worst at \(17,\)"):
        assert_matches_oracle(bad, base, gold, dtype, name="out")


def test_rule_rejects_nan():
    gold = torch.randn(10, dtype=torch.float64)
    bad = gold.float().clone()
    bad[3] = float("nan")
    with pytest.raises(AssertionError):
        assert_matches_oracle(bad, gold.float(), gold, torch.float32)


def test_trajectory_deviation():
    b = torch.tensor([2.0, -3.0])
    assert trajectory_deviation(b + torch.tensor([0.0, 0.4]), b) == pytest.approx(0.4 / 4.0)


def test_randomize_norms_makes_batchnorm_non_trivial():
    bn = randomize_norms(torch.nn.Sequential(torch.nn.BatchNorm2d(8)), seed=0)[0]
    assert not torch.all(bn.weight == 1) and not torch.all(bn.running_var == 1)
    assert torch.all(bn.running_var > 0)
