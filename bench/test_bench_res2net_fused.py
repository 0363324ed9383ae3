"""Res2Net benchmarks: the fused Bottle2neck at every Res2Net-50 stage, and the Res2Net-50 /
ResNet-50 speed ratio of every system.

Blocks (CUDA only, batch 256, bf16, channels_last, inference): the first ('stage') and the
second ('normal') block of each stage of Res2Net-50 26w4s at 224x224, as built by
`fastres.Res2Net(50)` (deep stem, avg_down shortcut, 'strided' pool rule), three systems:

- `fused`: the triton backend's block (`run_block`: conv1 writing into the chunk buffer, the
  scales - 1 chunk convs as one grouped launch or with the hierarchical add in their input load,
  no split / concat copies, conv3 + shortcut + ReLU fused);
- `eager-cl`: the oracle block (`forward_reference`) in bf16, channels_last;
- `compile`: torch.compile of the same oracle block.

Each checks its output once against the float64 oracle (docs/contract.md §3) on a few images; the
group is `res2net_fused-<stage>-<kind>-b256-bf16-infer`, extra_info carries ms, img/s and the
speedup over eager-cl.

Whole network: bench/test_bench_models.py runs ResNet-50 and Res2Net-50, inference and the
training step, with every system (eager, eager-cl, compile, the fused backends); the harness
(`fastres.benchmark.model_ratios`) reports img/s(Res2Net-50) / img/s(ResNet-50) per system in
the final table and the results JSON (target on GPU, docs/contract.md §6: >= 0.95; PyTorch
about 0.7-0.8).

    pytest bench/test_bench_res2net_fused.py --benchmark-only
"""

from __future__ import annotations

import copy

import pytest
import torch
from layer_bench import time_ms

import fastres
from fastres.testing import assert_matches_oracle, randomize_norms

BATCH, IMAGE_SIZE, DTYPE = 256, 224, torch.bfloat16
CHECK_IMAGES = 4
# eager-cl first: the later systems' speedups divide by its time.
BLOCK_SYSTEMS = ("eager-cl", "compile", "fused")
# (block name, system) -> median ms.
_BLOCK_MS: dict[tuple[str, str], float] = {}
# name -> (layer index, block index): the stage block and a normal block of each stage.
BLOCKS = {
    f"stage{s}-{kind}": (s, b) for s in (1, 2, 3, 4) for b, kind in ((0, "stage"), (1, "normal"))
}


def block_input_shapes(image_size: int = IMAGE_SIZE) -> dict[str, tuple[int, int, int]]:
    """(C, H, W) of each BLOCKS entry's input, from one oracle forward with hooks."""
    model = fastres.Res2Net(depth=50, backend="torch").eval()
    shapes, handles = {}, []
    for name, (s, b) in BLOCKS.items():
        block = getattr(model, f"layer{s}")[b]
        handles.append(
            block.register_forward_hook(
                lambda _m, inputs, _o, name=name: shapes.__setitem__(name, inputs[0].shape[1:])
            )
        )
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    for handle in handles:
        handle.remove()
    return {k: tuple(v) for k, v in shapes.items()}


def make_block(name: str, device: str, dtype: torch.dtype = DTYPE) -> torch.nn.Module:
    """The Res2Net-50 block `name` with non-trivial BatchNorms, eval, channels_last."""
    torch.manual_seed(0)
    model = fastres.Res2Net(depth=50, zero_init_residual=False, backend="torch")
    randomize_norms(model, seed=0)
    s, b = BLOCKS[name]
    block = copy.deepcopy(getattr(model, f"layer{s}")[b]).eval()
    return block.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def block_step(system: str, block: torch.nn.Module, x: torch.Tensor):
    """A no-grad forward of `block` on `x` by `system` (a callable of no arguments)."""
    if system == "fused":
        backend = fastres.backends.resolve("triton", x.device)
        return lambda: backend.run_block(block, x)
    forward = block.forward_reference
    if system == "compile":
        forward = torch.compile(forward)
    return lambda: forward(x)


def check_block(system: str, block: torch.nn.Module, x: torch.Tensor) -> None:
    """`system`'s output on the first CHECK_IMAGES images against the float64 / dtype oracle."""
    x = x[:CHECK_IMAGES]
    actual = block_step(system, block, x)()
    gold = copy.deepcopy(block).double().forward_reference(x.double())
    base = block.forward_reference(x)
    assert_matches_oracle(actual, base, gold, x.dtype, f"{system} block")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="block benchmarks need a CUDA GPU")
@pytest.mark.parametrize("system", BLOCK_SYSTEMS)
@pytest.mark.parametrize("name", BLOCKS.keys())
def test_block(benchmark, name, system):
    channels, h, w = block_input_shapes()[name]
    block = make_block(name, "cuda")
    x = torch.randn(BATCH, channels, h, w, device="cuda").to(DTYPE)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        check_block(system, block, x)
        step = block_step(system, block, x)
        ms = time_ms(step, rep_ms=100)

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark.group = f"res2net_fused-{name}-b{BATCH}-bf16-infer"
        benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
    benchmark.extra_info.update(
        system=system,
        ms=ms,
        img_per_s=BATCH / (ms * 1e-3),
        input_shape=[BATCH, channels, h, w],
        width=block.width,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
    )
    _BLOCK_MS[(name, system)] = ms
    eager = _BLOCK_MS.get((name, "eager-cl"))
    if eager is not None:
        benchmark.extra_info["speedup_over_eager_cl"] = eager / ms
