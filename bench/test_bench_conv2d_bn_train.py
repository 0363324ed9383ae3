"""Per-layer benchmarks of the fused training convolution at every ResNet-50 block conv shape
(CUDA only).

The training unit is the previous layer's BatchNorm in training mode (batch statistics) + ReLU,
then the convolution: forward and backward (the gradient of the conv output given; the
gradients of its input, its weight and the BN's weight and bias computed). For each distinct
conv shape of ResNet-50's blocks at 224x224 (batch 256, bf16, channels_last; the stem's 7x7
conv on the 3-channel image has no BN before it and is left out), three systems:

- `eager`: `conv2d(relu(batch_norm(y_prev)))` in PyTorch (cuDNN, channels_last, bf16 tensors,
  fp32 BN parameters as under AMP), `torch.autograd.grad` for the backward;
- `compile`: torch.compile of the same unit (forward and backward graphs), skipped with
  `--bench-compile none`;
- `fused`: `fastres.ops.conv2d_bn_train(y_prev, w, input_bn=InputBN(...))`: the BN + ReLU in
  the conv's input load, the output's batch statistics from its epilogue; backward through the
  op's autograd (recomputed prologue, cuDNN's conv backward, the extension's BN backward).

The input's batch statistics are computed once outside the timed step: in the network they come
from the previous convolution's epilogue (fused) or are the work of the previous unit's
batch_norm (eager), so each unit does one statistics reduction either way. No system updates
running statistics (the triton backend does that in a few per-channel ops outside the op).

Each reports ms (median, `triton.testing.do_bench`), the speedup over eager (and over compile
for fused), TFLOP/s of forward + backward (forward 2*M*K*N with M = N*OH*OW, K = C_in*KH*KW,
N = C_out; backward twice that) and its fraction of the measured bf16 matmul rate, and the
peak memory of one step above what was allocated before it (what autograd saves, the grads).
The fused op is checked once against the float64 oracle (docs/contract.md §3) on a few images:
output, output statistics and the four gradients. The group is
`conv2d_bn_train-<layer>-bf16-train`; extra_info (saved with --benchmark-json) carries the
figures, and one line per benchmark is printed as it finishes.

    pytest bench/test_bench_conv2d_bn_train.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_bench import device_rates, resnet50_layers, time_ms

from fastres.ops.conv2d_bn_train import InputBN, conv2d_bn_train
from fastres.ops.conv2d_fused import arrange_weight
from fastres.testing import assert_matches_oracle

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="per-layer Triton benchmarks need a CUDA GPU"
)

BATCH, IMAGE_SIZE, DTYPE = 256, 224, torch.bfloat16
CL = torch.channels_last
EPS = 1e-5
CHECK_IMAGES = 4  # images compared with the float64 oracle
# eager first: the later systems' speedups divide by its time (and fused's by compile's too).
SYSTEMS = ("eager", "compile", "fused")
# (layer, system) -> median ms.
_MS: dict[tuple[str, str], float] = {}


def block_conv_shapes() -> dict[str, dict]:
    """The distinct conv shapes of ResNet-50's blocks: `<first module>-<C_in>x<H>-<K>x<K>s<S>-
    <C_out>` -> shape (bench/layer_bench.py's layers, stem left out, one entry per shape)."""
    shapes, seen = {}, set()
    for label, spec in resnet50_layers(IMAGE_SIZE).items():
        key = (spec["c_in"], spec["c_out"], spec["kernel"], spec["stride"], spec["h"], spec["w"])
        if label.startswith("layer") and key not in seen:
            seen.add(key)
            shapes[label.rsplit("-", 1)[0]] = spec
    return shapes


LAYERS = block_conv_shapes()


def out_size(spec: dict) -> int:
    return (spec["h"] + 2 * spec["padding"] - spec["kernel"]) // spec["stride"] + 1


def batch_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and M2 (sum of squared deviations) of y [N, C, H, W], in fp32 (float64
    for float64 y)."""
    y = y.detach().double() if y.dtype == torch.float64 else y.detach().float()
    mean = y.mean((0, 2, 3))
    return mean, (y - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))


def make_unit(spec: dict, batch: int, device: str = "cuda") -> dict:
    """Random tensors of one training unit.

    y_prev [batch, C_in, H, W] (DTYPE, channels_last): a raw conv output with per-channel offset
    and scale; bn_weight, bn_bias [C_in] fp32; weight [C_out, C_in, K, K] (DTYPE, channels_last,
    Kaiming-scaled); grad_y (DTYPE, channels_last): the gradient of the unit's output. All but
    grad_y are leaves that require grad.
    """
    c_in, c_out, k = spec["c_in"], spec["c_out"], spec["kernel"]
    offset = 0.5 * torch.randn(1, c_in, 1, 1, device=device)
    scale = torch.rand(1, c_in, 1, 1, device=device) + 0.5
    y_prev = torch.randn(batch, c_in, spec["h"], spec["w"], device=device) * scale + offset
    weight = torch.randn(c_out, c_in, k, k, device=device) * (2 / (c_in * k * k)) ** 0.5
    grad_y = torch.randn(batch, c_out, out_size(spec), out_size(spec), device=device)
    return dict(
        y_prev=y_prev.to(DTYPE).contiguous(memory_format=CL).requires_grad_(),
        bn_weight=(torch.rand(c_in, device=device) + 0.5).requires_grad_(),
        bn_bias=(0.1 * torch.randn(c_in, device=device)).requires_grad_(),
        weight=weight.to(DTYPE).contiguous(memory_format=CL).requires_grad_(),
        grad_y=grad_y.to(DTYPE).contiguous(memory_format=CL),
    )


def torch_unit(spec: dict, y_prev, bn_weight, bn_bias, weight) -> torch.Tensor:
    """conv2d(relu(batch_norm(y_prev))), BatchNorm with batch statistics (PyTorch, the oracle)."""
    x = F.batch_norm(y_prev, None, None, bn_weight, bn_bias, training=True, eps=EPS)
    return F.conv2d(torch.relu(x), weight, stride=spec["stride"], padding=spec["padding"])


def fused_unit(spec: dict, y_prev, bn_weight, bn_bias, weight, stats) -> tuple:
    """conv2d_bn_train with the BN + ReLU in its input load: (y, mean, m2) of the output."""
    mean, m2 = stats
    count = y_prev.numel() // y_prev.shape[1]
    input_bn = InputBN(mean, m2, count, bn_weight, bn_bias, EPS)
    return conv2d_bn_train(
        y_prev, weight, stride=spec["stride"], padding=spec["padding"], input_bn=input_bn
    )


def leaves(t: dict) -> list[torch.Tensor]:
    return [t["y_prev"], t["bn_weight"], t["bn_bias"], t["weight"]]


def make_step(system: str, spec: dict, t: dict):
    """One forward + backward of `system` on t (a callable of no arguments; returns the grads
    of y_prev, bn_weight, bn_bias, weight)."""
    inputs, grad_y = leaves(t), t["grad_y"]
    if system == "fused":
        stats = batch_stats(t["y_prev"])
        weight = arrange_weight(t["weight"].detach()).requires_grad_()
        inputs = inputs[:3] + [weight]

        def step():
            y, _, _ = fused_unit(spec, *inputs, stats)
            return torch.autograd.grad(y, inputs, grad_y)

        return step
    unit = torch_unit
    if system == "compile":
        # A fresh cache per shape: every shape gets its own static graph, and Dynamo's
        # per-function recompile limit is never reached.
        torch._dynamo.reset()
        unit = torch.compile(torch_unit, dynamic=False)
    return lambda: torch.autograd.grad(unit(spec, *inputs), inputs, grad_y)


def check_once(spec: dict, t: dict) -> None:
    """The fused unit on the first CHECK_IMAGES images against the float64 / DTYPE oracle: the
    output, its batch statistics and the gradients of y_prev, bn_weight, bn_bias, weight."""
    part = {k: v[:CHECK_IMAGES] if k in ("y_prev", "grad_y") else v for k, v in t.items()}
    part["y_prev"] = part["y_prev"].detach().requires_grad_()

    def run(unit_inputs, grad_y, fused: bool):
        if fused:
            weight = arrange_weight(unit_inputs[3].detach()).requires_grad_()
            unit_inputs = unit_inputs[:3] + [weight]
            y, mean, m2 = fused_unit(spec, *unit_inputs, batch_stats(unit_inputs[0]))
        else:
            y = torch_unit(spec, *unit_inputs)
            mean, m2 = batch_stats(y)
        grads = torch.autograd.grad(y, unit_inputs, grad_y)
        names = ("y", "mean", "m2", "grad y_prev", "grad bn_weight", "grad bn_bias", "grad weight")
        return dict(zip(names, (y, mean, m2, *grads)))

    gold_inputs = [x.detach().double().requires_grad_() for x in leaves(part)]
    gold = run(gold_inputs, part["grad_y"].double(), fused=False)
    base = run(leaves(part), part["grad_y"], fused=False)
    actual = run(leaves(part), part["grad_y"], fused=True)
    for name, g in gold.items():
        assert_matches_oracle(actual[name], base[name], g, DTYPE, f"fused unit {name}")


def flops(spec: dict, batch: int) -> float:
    """Forward + backward FLOPs: the conv 2*M*K*N, its data and weight gradients twice that."""
    m = batch * out_size(spec) ** 2
    k = spec["c_in"] * spec["kernel"] ** 2
    return 3 * 2.0 * m * k * spec["c_out"]


def peak_step_bytes(step) -> int:
    """CUDA memory allocated at the peak of one step above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step()
    torch.cuda.synchronize()
    del grads
    return torch.cuda.max_memory_allocated() - before


@pytest.fixture
def cudnn_benchmark(monkeypatch):
    """cuDNN times its algorithms first (PyTorch eager's best configuration; the fused op's
    backward uses cuDNN's too)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("layer", LAYERS.keys())
def test_layer(benchmark, bench_settings, cudnn_benchmark, capsys, layer, system):
    import triton

    if system == "compile" and not bench_settings.compiles("train"):
        pytest.skip(f"torch.compile is off (--bench-compile={bench_settings.compile})")
    spec = LAYERS[layer]
    torch.manual_seed(0)
    t = make_unit(spec, BATCH)
    if system == "fused":
        check_once(spec, t)
    step = make_step(system, spec, t)
    step()  # compiles (torch.compile) / tunes (fused) outside the timing
    ms = time_ms(step, rep_ms=100)
    peak = peak_step_bytes(step)

    def synced():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"conv2d_bn_train-{layer}-bf16-train"
    benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)

    _MS[(layer, system)] = ms
    rates = device_rates()
    work = flops(spec, BATCH)
    info = dict(
        system=system,
        ms=ms,
        tflops=work / (ms * 1e-3) / 1e12,
        matmul_fraction=work / rates["matmul_flops"] / (ms * 1e-3),
        peak_step_bytes=peak,
        matmul_tflops_measured=rates["matmul_flops"] / 1e12,
        device=rates["device"],
        torch=torch.__version__,
        triton=triton.__version__,
    )
    line = f"{benchmark.group} {system:8s} {ms:8.3f} ms"
    for peer in SYSTEMS[: SYSTEMS.index(system)]:
        if (layer, peer) in _MS:
            info[f"speedup_over_{peer}"] = _MS[(layer, peer)] / ms
            line += f"  {info[f'speedup_over_{peer}']:.2f}x {peer}"
    line += (
        f"  {info['tflops']:.1f} TFLOP/s ({info['matmul_fraction']:.2f} of matmul "
        f"{info['matmul_tflops_measured']:.0f})  peak {peak / 2**20:,.0f} MiB"
    )
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(line)
