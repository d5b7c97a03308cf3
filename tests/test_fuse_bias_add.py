"""fuse_bias_add: an Add of a per-channel constant after Conv/ConvTranspose becomes its
bias. Structure (op counts, bias values, names) and numbers (onnxruntime at ORT_DISABLE_ALL
before vs after, 1e-5 relative: the bias sum rounds once, the products are unchanged)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bn_models import GraphBuilder, make_model, to_ir

from zenith_onnx.passes import build_pipeline
from zenith_onnx.passes.fuse_bias_add import FuseBiasAddPass
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import assert_outputs_close

C = 4


def fuse(proto: onnx.ModelProto) -> tuple[ir.Model, FuseBiasAddPass]:
    before, after = to_ir(proto), to_ir(proto)
    fuse_pass = FuseBiasAddPass()
    fuse_pass(after)
    build_pipeline(["cleanup"])(after)
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    assert_outputs_close(before, after, rtol=1e-5)
    return after, fuse_pass


def _paddle_bias(b: GraphBuilder, y: str, name: str, values: np.ndarray, shape: list[int], as_node: bool) -> str:
    """Add(y, Reshape(bias, shape)) as PaddlePaddle exports a layer's bias."""
    bias = b.const(f"{name}.add_b", values, as_node=as_node)
    target = b.const(f"{name}.shape", np.array(shape, np.int64), as_node=as_node)
    return b.node("Reshape", [bias, target], f"{name}_bias4d")


@pytest.mark.parametrize("as_node", [False, True], ids=["initializers", "constant_nodes"])
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
def test_conv_add_reshaped_bias_becomes_the_conv_bias(as_node, conv_bias):
    b = GraphBuilder()
    x = b.input("x", [2, C, 5, 5])
    y = b.conv(x, C, C, "conv", bias=conv_bias)
    values = b.random((C,))
    b.node("Add", [y, _paddle_bias(b, y, "conv", values, [1, C, 1, 1], as_node)], "y")
    b.output("y")
    proto = make_model(b.graph())
    after, fuse_pass = fuse(proto)
    assert op_counts(after) == {"Conv": 1}
    assert fuse_pass.fused == ["conv"]
    conv = next(iter(after.graph))
    old = next((t for t in proto.graph.initializer if t.name == "conv.b"), None)
    expected = values + (onnx.numpy_helper.to_array(old) if conv_bias else 0)
    np.testing.assert_allclose(conv.inputs[2].const_value.numpy(), expected, rtol=1e-6)
    assert conv.outputs[0].name == "y"  # the Conv output takes the Add's name


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_add_folds_per_output_channel(group):
    b = GraphBuilder()
    x = b.input("x", [1, C, 3, 3])
    w = b.const("up.w", b.random((C, 6 // group, 2, 2)))
    y = b.node("ConvTranspose", [x, w], "up_out", "up", strides=[2, 2], group=group)
    b.node("Add", [b.const("up.b", b.random((6, 1, 1))), y], "y")  # constant first, rank 3
    b.output("y")
    after, _ = fuse(make_model(b.graph()))
    assert op_counts(after) == {"ConvTranspose": 1}


def test_batchnorm_after_the_add_folds_into_the_conv_transpose():
    """The PP-OCRv3 text-detection head: ConvTranspose -> Add(bias) -> BN -> Relu."""
    b = GraphBuilder()
    x = b.input("x", [1, C, 3, 3])
    y = b.node("ConvTranspose", [x, b.const("up.w", b.random((C, C, 2, 2)))], "up_out", "up", strides=[2, 2])
    y = b.node("Add", [y, _paddle_bias(b, y, "up", b.random((C,)), [1, C, 1, 1], True)], "added")
    b.node("Relu", [b.bn(y, C, "bn")], "y")
    b.output("y")
    proto = make_model(b.graph())
    before, after = to_ir(proto), to_ir(proto)
    build_pipeline(["lift_constants", "fuse_bias_add", "fold_batchnorm", "cleanup"])(after)
    assert op_counts(after) == {"ConvTranspose": 1, "Relu": 1}
    assert_outputs_close(before, after, rtol=1e-5)


def test_scalar_constant_is_added_to_every_channel():
    b = GraphBuilder()
    x = b.input("x", [1, C, 4, 4])
    y = b.conv(x, C, C, "conv")
    b.node("Add", [y, b.const("k", np.array(0.5, np.float32))], "y")
    b.output("y")
    after, _ = fuse(make_model(b.graph()))
    assert op_counts(after) == {"Conv": 1}


@pytest.mark.parametrize(
    "case",
    ["spatial_constant", "extra_rank", "other_consumer", "activation_operand", "graph_output"],
)
def test_refused_patterns_are_left(case, caplog):
    b = GraphBuilder()
    x = b.input("x", [1, C, 4, 4])
    y = b.conv(x, C, C, "conv", pads=[1, 1, 1, 1])
    operand = {
        "spatial_constant": lambda: b.const("k", b.random((1, C, 4, 4))),
        "extra_rank": lambda: b.const("k", b.random((1, 1, C, 1, 1))),
        "activation_operand": lambda: x,
    }.get(case, lambda: b.const("k", b.random((C, 1, 1))))()
    b.node("Add", [y, operand], "y")
    b.output("y")
    if case == "other_consumer":
        b.node("Relu", [y], "r")
        b.output("r")
    if case == "graph_output":
        b.output(y)
    proto = make_model(b.graph())
    with caplog.at_level("DEBUG", logger="zenith_onnx.passes.fuse_bias_add"):
        after, fuse_pass = fuse(proto)
    assert fuse_pass.fused == [] and op_counts(after)["Add"] == 1
    assert "not fused into a bias" in caplog.text
