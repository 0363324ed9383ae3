"""What the block-level pieces of a triton forward cost per call, before and after issue 25's
block-level change (run once with each tree on PYTHONPATH: `run.sh`).

    PYTHONPATH=<tree> .venv/bin/python bench/results/cpu-issue25-block/pieces.py

ResNet-50 (base_channels 16, eval) on CPU, one thread; each piece timed with timeit, the least
of 5 rounds of 20,000 calls, in us per call:

- plan: `block.plan()` of layer2.0 (the downsample block);
- backend: what a block's forward does to find its backend (before `backends.resolve`, after
  `backends.bound`), 'triton' on CPU;
- fold_key: `fold_cache.fold_key(conv, bn)`;
- folded: a cached fold found (`triton.inference.folded`, no_grad);
- block_checks: the triton backend's per-block mode checks in inference (before: plan_pairs,
  trainable, block_foldable; after: plan_pairs, block_foldable);
- unit_cast: a unit's conversion of its input to the compute dtype under bf16 autocast (before:
  each unit and tail; after: none inside the backend).
"""

import json
import os
import timeit

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend runs on CPU tensors

import torch  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402
from fastres.backends.fold_cache import fold_key  # noqa: E402
from fastres.backends.triton.inference import block_foldable, compute_dtype, folded  # noqa: E402
from fastres.backends.triton.training import plan_pairs, trainable  # noqa: E402


def least_us(fn, number: int = 20_000, rounds: int = 5) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6, 3)


def main() -> None:
    torch.set_num_threads(1)
    model = fastres.ResNet(depth=50, base_channels=16, stem_channels=16, backend="triton").eval()
    block = model.layer2[0]
    conv, bn = block.conv1, block.bn1
    x = torch.randn(2, 64, 16, 16).to(torch.bfloat16)
    device = x.device
    after = hasattr(backends, "bound")
    plan = block.plan()
    pairs = plan_pairs(plan)
    with torch.no_grad():
        folded(conv, bn, torch.bfloat16)
        rows = {
            "tree": "after" if after else "before",
            "plan": least_us(block.plan),
            "backend": least_us(
                (lambda: backends.bound(block, device))
                if after
                else (lambda: backends.resolve(block.backend, device))
            ),
            "fold_key": least_us(lambda: fold_key(conv, bn)),
            "folded": least_us(lambda: folded(conv, bn, torch.bfloat16)),
            "block_checks": least_us(
                (lambda: block_foldable(plan_pairs(plan)))
                if after
                else (lambda: trainable(plan_pairs(plan), x) or block_foldable(pairs))
            ),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows["unit_cast"] = 0.0 if after else least_us(lambda: x.to(compute_dtype(x)))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
