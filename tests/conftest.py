import os
import tempfile

import pytest
import torch

# The Triton interpreter must be chosen before triton is imported: without a GPU, Triton
# kernels run on CPU tensors through it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tuned choices (Triton configs, the 'auto' selection) go to a cache of the test session's own.
os.environ.setdefault("FASTRES_CACHE_DIR", tempfile.mkdtemp(prefix="fastres-test-cache-"))

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random data every run, but the seed is printed so that a failure can be replayed:
    FASTRES_TEST_SEED=<seed> runs the test on that seed's data."""
    seed = int(os.environ.get("FASTRES_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield
