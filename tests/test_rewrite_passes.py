"""The float-preserving rewrites that prepare exported models for onnxruntime:
div_to_mul, fuse_hardswish, expand_hard_activations, fold_scale_into_conv, fuse_layernorm.

Each test checks structure (op counts, attributes, what was refused and why) and numbers
(onnxruntime at ORT_DISABLE_ALL before vs after on random inputs scaled to cover the
activations' kinks; 1e-5 relative: the rewrites change a few float32 roundings, nothing
else). The last tests quantize the rewritten models and ask onnxruntime what it fused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from bn_models import GraphBuilder, make_model, to_ir

from zenith_onnx.fusion import fused_counts
from zenith_onnx.passes import QUANTIZE_PREPARE, build_pipeline
from zenith_onnx.quantize import quantize
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import assert_outputs_close, random_feeds

C = 4


def feeds(proto: onnx.ModelProto, scale: float = 4.0, count: int = 3) -> list[dict[str, np.ndarray]]:
    """Random inputs wide enough (x 4) to reach both ends of the hard activations."""
    model = to_ir(proto)
    return [{k: v * scale for k, v in random_feeds(model, seed=i).items()} for i in range(count)]


def rewrite(proto: onnx.ModelProto, *passes: str, rtol: float = 1e-5) -> ir.Model:
    before, after = to_ir(proto), to_ir(proto)
    build_pipeline([*passes, "cleanup"])(after)
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    assert_outputs_close(before, after, feeds(proto), rtol=rtol)
    return after


def _written_hardswish(b: GraphBuilder, x: str, name: str, *, divide: bool = True, swap: bool = False) -> str:
    """x * Clip(x + 3, 0, 6) / 6 as PaddlePaddle exports it (opset >= 11 Clip)."""
    shifted = b.node("Add", [b.const(f"{name}.three", np.array(3, np.float32)), x] if swap
                     else [x, b.const(f"{name}.three", np.array(3, np.float32))], f"{name}_shifted")
    clipped = b.node("Clip", [shifted, b.const(f"{name}.zero", np.array(0, np.float32)),
                              b.const(f"{name}.six", np.array(6, np.float32))], f"{name}_clipped")
    product = b.node("Mul", [clipped, x] if swap else [x, clipped], f"{name}_product")
    if divide:
        return b.node("Div", [product, b.const(f"{name}.six_div", np.array(6, np.float32))], f"{name}_out")
    return b.node("Mul", [product, b.const(f"{name}.sixth", np.array(1 / 6, np.float32))], f"{name}_out")


def _written_hardsigmoid(b: GraphBuilder, x: str, name: str) -> str:
    shifted = b.node("Add", [x, b.const(f"{name}.three", np.array(3, np.float32))], f"{name}_shifted")
    clipped = b.node("Clip", [shifted, b.const(f"{name}.zero", np.array(0, np.float32)),
                              b.const(f"{name}.six", np.array(6, np.float32))], f"{name}_clipped")
    return b.node("Div", [clipped, b.const(f"{name}.six_div", np.array(6, np.float32))], f"{name}_out")


# ------------------------------------------------------------------ div_to_mul


def test_div_by_constant_becomes_mul_by_reciprocal():
    b = GraphBuilder()
    x = b.input("x", [2, C, 3])
    y = b.node("Div", [x, b.const("d", b.random((C, 1)) + 3)], "y")
    b.node("Div", [b.const("n", np.ones((1,), np.float32)), y], "z")  # constant / x: kept
    b.output("z")
    after = rewrite(make_model(b.graph()), "div_to_mul")
    assert op_counts(after) == {"Div": 1, "Mul": 1}
    mul = next(n for n in after.graph if n.op_type == "Mul")
    assert mul.outputs[0].name == "y"


@pytest.mark.parametrize("divisor", [0.0, np.inf], ids=["zero", "inf"])
def test_div_by_zero_or_infinity_is_kept(divisor):
    b = GraphBuilder()
    x = b.input("x", [C])
    b.node("Div", [x, b.const("d", np.array([1, 2, divisor, 4], np.float32))], "y")
    b.output("y")
    after = to_ir(make_model(b.graph()))
    build_pipeline(["div_to_mul"])(after)
    assert op_counts(after) == {"Div": 1}


# ------------------------------------------------------------------ fuse_hardswish


@pytest.mark.parametrize("opset, expected", [(14, {"HardSwish": 1}), (13, {"HardSigmoid": 1, "Mul": 1})])
@pytest.mark.parametrize("divide, swap", [(True, False), (False, True)], ids=["div6", "mul_sixth_swapped"])
def test_written_hardswish_becomes_one_op(opset, expected, divide, swap):
    b = GraphBuilder()
    x = b.input("x", [1, C, 5, 5])
    _written_hardswish(b, x, "hs", divide=divide, swap=swap)
    b.output("hs_out")
    after = rewrite(make_model(b.graph(), opset=opset), "fuse_hardswish")
    assert op_counts(after) == expected
    assert after.graph.outputs[0].name == "hs_out"
    if opset < 14:
        sigmoid = next(n for n in after.graph if n.op_type == "HardSigmoid")
        assert sigmoid.attributes["alpha"].value == pytest.approx(1 / 6) and sigmoid.attributes["beta"].value == 0.5


def test_written_hardsigmoid_becomes_hardsigmoid():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5])
    _written_hardsigmoid(b, x, "hsig")
    b.output("hsig_out")
    after = rewrite(make_model(b.graph()), "fuse_hardswish")
    assert op_counts(after) == {"HardSigmoid": 1}


@pytest.mark.parametrize("case", ["bound_five", "shift_two", "clip_read_twice", "product_of_other"])
def test_near_misses_are_left(case, caplog):
    b = GraphBuilder()
    x = b.input("x", [1, C, 5])
    other = b.input("w", [1, C, 5])
    shifted = b.node("Add", [x, b.const("k", np.array(2 if case == "shift_two" else 3, np.float32))], "shifted")
    clipped = b.node("Clip", [shifted, b.const("lo", np.array(0, np.float32)),
                              b.const("hi", np.array(5 if case == "bound_five" else 6, np.float32))], "clipped")
    product = b.node("Mul", [other if case == "product_of_other" else x, clipped], "product")
    b.node("Div", [product, b.const("six", np.array(6, np.float32))], "y")
    b.output("y")
    if case == "clip_read_twice":
        b.output("clipped")
    after = to_ir(make_model(b.graph()))
    with caplog.at_level("DEBUG", logger="zenith_onnx.passes.rewrite_activations"):
        build_pipeline(["fuse_hardswish"])(after)
    assert "Clip" in op_counts(after)
    assert "is not a hard activation" in caplog.text


# ------------------------------------------------------------------ expand_hard_activations


def test_hardswish_and_hardsigmoid_are_written_with_add_clip_mul():
    b = GraphBuilder()
    x = b.input("x", [1, C, 5])
    y = b.node("HardSwish", [x], "y")
    b.node("HardSigmoid", [y], "z", alpha=0.25, beta=0.4)
    b.output("z")
    after = rewrite(make_model(b.graph()), "expand_hard_activations")
    assert op_counts(after) == {"Add": 2, "Clip": 2, "Mul": 3}
    clip_highs = sorted(float(n.inputs[2].const_value.numpy()) for n in after.graph if n.op_type == "Clip")
    assert clip_highs == [4.0, 6.0]  # 1/alpha


def test_negative_alpha_hardsigmoid_is_kept():
    b = GraphBuilder()
    x = b.input("x", [C])
    b.node("HardSigmoid", [x], "y", alpha=-0.2)
    b.output("y")
    after = rewrite(make_model(b.graph()), "expand_hard_activations")
    assert op_counts(after) == {"HardSigmoid": 1}


# ------------------------------------------------------------------ fold_scale_into_conv


def test_scalar_mul_moves_into_the_conv_weights_directly_and_through_a_product():
    b = GraphBuilder()
    x = b.input("x", [1, C, 6, 6])
    gate = b.input("g", [1, C, 1, 1])
    scaled = b.node("Mul", [x, b.const("sixth", np.array(1 / 6, np.float32))], "scaled")
    y = b.conv(scaled, C, C, "conv1", pads=[1, 1, 1, 1])
    y = b.conv(y, C, C, "conv2", pads=[1, 1, 1, 1])  # a second reader of nothing scaled
    scaled2 = b.node("Mul", [b.const("half", np.array(0.5, np.float32)), y], "scaled2")
    gated = b.node("Mul", [scaled2, gate], "gated")
    b.conv(gated, C, C, "conv3", group=C)
    b.node("Add", [b.conv(gated, C, C, "conv4", kernel=(1, 1)), b.const("zero", np.zeros(1, np.float32))], "unused")
    b.output("conv3_out")
    b.output("unused")
    after = rewrite(make_model(b.graph()), "fold_scale_into_conv")
    assert op_counts(after)["Mul"] == 1  # only the gate product is left
    weights = {n.name: n.inputs[1].const_value.numpy() for n in after.graph if n.op_type == "Conv"}
    proto = make_model(b.graph())
    original = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_allclose(weights["conv1"], original["conv1.w"] / 6, rtol=1e-6)
    np.testing.assert_allclose(weights["conv3"], original["conv3.w"] / 2, rtol=1e-6)
    np.testing.assert_allclose(weights["conv4"], original["conv4.w"] / 2, rtol=1e-6)
    np.testing.assert_array_equal(weights["conv2"], original["conv2.w"])


@pytest.mark.parametrize("reader", ["add", "graph_output"])
def test_scalar_mul_read_by_anything_but_convs_is_kept(reader):
    b = GraphBuilder()
    x = b.input("x", [1, C, 4, 4])
    scaled = b.node("Mul", [x, b.const("k", np.array(2.0, np.float32))], "scaled")
    b.conv(scaled, C, C, "conv", kernel=(1, 1))
    b.output("conv_out")
    if reader == "add":
        b.node("Add", [scaled, x], "sum")
        b.output("sum")
    else:
        b.output("scaled")
    after = rewrite(make_model(b.graph()), "fold_scale_into_conv")
    assert op_counts(after)["Mul"] == 1


# ------------------------------------------------------------------ fuse_layernorm


def _written_layernorm(b: GraphBuilder, x: str, *, affine: bool, square: str = "Pow", axis: int = -1) -> str:
    mean = b.node("ReduceMean", [x], "mean", axes=[axis])
    d = b.node("Sub", [x, mean], "centred")
    sq = b.node("Pow", [d, b.const("two", np.array(2, np.float32))], "sq") if square == "Pow" else b.node("Mul", [d, d], "sq")
    var = b.node("ReduceMean", [sq], "var", axes=[axis])
    std = b.node("Sqrt", [b.node("Add", [var, b.const("eps", np.array(1e-5, np.float32))], "var_eps")], "std")
    y = b.node("Div", [d, std], "normed")
    if affine:
        gamma = b.node("Reshape", [b.const("gamma", b.random((8,)) + 1), b.const("shape", np.array([1, 1, 8]))], "gamma3")
        y = b.node("Mul", [y, gamma], "scaled")
        y = b.node("Add", [y, b.const("beta", b.random((8,)))], "shifted")
    return y


@pytest.mark.parametrize("affine, square", [(True, "Pow"), (False, "Mul")])
def test_written_layernorm_becomes_layernormalization(affine, square):
    b = GraphBuilder()
    x = b.input("x", [2, 5, 8])
    out = _written_layernorm(b, x, affine=affine, square=square)
    b.node("Relu", [out], "y")
    b.output("y")
    after = rewrite(make_model(b.graph(), opset=17), "fuse_layernorm")
    assert op_counts(after) == {"LayerNormalization": 1, "Relu": 1}
    ln = next(n for n in after.graph if n.op_type == "LayerNormalization")
    assert ln.attributes["epsilon"].value == pytest.approx(1e-5) and len(ln.inputs) == (3 if affine else 2)


@pytest.mark.parametrize("case", ["opset16", "middle_axis", "mean_read_twice"])
def test_layernorm_near_misses_are_left(case):
    b = GraphBuilder()
    x = b.input("x", [2, 5, 8])
    out = _written_layernorm(b, x, affine=True, axis=1 if case == "middle_axis" else -1)
    b.output(out)
    if case == "mean_read_twice":
        b.output("mean")
    proto = make_model(b.graph(), opset=16 if case == "opset16" else 17)
    after = to_ir(proto)
    fuse = build_pipeline(["fuse_layernorm"])
    fuse(after)
    assert "LayerNormalization" not in op_counts(after)
    assert fuse.passes[0].needs_opset == (1 if case == "opset16" else 0)  # found, waits for opset 17


# ------------------------------------------------------------------ what onnxruntime fuses after them



def _mobilenet_block(opset: int, hard_ops: bool) -> onnx.ModelProto:
    """Conv -> hard-swish -> depthwise Conv -> hard-swish -> SE (GAP, Conv, Relu, Conv,
    hard-sigmoid, Mul) -> Conv, as in MobileNetV3 / PP-LCNet."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, C, 8, 8])
    # c0 (36 products per output) is no stem that insert_qdq keeps float for speed
    y = b.conv(b.conv(x, C, C, "c0", pads=[1, 1, 1, 1]), C, 8, "c1", kernel=(1, 1))
    y = b.node("HardSwish", [y], "a1") if hard_ops else _written_hardswish(b, y, "a1")
    y = b.conv(y, 8, 8, "dw", group=8, pads=[1, 1, 1, 1])
    y = b.node("HardSwish", [y], "a2") if hard_ops else _written_hardswish(b, y, "a2")
    s = b.node("GlobalAveragePool", [y], "gap")
    s = b.node("Relu", [b.conv(s, 8, 2, "se1", kernel=(1, 1))], "se_relu")
    s = b.conv(s, 2, 8, "se2", kernel=(1, 1))
    s = b.node("HardSigmoid", [s], "gate", alpha=1 / 6, beta=0.5) if hard_ops else _written_hardsigmoid(b, s, "gate")
    y = b.node("Mul", [y, s], "se_out")
    b.conv(y, 8, C, "c2", kernel=(1, 1))
    b.output("c2_out")
    return make_model(b.graph(), opset=opset)


@pytest.mark.parametrize("opset, hard_ops", [(12, False), (15, True)], ids=["written_out", "hardswish_ops"])
def test_prepared_models_quantize_into_integer_kernels_only(opset, hard_ops):
    proto = _mobilenet_block(opset, hard_ops)
    data = feeds(proto, scale=1.0, count=8)
    plain = quantize(to_ir(proto), data, report_samples=0, rewrite=False)
    prepared_model = rewrite(proto, *QUANTIZE_PREPARE)
    prepared = quantize(prepared_model, data, report_samples=0)
    plain_fed = plain.report["fusion"]["float_ops_fed_by_dq"]
    assert plain_fed and set(plain_fed) <= {"Div", "HardSigmoid", "Mul"}
    counts = fused_counts(prepared.model)
    assert counts["float_ops_fed_by_dq"] == {}  # everything between Q and DQ runs on integers
    # the "+ 3" of the gate went into se2's bias; the 1/6 of a1 and of the gate went into dw
    # and c2; a2's stays a QLinearMul (a GlobalAveragePool reads it too).
    assert counts["QLinearConv"] == 6 and counts["QLinearAdd"] == 2 and counts["QLinearMul"] == 4
    assert "Div" not in counts and "HardSigmoid" not in counts
