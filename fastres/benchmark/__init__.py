"""Benchmark harness shared by `python -m fastres bench`, `python -m fastres profile` and `bench/`.

A *case* is one whole-model configuration (model, depth, batch, image size, dtype, device, mode);
a *system* is one way of running it: PyTorch eager in NCHW, eager in channels_last, torch.compile
of the same oracle model, or a fastres backend. Every system of a case starts from a deep copy of
the same randomised model and sees the same input batch, so its outputs can be checked once
against the float64 oracle (docs/contract.md §3, `fastres.testing`) before it is timed.

Modes:
- 'infer': `model.eval()`, forward under `torch.no_grad()`;
- 'train': one training step, forward in train mode (BatchNorm on batch statistics) +
  cross-entropy + backward + SGD (momentum 0.9) step.

Below fp32 every system runs under `torch.autocast(device, dtype)` with fp32 weights (AMP), which
is PyTorch eager's best mixed-precision configuration for training and the one MLPerf uses.

One module per job: `systems` (the systems, the backends, the per-device defaults), `case` (the
configuration, the oracle model, a runner per system), `check` (the correctness check),
`memory` (peak memory, page faults), `denormals` (subnormal activations and flushing them),
`schedule` (preparing the systems, each in a process of its own on CPU, and timing them in
turns), `report` (results, table, JSON, environment) and `progress` (the progress bar). This
package re-exports what its callers use.
"""

from .case import (
    DTYPES,
    MODELS,
    MODES,
    BenchConfig,
    Case,
    build_model,
    check_model_depth,
    config_from_args,
)
from .check import ALL_GRADS
from .denormals import count_subnormal_activations, flushes_denormals, set_flush_denormals
from .memory import free_memory
from .progress import Progress
from .report import (
    Result,
    add_speedups,
    device_name,
    environment,
    format_table,
    model_ratios,
    versions,
    write_json,
)
from .schedule import (
    isolates_by_default,
    run_group,
    run_system,
    time_steps,
)
from .systems import (
    COMPILE,
    DETECTION_PAD,
    DEVICE_DEFAULTS,
    EAGER,
    EAGER_CL,
    PEERS,
    PRESETS,
    SETTING_KEYS,
    SPEEDUP_BASELINE,
    System,
    backend_reasons,
    benchable_backends,
    default_backends,
    default_device,
    describe_default,
    device_defaults,
    fastres_system,
    input_size,
    parse_image_size,
    synchronize,
)

__all__ = [
    "ALL_GRADS",
    "COMPILE",
    "DETECTION_PAD",
    "DEVICE_DEFAULTS",
    "DTYPES",
    "EAGER",
    "EAGER_CL",
    "MODELS",
    "MODES",
    "PEERS",
    "PRESETS",
    "SETTING_KEYS",
    "SPEEDUP_BASELINE",
    "BenchConfig",
    "Case",
    "Progress",
    "Result",
    "System",
    "add_speedups",
    "backend_reasons",
    "benchable_backends",
    "build_model",
    "check_model_depth",
    "config_from_args",
    "count_subnormal_activations",
    "default_backends",
    "default_device",
    "describe_default",
    "device_defaults",
    "device_name",
    "environment",
    "fastres_system",
    "flushes_denormals",
    "format_table",
    "free_memory",
    "input_size",
    "isolates_by_default",
    "model_ratios",
    "parse_image_size",
    "run_group",
    "run_system",
    "set_flush_denormals",
    "synchronize",
    "time_steps",
    "versions",
    "write_json",
]
