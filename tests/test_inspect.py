"""zenith_onnx.summary and `zenith-onnx inspect`: op counts (subgraphs and functions
included), inputs/outputs with shapes, opsets, weight bytes wherever they live, custom ops."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx.modelio import load_model, save_model
from zenith_onnx.summary import op_counts, summarize


def rich_model(features: int = 4) -> onnx.ModelProto:
    """x[N,features] -> MatMul(w features x 4) -> Add(Constant c[4]) -> If(then: Mul by subgraph
    initializer k[4]; else: Neg) -> my.custom::Frob -> local function my.fn::Twice -> y."""
    then = helper.make_graph(
        [helper.make_node("Mul", ["a", "k"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.full(4, 2.0, np.float32), "k")],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])]
    )
    twice = helper.make_function(
        "my.fn", "Twice", ["u"], ["v"], [helper.make_node("Add", ["u", "u"], ["v"])], [helper.make_opsetid("", 17)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Add", ["m", "c"], ["a"], name="add"),
        helper.make_node("ReduceSum", ["a"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other, name="branch"),
        helper.make_node("Frob", ["b"], ["f"], domain="my.custom", name="frob"),
        helper.make_node("Twice", ["f"], ["y"], domain="my.fn", name="twice"),
    ]
    graph = helper.make_graph(
        nodes, "rich",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.eye(features, 4, dtype=np.float32), "w"), numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.custom", 1), helper.make_opsetid("my.fn", 1)],
        ir_version=8, functions=[twice], producer_name="tests", producer_version="1",
    )


def test_op_counts_cover_subgraphs_and_functions():
    counts = op_counts(ir.serde.deserialize_model(rich_model()))
    assert counts == {
        "Add": 2,  # main graph and the function body
        "Constant": 1,
        "Greater": 1,
        "If": 1,
        "MatMul": 1,
        "Mul": 1,  # then branch
        "Neg": 1,  # else branch
        "ReduceSum": 1,
        "my.custom::Frob": 1,
        "my.fn::Twice": 1,
    }


def test_summary_fields():
    summary = summarize(ir.serde.deserialize_model(rich_model()))
    assert summary.opsets == {"": 17, "my.custom": 1, "my.fn": 1}
    assert summary.ir_version == 8 and summary.producer == "tests 1"
    assert summary.inputs == [{"name": "x", "dtype": "float", "shape": ["N", 4]}]
    assert summary.outputs == [{"name": "y", "dtype": "float", "shape": ["N", 4]}]
    assert summary.nodes == 11
    # w (4x4 float) + zero (scalar) in the main graph, k (4 floats) in the then branch.
    assert summary.initializers == 3
    assert summary.initializer_bytes == 64 + 4 + 16
    assert summary.external_bytes == 0
    assert (summary.constant_nodes, summary.constant_bytes) == (1, 16)
    assert summary.functions == ["my.fn::Twice"]
    assert summary.custom_ops == {"my.custom::Frob": 1}  # the function call is not a custom op
    text = summary.format()
    assert "nodes 11, initializers 3 (84 bytes), Constant nodes 1 (16 bytes)" in text
    assert "  x: float[Nx4]" in text
    assert "custom ops (not ai.onnx; onnxruntime needs a kernel for them): my.custom::Frob (1)" in text


def test_initializer_that_is_also_an_input_is_not_listed_as_input():
    proto = rich_model()
    proto.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4]))  # IR v3 style
    summary = summarize(ir.serde.deserialize_model(proto))
    assert [v["name"] for v in summary.inputs] == ["x"]


def test_external_data_bytes(tmp_path):
    path = tmp_path / "m.onnx"
    save_model(ir.serde.deserialize_model(rich_model(features=64)), path, external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    summary = summarize(load_model(path))
    assert summary.external_bytes == 64 * 4 * 4  # w; smaller tensors stay inline
    assert "in external data" in summary.format()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zenith_onnx", *args], capture_output=True, text=True, timeout=120)


def test_inspect_command_lists_custom_ops(tmp_path):
    path = tmp_path / "rich.onnx"
    onnx.save(rich_model(), path)
    result = _cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "my.custom::Frob" in result.stdout and "If" in result.stdout
    result = _cli("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ops"]["my.custom::Frob"] == 1 and data["custom_ops"] == {"my.custom::Frob": 1}
    assert data["initializer_bytes"] == 84 and "fusion" not in data


def test_unknown_and_symbolic_dims():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "dims",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, "batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    summary = summarize(ir.serde.deserialize_model(proto))
    assert summary.inputs[0]["shape"] == ["?", "batch", 4]
    assert "x: float[?xbatchx4]" in summary.format() and "y: float[?]" in summary.format()
