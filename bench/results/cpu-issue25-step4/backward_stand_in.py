"""The training backward's cost with PyTorch's convolution_backward replaced by a stand-in
(zero-filled gradients of the right shapes, on both sides), beside the real one: what is left
is Python, dispatch and the elementwise kernels (BatchNorm and ReLU backward, our recomputed
activations), which a GPU runs as launches. `scripts/host_cost.py`'s workloads and backward
timing (best of 3 rounds of 5). Run from the repository root:

    .venv/bin/python bench/results/cpu-issue25-step4/backward_stand_in.py
"""

import contextlib
import sys
import warnings

sys.path.insert(0, "scripts")

import host_cost  # noqa: E402  (before torch: pops TRITON_INTERPRET)
import torch  # noqa: E402


@contextlib.contextmanager
def conv_backward_stand_in():
    """aten::convolution_backward on CPU returns zeros of the gradients' shapes."""

    def stand_in(grad_out, x, weight, bias_sizes, *geometry_and_mask):
        mask = geometry_and_mask[-1]
        return (
            torch.zeros_like(x) if mask[0] else x.new_empty(0),
            torch.zeros_like(weight) if mask[1] else weight.new_empty(0),
            grad_out.new_zeros(weight.shape[0]) if mask[2] else grad_out.new_empty(0),
        )

    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        library.impl("convolution_backward", stand_in, "CPU")
    try:
        yield
    finally:
        library._destroy()


def main() -> None:
    torch.set_num_threads(1)
    for workload in host_cost.WORKLOADS:
        for mode in ("train", "train-bn"):
            with host_cost.Recorder(all_candidates=False).patched(host_cost.ARCH):
                torch.manual_seed(0)
                model = host_cost.WORKLOADS[workload]().to(memory_format=torch.channels_last)
                x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
                host_cost._set_mode(model, mode)
                ms = {}
                for stand_in in (False, True):
                    scope = conv_backward_stand_in() if stand_in else contextlib.nullcontext()
                    with scope:
                        for backend in ("triton", "torch"):
                            model.set_backend(backend)
                            host_cost._backward_ms(model, x, 2, 1)  # warm-up
                            ms[stand_in, backend] = host_cost._backward_ms(model, x, 5, 3)
            parts = []
            for stand_in, label in ((False, "real"), (True, "conv backward stood in")):
                ours, eager = ms[stand_in, "triton"], ms[stand_in, "torch"]
                parts.append(f"{label}: ours {ours:.2f} ms, eager {eager:.2f}, {ours / eager:.2f}x")
            print(workload, mode, " | ".join(parts))


if __name__ == "__main__":
    main()
