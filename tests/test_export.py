"""Export for deployment from the default backend: ONNX (both exporters, run in onnxruntime) and
torch.export give graphs of standard ATen ops that compute what the oracle computes; torch.compile
still traces the fused ops.

ResNet-50 and Res2Net-50 on tiny images (exporting is what costs here); ResNet-18 where the
point is the backend, not the model.
"""

from __future__ import annotations

import copy
import io

import onnx
import onnxruntime
import pytest
import torch

import fastres
from fastres.testing import assert_matches_oracle, randomize_norms

MODELS = {
    "resnet50": lambda **kw: fastres.ResNet(depth=50, **kw),
    "res2net50": lambda **kw: fastres.Res2Net(depth=50, **kw),
}


def build(name: str) -> torch.nn.Module:
    """The model on the default backend, in eval mode, with every block mattering."""
    model = randomize_norms(MODELS[name](zero_init_residual=False)).eval()
    assert model.backend == "auto"
    return model


def oracle(model: torch.nn.Module, x: torch.Tensor) -> tuple[list, list]:
    """(base, gold): the oracle's outputs in float32 and in float64."""
    reference = copy.deepcopy(model).set_backend("torch")
    with torch.no_grad():
        base = reference(x)
        gold = reference.double()(x.double())
    return list(base), list(gold)


def assert_outputs_match_oracle(outs, model, x):
    base, gold = oracle(model, x)
    assert len(outs) == len(gold)
    for i, (a, b, g) in enumerate(zip(outs, base, gold, strict=True)):
        assert a.shape == g.shape, (i, a.shape, g.shape)
        assert_matches_oracle(a, b, g, torch.float32, f"output {i}")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_onnx_export_runs_in_onnxruntime(name, dynamo):
    model = build(name)
    # Exported at one batch size, run at another: the batch stays a dimension of the graph (not
    # exported at batch 1, which torch.export may specialise).
    example, x = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    f = io.BytesIO()
    if dynamo:
        batch = torch.export.Dim("batch")
        program = torch.onnx.export(
            model, (example,), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False
        )
        program.save(f)
    else:
        torch.onnx.export(
            model,
            (example,),
            f,
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )
    proto = onnx.load_from_string(f.getvalue())
    assert not [n.op_type for n in proto.graph.node if n.domain not in ("", "ai.onnx")]
    session = onnxruntime.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    (input_name,) = [i.name for i in session.get_inputs()]
    outs = session.run(None, {input_name: x.numpy()})
    assert_outputs_match_oracle([torch.from_numpy(o) for o in outs], model, x)


def graph_ops(program: torch.export.ExportedProgram) -> set[torch._ops.OpOverload]:
    return {n.target for n in program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)}


@pytest.mark.parametrize("name", MODELS)
def test_torch_export_graph_has_no_fastres_op(name):
    model = build(name)
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(model, (x,))
    ops = graph_ops(program)
    assert ops and not [op for op in ops if op.namespace == "fastres"]
    assert_outputs_match_oracle(program.module()(x), model, x)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_every_backend_exports_the_oracle(backend):
    if not fastres.available_backends()[backend].available:
        pytest.skip(fastres.available_backends()[backend].reason)
    model = randomize_norms(fastres.ResNet(depth=18, zero_init_residual=False)).eval()
    x = torch.randn(1, 3, 16, 16)
    expected = graph_ops(torch.export.export(model.set_backend("torch"), (x,)))
    assert graph_ops(torch.export.export(model.set_backend(backend), (x,))) == expected


def test_torch_compile_still_traces_the_fused_ops():
    """Export runs the oracle; torch.compile (also a tracer) must not."""
    model = randomize_norms(fastres.ResNet(depth=18, zero_init_residual=False)).eval()
    if fastres.backends.resolve("auto", torch.device("cpu")).name == "torch":
        pytest.skip("no fused backend runs on CPU here")
    traced = []

    def record(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        outs = torch.compile(model, fullgraph=True, backend=record)(x)
    assert any("fastres" in t for t in traced), sorted(set(traced))
    assert_outputs_match_oracle(outs, model, x)
