"""The accumulator rule of every fastres op: float64 inputs accumulate (and return per-channel
statistics) in float64, every other dtype in float32. The C++ ops state the same rule once, in
`acc_type_of` (csrc/batchnorm_common.h)."""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that sums and per-channel statistics of `dtype` values are kept in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_accumulator(dtype: torch.dtype):
    """`accumulator_dtype` as a Triton type, for a kernel's ACC constexpr (imports Triton)."""
    import triton.language as tl

    return tl.float64 if accumulator_dtype(dtype) == torch.float64 else tl.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: t itself where it is already (`Tensor.to` costs the host a call even then)."""
    return t if t.dtype == dtype else t.to(dtype)
