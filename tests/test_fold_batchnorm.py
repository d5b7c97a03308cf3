"""fold_batchnorm: structure (op counts, wiring, names, dtypes, checker) and numbers
(onnxruntime at ORT_DISABLE_ALL before vs after, max relative error <= 1e-5 on float32:
folding rounds each weight once more, ~1e-7 relative, and a 3x3x8 dot product adds a
few ulps; 1e-5 leaves room for that and nothing else)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bn_models import GraphBuilder, make_model, to_ir
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx.passes.fold_batchnorm import CONVERTED, FOLDED, LEFT, FoldBatchNormPass
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import assert_outputs_close, random_feeds

C = 4


def fold(proto: onnx.ModelProto, *, feeds=None, rtol: float = 1e-5) -> tuple[ir.Model, FoldBatchNormPass]:
    """Run the pass alone; check the result with the full checker and against the
    original in onnxruntime."""
    before, after = to_ir(proto), to_ir(proto)
    fold_pass = FoldBatchNormPass()
    fold_pass(after)
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    assert_outputs_close(before, after, feeds, rtol=rtol)
    return after, fold_pass


def actions(fold_pass: FoldBatchNormPass) -> list[str]:
    return [r.action for r in fold_pass.report]


def nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == op_type]


def const(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _initializer(builder: GraphBuilder, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in builder.initializers if t.name == name)


# ---------------------------------------------------------------- Conv -> BN


@pytest.mark.parametrize("kernel", [(3,), (3, 3), (2, 3, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("group", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
def test_conv_bn_folds_into_conv(kernel, bias, group):
    b = GraphBuilder()
    x = b.input("x", [2, C, *([5] * len(kernel))])
    y = b.conv(x, C, C, "conv", kernel=kernel, group=group, bias=bias)
    b.bn(y, C, "bn", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Conv": 1}
    conv = nodes(after, "Conv")[0]
    assert conv.inputs[0].name == "x" and len(conv.inputs) == 3
    assert conv.outputs[0] is after.graph.outputs[0]
    assert conv.inputs[1].shape == ir.Shape([C, C // group, *kernel])
    assert conv.inputs[2].shape == ir.Shape([C])
    assert set(after.graph.initializers) == {conv.inputs[1].name, conv.inputs[2].name}
    assert actions(fold_pass) == [FOLDED] and fold_pass.report[0].target == "Conv 'conv'"


@pytest.mark.parametrize("group", [1, 2], ids=["dense", "grouped"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_transpose_bn_folds_on_weight_axis_1(group, bias):
    c_in, c_out = 4, 6
    b = GraphBuilder()
    x = b.input("x", [1, c_in, 5, 5])
    inputs = [x, b.const("ct.w", b.random((c_in, c_out // group, 3, 3), 0.3))]
    if bias:
        inputs.append(b.const("ct.b", b.random((c_out,), 0.1)))
    y = b.node("ConvTranspose", inputs, "ct_out", "ct", group=group, strides=[2, 2])
    b.bn(y, c_out, "bn", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"ConvTranspose": 1}
    ct = nodes(after, "ConvTranspose")[0]
    assert ct.inputs[1].shape == ir.Shape([c_in, c_out // group, 3, 3])
    assert const(ct.inputs[2]).shape == (c_out,)
    assert actions(fold_pass) == [FOLDED]


# ---------------------------------------------------------------- Gemm / MatMul -> BN


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), ()], ids=["noC", "C(N)", "C(1,N)", "C()"])
def test_gemm_bn_folds_with_alpha_beta(trans_b, c_shape):
    k, n = 5, 6
    b = GraphBuilder()
    x = b.input("x", [3, k])
    inputs = [x, b.const("B", b.random((n, k) if trans_b else (k, n)))]
    if c_shape is not None:
        inputs.append(b.const("C", b.random(c_shape)))
    y = b.node("Gemm", inputs, "gemm_out", "gemm", alpha=0.7, beta=1.3, transB=trans_b)
    b.bn(y, n, "bn", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Gemm": 1}
    gemm = nodes(after, "Gemm")[0]
    assert gemm.attributes["alpha"].as_float() == pytest.approx(0.7)
    assert "beta" not in gemm.attributes  # absorbed into C
    assert const(gemm.inputs[2]).shape == (n,)
    assert actions(fold_pass) == [FOLDED]


def test_gemm_with_per_row_bias_is_not_folded():
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    y = b.node("Gemm", [x, b.const("B", b.random((5, 4))), b.const("C", b.random((3, 4)))], "gemm_out", "gemm")
    b.bn(y, 4, "bn", output="y")
    b.output("y", [3, 4])
    after, fold_pass = fold(make_model(b.graph()))
    assert op_counts(after) == {"Add": 1, "Gemm": 1, "Mul": 1}
    assert actions(fold_pass) == [CONVERTED]
    assert "C has shape (3, 4)" in fold_pass.report[0].reason


def test_matmul_bn_becomes_matmul_add():
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    y = b.node("MatMul", [x, b.const("W", b.random((5, 6)))], "mm_out", "mm")
    b.bn(y, 6, "bn", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True))

    assert op_counts(after) == {"Add": 1, "MatMul": 1}
    matmul, add = nodes(after, "MatMul")[0], nodes(after, "Add")[0]
    assert add.inputs[0] is matmul.outputs[0]
    assert const(add.inputs[1]).shape == (6,)
    assert add.outputs[0].name == "y"
    assert actions(fold_pass) == [FOLDED]


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("bias_shape", [(6,), (1, 6)])
def test_matmul_add_bn_folds_into_both(bias_first, bias_shape):
    b = GraphBuilder()
    x = b.input("x", [3, 5])
    y = b.node("MatMul", [x, b.const("W", b.random((5, 6)))], "mm_out", "mm")
    bias = b.const("bias", b.random(bias_shape))
    y = b.node("Add", [bias, y] if bias_first else [y, bias], "add_out", "add")
    b.bn(y, 6, "bn", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True))

    assert op_counts(after) == {"Add": 1, "MatMul": 1}
    add = nodes(after, "Add")[0]
    assert add.inputs[1 if bias_first else 0] is nodes(after, "MatMul")[0].outputs[0]
    assert fold_pass.report[0].target == "MatMul 'mm' + Add 'add'"


def test_matmul_with_3d_output_is_refused():
    # BN's channel axis on (B, T, N) is T, not the MatMul's features N.
    b = GraphBuilder()
    x = b.input("x", [2, 3, 5])
    y = b.node("MatMul", [x, b.const("W", b.random((5, 6)))], "mm_out", "mm")
    b.bn(y, 3, "bn", output="y")
    b.output("y", [2, 3, 6])
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True))

    assert op_counts(after) == {"Add": 1, "MatMul": 1, "Mul": 1}
    np.testing.assert_array_equal(const(nodes(after, "MatMul")[0].inputs[1]), _initializer(b, "W"))
    assert actions(fold_pass) == [CONVERTED]
    assert "output has rank 3" in fold_pass.report[0].reason
    assert const(nodes(after, "Mul")[0].inputs[1]).shape == (3, 1)


def test_matmul_with_unknown_output_rank_is_refused():
    b = GraphBuilder()
    x = b.node("Relu", [b.input("x", [3, 5])], "r", "relu")  # no value_info: rank unknown
    y = b.node("MatMul", [x, b.const("W", b.random((5, 6)))], "mm_out", "mm")
    b.node("Relu", [b.bn(y, 6, "bn")], "y", "relu_out")
    b.output("y", None)
    proto = make_model(b.graph())
    after = to_ir(proto)
    fold_pass = FoldBatchNormPass()
    fold_pass(after)
    assert op_counts(after) == {"BatchNormalization": 1, "MatMul": 1, "Relu": 2}
    assert actions(fold_pass) == [LEFT]
    assert "output rank is unknown" in fold_pass.report[0].reason
    assert "input rank is unknown" in fold_pass.report[0].reason


# ---------------------------------------------------------------- BN -> Conv


@pytest.mark.parametrize("group", [1, 2, 4], ids=["dense", "grouped", "depthwise"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("auto_pad", [None, "VALID"])
def test_bn_before_unpadded_conv_folds_into_input_channels(group, bias, auto_pad):
    b = GraphBuilder()
    x = b.input("x", [1, C, 6, 6])
    y = b.bn(x, C, "bn")
    attrs = {"strides": [2, 2], "pads": [0, 0, 0, 0]} if auto_pad is None else {"auto_pad": auto_pad}
    b.conv(y, C, 6 if group != 4 else 8, "conv", group=group, bias=bias, **attrs)
    b.nodes[-1].output[0] = "y"
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Conv": 1}
    conv = nodes(after, "Conv")[0]
    assert conv.inputs[0].name == "x" and conv.outputs[0].name == "y"
    assert len(conv.inputs) == 3
    assert actions(fold_pass) == [FOLDED]


@pytest.mark.parametrize("pad_attrs", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}], ids=["pads", "same"])
def test_bn_before_padded_conv_becomes_mul_add(pad_attrs):
    b = GraphBuilder()
    x = b.input("x", [1, C, 6, 6])
    y = b.bn(x, C, "bn")
    b.conv(y, C, C, "conv", **pad_attrs)
    b.nodes[-1].output[0] = "y"
    b.output("y", None)
    original_weight = _initializer(b, "conv.w")
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Add": 1, "Conv": 1, "Mul": 1}
    conv = nodes(after, "Conv")[0]
    np.testing.assert_array_equal(const(conv.inputs[1]), original_weight)
    assert conv.inputs[0].producer().op_type == "Add"
    assert actions(fold_pass) == [CONVERTED]
    assert "pads its input" in fold_pass.report[0].reason


# ---------------------------------------------------------------- Mul + Add, left alone


def _assert_affine(after: ir.Model, x_name: str, shape: tuple[int, ...]) -> None:
    mul, add = nodes(after, "Mul")[-1], nodes(after, "Add")[-1]
    assert mul.inputs[0].name == x_name and add.inputs[0] is mul.outputs[0]
    assert const(mul.inputs[1]).shape == shape and const(add.inputs[1]).shape == shape


def test_bn_after_add_becomes_mul_add():
    b = GraphBuilder()
    s = b.node("Add", [b.input("x1", [1, C, 5, 5]), b.input("x2", [1, C, 5, 5])], "sum", "add")
    y = b.bn(s, C, "bn")
    b.node("Relu", [y], "y", "relu")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True))

    assert op_counts(after) == {"Add": 2, "Mul": 1, "Relu": 1}
    _assert_affine(after, "sum", (C, 1, 1))
    assert actions(fold_pass) == [CONVERTED]
    assert "comes from Add 'add', which is not MatMul + constant bias" in fold_pass.report[0].reason


@pytest.mark.parametrize("shape", [[2, C], [2, C, 7], [1, C, 3, 3, 3]], ids=["2d", "3d", "5d"])
def test_bn_after_graph_input_becomes_mul_add_for_its_rank(shape):
    b = GraphBuilder()
    b.bn(b.input("x", shape), C, "bn", output="y")
    b.output("y", shape)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Add": 1, "Mul": 1}
    _assert_affine(after, "x", (C, *[1] * (len(shape) - 2)))
    out = after.graph.outputs[0]
    assert out.name == "y" and out.producer().op_type == "Add" and out.dtype == ir.DataType.FLOAT
    assert "is a graph input" in fold_pass.report[0].reason


def test_conv_with_two_consumers_is_not_folded_into():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    c = b.conv(x, C, C, "conv", pads=[1, 1, 1, 1])
    b.bn(c, C, "bn", output="y")
    b.node("Relu", [c], "z", "relu")
    b.output("y", None)
    b.output("z", None)
    original_weight = _initializer(b, "conv.w")
    after, fold_pass = fold(make_model(b.graph()))  # no shape info: rank from the Conv weight

    assert op_counts(after) == {"Add": 1, "Conv": 1, "Mul": 1, "Relu": 1}
    np.testing.assert_array_equal(const(nodes(after, "Conv")[0].inputs[1]), original_weight)
    _assert_affine(after, "conv_out", (C, 1, 1))
    assert [o.name for o in after.graph.outputs] == ["y", "z"]
    assert "has other consumers" in fold_pass.report[0].reason


def test_bn_with_unknown_rank_is_left():
    b = GraphBuilder()
    s = b.node("Add", [b.input("x1", [1, C, 3, 3]), b.input("x2", [1, C, 3, 3])], "sum", "add")
    b.node("Relu", [b.bn(s, C, "bn")], "y", "relu")
    b.output("y", None)
    after = to_ir(make_model(b.graph()))  # no value_info for 'sum' and 'bn_out'
    fold_pass = FoldBatchNormPass()
    assert not fold_pass(after).modified
    assert op_counts(after) == {"Add": 1, "BatchNormalization": 1, "Relu": 1}
    assert actions(fold_pass) == [LEFT] and "input rank is unknown" in fold_pass.report[0].reason


def test_training_mode_and_statistics_outputs_are_left():
    b = GraphBuilder()
    x = b.input("x", [2, C, 3, 3])
    c = b.conv(x, C, C, "conv", pads=[1, 1, 1, 1])
    _training_bn(b, c, "bn_train", ["y", "running_mean", "running_var"])
    b.output("y", None)
    b.output("running_mean", None)
    after = to_ir(make_model(b.graph()))
    fold_pass = FoldBatchNormPass()
    fold_pass(after)
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    assert op_counts(after) == {"BatchNormalization": 1, "Conv": 1}
    assert actions(fold_pass) == [LEFT]
    assert fold_pass.report[0].reason == "training_mode=1: it computes batch statistics"


def _training_bn(b: GraphBuilder, x: str, name: str, outputs: list[str], **attrs) -> None:
    b.nodes.append(helper.make_node("BatchNormalization", [x, *b.bn_params(name, C)], outputs, name=name,
                                    training_mode=1, **attrs))


def test_statistics_outputs_without_training_mode_attribute_are_left():
    # opset 9-13 had no training_mode attribute: extra outputs mean training.
    b = GraphBuilder()
    x = b.input("x", [2, C, 3, 3])
    b.nodes.append(helper.make_node("BatchNormalization", [x, *b.bn_params("bn", C)],
                                    ["y", "mean_out", "var_out", "saved_mean", "saved_var"], name="bn"))
    b.output("y", [2, C, 3, 3])
    after = to_ir(make_model(b.graph(), opset=12))
    fold_pass = FoldBatchNormPass()
    fold_pass(after)
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    assert op_counts(after) == {"BatchNormalization": 1}
    assert "it has 5 outputs" in fold_pass.report[0].reason


def test_per_activation_statistics_are_left():
    # opset 7/8 spatial=0: statistics per (C, H, W) element, not per channel.
    b = GraphBuilder()
    x = b.input("x", [1, C, 2, 2])
    stats = [b.const(f"bn.{p}", b.random((C, 2, 2)) ** 2 + 0.5) for p in ("scale", "bias", "mean", "var")]
    b.node("BatchNormalization", [x, *stats], "y", "bn", spatial=0)
    b.output("y", [1, C, 2, 2])
    after = to_ir(make_model(b.graph(), opset=8))
    fold_pass = FoldBatchNormPass()
    fold_pass(after)
    assert op_counts(after) == {"BatchNormalization": 1}
    assert fold_pass.report[0].reason == "spatial=0: per-activation statistics"


def test_non_constant_statistics_are_left():
    b = GraphBuilder()
    x = b.input("x", [1, C, 3, 3])
    c = b.conv(x, C, C, "conv")
    scale, bias, mean, var = b.bn_params("bn", C)
    b.initializers = [t for t in b.initializers if t.name != scale]
    b.input(scale, [C])
    b.node("BatchNormalization", [c, scale, bias, mean, var], "y", "bn")
    b.output("y", None)
    proto = make_model(b.graph())
    feeds = random_feeds(to_ir(proto)) | {scale: np.linspace(0.5, 1.5, C, dtype=np.float32)}
    after, fold_pass = fold(proto, feeds=feeds)
    assert op_counts(after) == {"BatchNormalization": 1, "Conv": 1}
    assert fold_pass.report[0].reason == "scale 'bn.scale' is not a constant"


# ---------------------------------------------------------------- names, sharing, constants


def test_graph_output_keeps_name_dtype_and_shape():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    b.bn(b.conv(x, C, C, "conv", pads=[1, 1, 1, 1]), C, "bn", output="logits")
    b.output("logits", [1, C, 5, 5])
    proto = make_model(b.graph())
    before = to_ir(proto).graph.outputs[0]
    after, _ = fold(proto)

    out = after.graph.outputs[0]
    assert (out.name, out.dtype, out.shape) == (before.name, before.dtype, before.shape)
    assert out.producer().op_type == "Conv"
    assert ir.serde.serialize_model(after).graph.output[0].name == "logits"


def test_weight_shared_by_two_convs_is_folded_once_per_conv():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    w, bias = b.const("shared.w", b.random((C, C, 3, 3), 0.3)), b.const("shared.b", b.random((C,), 0.1))
    for i in (1, 2):
        c = b.node("Conv", [x, w, bias], f"conv{i}_out", f"conv{i}", pads=[1, 1, 1, 1])
        b.bn(c, C, f"bn{i}", output=f"y{i}")
        b.output(f"y{i}", None)
    after, fold_pass = fold(make_model(b.graph()))

    conv1, conv2 = nodes(after, "Conv")
    assert op_counts(after) == {"Conv": 2}
    assert conv1.inputs[1] is not conv2.inputs[1] and conv1.inputs[2] is not conv2.inputs[2]
    assert not np.array_equal(const(conv1.inputs[1]), const(conv2.inputs[1]))
    assert {"shared.w", "shared.b"}.isdisjoint(after.graph.initializers)  # unused once both folded
    assert actions(fold_pass) == [FOLDED, FOLDED]


def test_constant_node_weights_fold_without_lifting():
    b = GraphBuilder(constants_as_nodes=True)
    x = b.input("x", [1, C, 5, 5])
    y = b.bn(x, C, "bn0")  # folds forward into conv (no padding)
    y = b.conv(y, C, C, "conv")
    b.bn(y, C, "bn1", output="y")  # folds back into the same conv
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Conv": 1}  # the Constant nodes nothing reads are gone
    conv = nodes(after, "Conv")[0]
    assert conv.inputs[0].name == "x" and conv.outputs[0].name == "y"
    assert all(v.is_initializer() for v in conv.inputs[1:])
    assert actions(fold_pass) == [FOLDED, FOLDED]


def test_chain_of_two_batchnorms_folds_both():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    y = b.bn(b.conv(x, C, C, "conv", pads=[1, 1, 1, 1]), C, "bn1")
    b.bn(y, C, "bn2", output="y")
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph()))
    assert op_counts(after) == {"Conv": 1}
    assert [r.target for r in fold_pass.report] == ["Conv 'conv'", "Conv 'conv'"]


def test_non_default_epsilon_is_used():
    # var near 0: eps=0.1 vs the default 1e-5 changes the scale ~100x.
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    c = b.conv(x, C, C, "conv", pads=[1, 1, 1, 1])
    scale, bias, mean, var = b.bn_params("bn", C)
    b.initializers[-1] = numpy_helper.from_array(np.full(C, 1e-4, np.float32), var)
    b.node("BatchNormalization", [c, scale, bias, mean, var], "y", "bn", epsilon=0.1)
    b.output("y", None)
    after, _ = fold(make_model(b.graph()))
    assert op_counts(after) == {"Conv": 1}


# ---------------------------------------------------------------- subgraphs and functions


def _branch(name: str, seed: int) -> onnx.GraphProto:
    g = GraphBuilder(name, seed=seed)
    g.bn(g.conv("x", C, C, f"{name}_conv", pads=[1, 1, 1, 1]), C, f"{name}_bn", output=f"{name}_y")
    g.output(f"{name}_y", [1, C, 5, 5])
    return g.graph()


def test_bn_in_if_branches_is_folded():
    b = GraphBuilder()
    b.input("x", [1, C, 5, 5])
    b.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    b.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if",
                                    then_branch=_branch("then", 1), else_branch=_branch("else", 2)))
    b.output("y", [1, C, 5, 5])
    proto = make_model(b.graph())
    x_feed = np.random.default_rng(0).standard_normal((1, C, 5, 5)).astype(np.float32)
    feeds = [{"x": x_feed, "cond": np.array(flag)} for flag in (True, False)]
    after, fold_pass = fold(proto, feeds=feeds)

    assert op_counts(after) == {"Conv": 2, "If": 1}
    assert actions(fold_pass) == [FOLDED, FOLDED]
    for attr in ("then_branch", "else_branch"):
        branch = nodes(after, "If")[0].attributes[attr].as_graph()
        assert branch.outputs[0].producer().op_type == "Conv"
        assert len(branch.initializers) == 2  # folded weight and bias live in the branch


def test_bn_in_branch_is_not_folded_into_a_conv_of_the_enclosing_graph():
    then = GraphBuilder("then", seed=5)
    then.bn("c", C, "then_bn", output="then_y")
    then.output("then_y", [1, C, 5, 5])
    other = GraphBuilder("else")
    other.node("Identity", ["x"], "else_y", "else_id")
    other.output("else_y", [1, C, 5, 5])
    b = GraphBuilder()
    b.conv(b.input("x", [1, C, 5, 5]), C, C, "conv", pads=[1, 1, 1, 1])
    b.nodes[-1].output[0] = "c"
    b.inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    b.nodes.append(helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then.graph(), else_branch=other.graph()))
    b.output("y", [1, C, 5, 5])
    x_feed = np.random.default_rng(0).standard_normal((1, C, 5, 5)).astype(np.float32)
    after, fold_pass = fold(make_model(b.graph()), feeds=[{"x": x_feed, "cond": np.array(f)} for f in (True, False)])

    assert op_counts(after) == {"Add": 1, "Conv": 1, "Identity": 1, "If": 1, "Mul": 1}
    assert actions(fold_pass) == [CONVERTED]
    assert "Conv 'conv' is in an enclosing graph" in fold_pass.report[0].reason


def test_bn_in_loop_body_is_folded():
    body = GraphBuilder("body", seed=3)
    body.inputs.append(helper.make_tensor_value_info("i", TensorProto.INT64, []))
    body.inputs.append(helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []))
    v = body.input("v_in", [1, C, 5, 5])
    body.node("Identity", ["cond_in"], "cond_out", "keep_going")
    body.outputs.append(helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []))
    body.bn(body.conv(v, C, C, "body_conv", pads=[1, 1, 1, 1]), C, "body_bn", output="v_out")
    body.output("v_out", [1, C, 5, 5])

    b = GraphBuilder()
    b.const("trips", np.array(3, np.int64))
    b.const("go", np.array(True))
    b.input("x", [1, C, 5, 5])
    b.nodes.append(helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=body.graph()))
    b.output("y", [1, C, 5, 5])
    after, fold_pass = fold(make_model(b.graph()))

    assert op_counts(after) == {"Conv": 1, "Identity": 1, "Loop": 1}
    assert actions(fold_pass) == [FOLDED]
    assert fold_pass.report[0].graph == "graph 'body'"


def test_bn_in_local_function_is_folded_with_constant_nodes():
    fn = GraphBuilder("ConvBn", seed=4, constants_as_nodes=True)
    fn.bn(fn.conv("fx", C, C, "fconv", pads=[1, 1, 1, 1]), C, "fbn", output="fc")
    # A Conv with two consumers: its BN becomes Mul+Add (function values are untyped;
    # the rank comes from the Conv weight).
    shared = fn.conv("fc", C, C, "fconv2", pads=[1, 1, 1, 1])
    fn.bn(shared, C, "fbn2", output="fy")
    fn.node("Relu", [shared], "fz", "frelu")
    function = helper.make_function("zenith.test", "ConvBn", ["fx"], ["fy", "fz"], fn.nodes,
                                    [helper.make_opsetid("", 17)])
    b = GraphBuilder()
    b.input("x", [1, C, 5, 5])
    b.nodes.append(helper.make_node("ConvBn", ["x"], ["y", "z"], name="call", domain="zenith.test"))
    b.output("y", [1, C, 5, 5])
    b.output("z", [1, C, 5, 5])
    proto = make_model(b.graph(), functions=[function], domains={"zenith.test": 1}, infer_shapes=True)
    after, fold_pass = fold(proto)

    body = after.functions[("zenith.test", "ConvBn", "")]
    ops = sorted(n.op_type for n in body)
    # fconv2's weight and bias, the folded fconv weight and bias, Mul's and Add's constants
    assert ops == ["Add", "Constant", "Constant", "Constant", "Constant", "Constant", "Constant", "Conv", "Conv",
                   "Mul", "Relu"]
    assert [v.name for v in body.outputs] == ["fy", "fz"]
    assert actions(fold_pass) == [FOLDED, CONVERTED]
    assert fold_pass.report[0].graph == "function zenith.test::ConvBn"


# ---------------------------------------------------------------- dtypes


def test_float16_weights_stay_float16():
    # float16 has a 2**-10 ~ 1e-3 ulp; the folded weights round once more, so allow two
    # ulps (the error seen is ~7e-4).
    b = GraphBuilder(dtype=np.float16)
    x = b.input("x", [1, C, 5, 5])
    y = b.bn(b.conv(x, C, C, "conv", pads=[1, 1, 1, 1]), C, "bn1")
    b.bn(b.node("Relu", [y], "r", "relu"), C, "bn2", output="y")
    b.output("y", [1, C, 5, 5])
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True), rtol=2e-3)

    assert op_counts(after) == {"Add": 1, "Conv": 1, "Mul": 1, "Relu": 1}
    dtypes = {v.const_value.dtype for v in after.graph.initializers.values()}
    assert dtypes == {ir.DataType.FLOAT16}
    assert after.graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert actions(fold_pass) == [FOLDED, CONVERTED]


def test_float64_weights_stay_float64():
    b = GraphBuilder(dtype=np.float64)
    x = b.input("x", [3, 5])
    y = b.node("Gemm", [x, b.const("B", b.random((6, 5))), b.const("C", b.random((6,)))], "g", "gemm", transB=1)
    b.bn(y, 6, "bn", output="y")
    b.output("y", [3, 6])
    after, _ = fold(make_model(b.graph()), rtol=1e-12)
    assert op_counts(after) == {"Gemm": 1}
    assert {v.const_value.dtype for v in after.graph.initializers.values()} == {ir.DataType.DOUBLE}


# ---------------------------------------------------------------- report


def test_report_lines_name_every_batchnorm_not_folded():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    y = b.bn(b.conv(x, C, C, "conv", pads=[1, 1, 1, 1]), C, "bn_folded")
    y = b.bn(b.node("Relu", [y], "r", "relu"), C, "bn_converted")
    _training_bn(b, y, "bn_train", ["y", "running_mean", "running_var"])
    b.output("y", None)
    after, fold_pass = fold(make_model(b.graph(), infer_shapes=True))

    lines = fold_pass.report_lines()
    assert lines[0] == "fold_batchnorm: 3 BatchNormalization: 1 folded, 1 converted to Mul+Add, 1 left"
    assert lines[1].startswith("  BatchNormalization 'bn_converted' in graph 'g': converted to Mul+Add (")
    assert lines[2] == "  BatchNormalization 'bn_train' in graph 'g': left (training_mode=1: it computes batch statistics)"
    assert len(lines) == 3
