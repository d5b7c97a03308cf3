"""zenith_onnx.fusion: what onnxruntime 1.32 fuses at ORT_ENABLE_EXTENDED, on hand-built QDQ
models, including its two known bugs (B1 fails to optimize, B2 drops a Relu)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import runtime
from zenith_onnx.errors import ModelError
from zenith_onnx.fusion import fused_counts, fusion_report

X_SCALE, Y_SCALE = 0.02, 0.05


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_conv(tail: str = "conv", opset: int = 17) -> onnx.ModelProto:
    """x -> Q(u8) -> DQ -> Conv(DQ(int8 per-channel W), DQ(int32 bias)) -> Q(u8) -> DQ [-> tail].

    ``tail``: "conv" (nothing after), "sigmoid" (a float Sigmoid reads the last DQ and
    is a graph output, so there is no Q to fuse with), "convtranspose" (the Conv is a
    ConvTranspose, which has no CPU QDQ rule)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(8, -1).max(axis=1) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    b_scale = (np.float32(X_SCALE) * w_scale).astype(np.float32)
    b_q = np.round(rng.standard_normal(8) / b_scale).astype(np.int32)
    axis = 0
    if tail == "convtranspose":
        w_q, axis = np.ascontiguousarray(w_q.transpose(1, 0, 2, 3)), 1
    inits = [
        _init("x_scale", np.float32(X_SCALE)), _init("x_zp", np.uint8(128)),
        _init("w_q", w_q), _init("w_scale", w_scale), _init("w_zp", np.zeros(8, np.int8)),
        _init("b_q", b_q), _init("b_scale", b_scale), _init("b_zp", np.zeros(8, np.int32)),
        _init("y_scale", np.float32(Y_SCALE)), _init("y_zp", np.uint8(128)),
    ]
    op = "ConvTranspose" if tail == "convtranspose" else "Conv"
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_in"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_in"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w", axis=axis),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b_dq"], name="dq_b", axis=0),
        helper.make_node(op, ["x_dq", "w_dq", "b_dq"], ["c"], name=op.lower(), pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zp"], ["c_q"], name="q_out"),
        helper.make_node("DequantizeLinear", ["c_q", "y_scale", "y_zp"], ["c_dq"], name="dq_out"),
    ]
    output = "c_dq"
    if tail == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["c_dq"], ["s"], name="sigmoid"))
        output = "s"
    graph = helper.make_graph(
        nodes, "qdq_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8 if opset < 21 else 10)


def reshape_gemm(opset: int, activation=np.int8) -> onnx.ModelProto:
    """x -> Q -> DQ -> Reshape -> Gemm(DQ(int8 W)): the layout of onnxruntime 1.32 bug B1
    (int8 activations + Reshape at opset >= 21 make ORT_ENABLE_EXTENDED fail)."""
    rng = np.random.default_rng(1)
    inits = [
        _init("s", np.float32(0.02)), _init("z", activation(0)), _init("shape", np.array([1, 48], np.int64)),
        _init("w_q", rng.integers(-127, 128, (48, 10)).astype(np.int8)), _init("w_s", np.float32(0.01)),
        _init("w_z", np.int8(0)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"], name="x_dq"),
        helper.make_node("Reshape", ["x_dq", "shape"], ["flat"], name="view"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="w_dq"),
        helper.make_node("Gemm", ["flat", "w"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "reshape_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def relu_q(zero_point_type: int, zero_point: int) -> onnx.ModelProto:
    """Relu -> Q -> DQ at opset 21: with a 4-bit Q, onnxruntime 1.32 drops the Relu (B2)."""
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("QuantizeLinear", ["r", "s", "z"], ["q"], name="q"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq"),
        ],
        "relu_q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_init("s", np.float32(0.05)), helper.make_tensor("z", zero_point_type, [], [zero_point])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def as_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _outputs(proto: onnx.ModelProto, level: str, x: np.ndarray) -> np.ndarray:
    return runtime.session(proto.SerializeToString(), level).run(None, {"x": x})[0]


def test_qdq_conv_fuses_into_one_qlinearconv():
    proto = qdq_conv()
    assert fused_counts(as_ir(proto)) == {
        "DequantizeLinear": 1,  # the output DQ (a graph output)
        "QLinearConv": 1,
        "QuantizeLinear": 1,  # the input Q
        "float_ops_fed_by_dq": {},
    }
    report = fusion_report(as_ir(proto))
    assert report.fully_fused and report.integer_ops == {"QLinearConv": 1} and report.float_ops == {}
    assert "no DequantizeLinear feeds a float op" in report.format()
    # The fused kernel computes what the QDQ graph means: within one output step.
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    fused, reference = _outputs(proto, "extended", x), _outputs(proto, "disable_all", x)
    assert np.max(np.abs(fused - reference)) <= Y_SCALE + 1e-6


def test_dq_feeding_an_unfused_sigmoid_is_listed():
    report = fusion_report(as_ir(qdq_conv("sigmoid")))
    assert report.integer_ops == {"QLinearConv": 1}
    assert report.float_ops == {"Sigmoid": 1}
    assert report.float_ops_fed_by_dq == {"Sigmoid": ["sigmoid"]}
    assert report.dq_feeding_float == 1
    assert not report.fully_fused
    assert "Sigmoid                    1  'sigmoid'" in report.format()
    assert fused_counts(as_ir(qdq_conv("sigmoid")))["float_ops_fed_by_dq"] == {"Sigmoid": 1}


def test_convtranspose_stays_float_fed_by_its_three_dqs():
    report = fusion_report(as_ir(qdq_conv("convtranspose")))
    assert report.integer_ops == {}
    assert report.float_ops == {"ConvTranspose": 1}
    assert report.float_ops_fed_by_dq == {"ConvTranspose": ["convtranspose"]}
    assert report.dq_feeding_float == 3  # input, weight and bias DequantizeLinear


def test_reshape_between_q_and_dq_runs_on_integers():
    # At opset 20 onnxruntime drops the Q/DQ around the Reshape and fuses the Gemm.
    report = fusion_report(as_ir(reshape_gemm(opset=20)))
    assert report.integer_ops == {"com.microsoft::QGemm": 1}
    assert report.integer_data_ops == {"Reshape": 1}
    assert report.float_ops == {} and report.fully_fused


def test_onnxruntime_failing_at_extended_is_one_clear_model_error():
    # B1: int8 activations + Reshape at opset 21. uint8 activations avoid it.
    with pytest.raises(ModelError) as info:
        fusion_report(as_ir(reshape_gemm(opset=21)))
    message = str(info.value)
    assert "\n" not in message
    assert "runs the model at ORT_DISABLE_ALL but fails to optimize it at ORT_ENABLE_EXTENDED" in message
    assert "output_dtype INT8 does not match y_zero_point type UINT8" in message  # onnxruntime's own words
    assert fusion_report(as_ir(reshape_gemm(opset=21, activation=np.uint8))).integer_ops == {"com.microsoft::QGemm": 1}


def test_model_onnxruntime_cannot_load_is_a_model_error():
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="my.ops")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)], ir_version=8)
    with pytest.raises(ModelError, match="onnxruntime cannot load the model"):
        fusion_report(as_ir(proto))


def test_relu_dropped_before_a_4bit_quantize_is_warned():
    x = np.linspace(-0.4, 0.4, 8, dtype=np.float32).reshape(1, 8)
    for zp_type, zp in ((TensorProto.UINT4, 8), (TensorProto.INT4, 0)):
        proto = relu_q(zp_type, zp)
        report = fusion_report(as_ir(proto))
        assert len(report.warnings) == 1 and "Relu 'relu'" in report.warnings[0]
        # The warning is true: negative inputs survive at EXTENDED only.
        assert _outputs(proto, "disable_all", x).min() >= 0 > _outputs(proto, "extended", x).min()
    assert fusion_report(as_ir(relu_q(TensorProto.UINT8, 0))).warnings == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zenith_onnx", *args], capture_output=True, text=True, timeout=120)


def test_inspect_fusion_command(tmp_path):
    path = tmp_path / "qdq.onnx"
    onnx.save(qdq_conv("sigmoid"), path)
    result = _cli("inspect", str(path), "--fusion")
    assert result.returncode == 0, result.stderr
    assert "QLinearConv" in result.stdout and "'sigmoid'" in result.stdout
    result = _cli("inspect", str(path), "--fusion", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["fusion"]["integer_ops"] == {"QLinearConv": 1}
    assert data["fusion"]["float_ops_fed_by_dq"] == {"Sigmoid": ["sigmoid"]}

    bad = tmp_path / "b1.onnx"
    onnx.save(reshape_gemm(opset=21), bad)
    before = bad.read_bytes()
    result = _cli("inspect", str(bad), "--fusion")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ORT_ENABLE_EXTENDED" in lines[0] and str(bad) in lines[0]
    assert bad.read_bytes() == before
