"""Whole models on CUDA against the float64 oracle: the GPU smoke set.

ResNet-50 and Res2Net-50 under every backend, inference and one training step (forward in
train mode, loss, backward: logits, loss, every gradient and running statistic), bf16 autocast
at 224 px, with the check the benchmark applies before it times (`fastres.benchmark.Case`).
Batch 32 gives the kernels the specialization and tiles of batch 256 (Triton specializes
integer arguments on divisibility by 16), so a GPU session compiles them once for both.
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastres import benchmark as bm

pytestmark = pytest.mark.cuda

BATCH, IMAGE_SIZE, DTYPE = 32, 224, "bf16"

_CASES: dict[bm.BenchConfig, bm.Case] = {}


def _case(model: str, mode: str) -> bm.Case:
    """One case per model and mode for the whole session: its float64 gold is computed once
    and shared by the backends (fresh weights and data: the seed comes from the test's)."""
    config = bm.BenchConfig(model, 50, BATCH, IMAGE_SIZE, DTYPE, "cuda", mode)
    if config not in _CASES:
        seed = int(torch.randint(0, 2**31, ()))
        print(f"case seed {seed}")
        _CASES[config] = bm.Case(config, seed=seed)
    return _CASES[config]


# The oracle first and Triton last: a kernel that broke the CUDA context would fail every
# later test of this process.
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("mode", bm.MODES)
@pytest.mark.parametrize("model", ["resnet", "res2net"])
def test_whole_model_matches_oracle_on_cuda(model, mode, backend):
    reason = bm.backend_reasons("cuda")[backend]
    if reason is not None:
        pytest.skip(reason)
    case = _case(model, mode)
    check = case.check(case.runner(bm.fastres_system(backend)))
    print(f"max error {check.max_error:.2e} ({check.worst}); worst gradient {check.worst_grad}")
    assert check.passed, "\n".join(check.failures)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("mode", bm.MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_as_in_the_oracle_on_cuda(backend, mode, bad):
    """One NaN or Inf pixel reaches the same output elements as in the oracle: a backend that
    dropped it (a ReLU that maps NaN to 0, as GPU max instructions do by default) would hide a
    diverged run. The interpreter cannot show this: its maximum keeps NaN either way."""
    reason = bm.backend_reasons("cuda")[backend]
    if reason is not None:
        pytest.skip(reason)
    model = bm.build_model("resnet", 50, seed=int(torch.randint(0, 2**31, ()))).cuda()
    model.train(mode == "train")
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    x[1, int(torch.randint(3, ())), int(torch.randint(64, ())), int(torch.randint(64, ()))] = bad
    masks = {}
    for name in ("torch", backend):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model.set_backend(name)(x)
        masks[name] = ~torch.isfinite(logits)
    assert masks["torch"].any()
    assert torch.equal(masks[backend], masks["torch"])
