"""insert_qdq and the quantize pipeline: placement, dtypes, axes, int32 bias, numbers, fusion."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import kernels, runtime, synthetic
from zenith_onnx.errors import UsageError
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.quantize import quantize
from zenith_onnx.testing import sqnr_db


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _samples(proto: onnx.ModelProto, n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    stacked = synthetic.calibration_samples(proto, n, seed)
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def _cli(*args) -> subprocess.CompletedProcess:
    """Run ``python -m zenith_onnx ARGS`` (paths may be Path objects)."""
    return subprocess.run([sys.executable, "-m", "zenith_onnx", *map(str, args)], capture_output=True, text=True)


def _nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op]


def _const(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy()


def _gemm_model(w: np.ndarray, b: np.ndarray, relu: bool = False, trans_b: int = 1) -> onnx.ModelProto:
    """y = x @ W^T + B (transB=1, W is (out, in)) or x @ W + B (transB=0, W is (in, out))."""
    n_out, n_in = w.shape if trans_b else w.shape[::-1]
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["g"], name="gemm", transB=trans_b)]
    if relu:
        nodes.append(helper.make_node("Relu", ["g"], ["y"], name="relu"))
    else:
        nodes[0].output[0] = "y"
    graph = helper.make_graph(
        nodes, "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


# ------------------------------------------------------------------ structure


def test_conv_weights_stored_int8_per_channel_bias_int32():
    proto = synthetic.conv_bn_relu_cnn()
    result = quantize(_ir(proto), _samples(proto), check_fusion=False, report_samples=0)
    model = result.model
    convs = _nodes(model, "Conv")
    assert len(convs) == 8
    stem, convs = convs[0], convs[1:]
    # the 3-channel stem reads the raw input: float is faster there, and its output is quantized
    assert stem.inputs[0].is_graph_input() and stem.inputs[1].is_initializer()
    assert stem.inputs[1].dtype == ir.DataType.FLOAT
    assert [c.op_type for c in stem.outputs[0].consumers()] == ["QuantizeLinear"]
    assert any(x["node"] == stem.name and "faster" in x["reason"] for x in result.report["left_float"])
    for conv in convs:
        w_dq = conv.inputs[1].producer()
        assert w_dq.op_type == "DequantizeLinear"
        w_q = w_dq.inputs[0]
        assert w_q.is_initializer() and w_q.dtype == ir.DataType.INT8  # no float weight + Q
        out_channels = w_q.shape[0]
        assert _const(w_dq.inputs[1]).shape == (out_channels,)  # per channel
        assert w_dq.attributes["axis"].as_int() == 0
        assert np.all(_const(w_dq.inputs[2]) == 0)  # symmetric
        assert np.abs(_const(w_q)).max() <= 127  # narrow range
        x_dq = conv.inputs[0].producer()
        assert x_dq.op_type == "DequantizeLinear" and x_dq.inputs[0].dtype == ir.DataType.UINT8
        b_dq = conv.inputs[2].producer()
        assert b_dq.op_type == "DequantizeLinear" and b_dq.inputs[0].dtype == ir.DataType.INT32
        expected = np.float32(_const(x_dq.inputs[1])) * _const(w_dq.inputs[1])
        np.testing.assert_allclose(_const(b_dq.inputs[1]), expected, rtol=1e-6)
    assert not _nodes(model, "Relu"), "Relu after a quantized Conv is absorbed by the Q (zero point 0)"
    assert not _nodes(model, "BatchNormalization")
    for q in _nodes(model, "QuantizeLinear"):
        assert q.inputs[2].dtype == ir.DataType.UINT8
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_gemm_axis_follows_transB_and_matmul_uses_last_axis():
    proto = synthetic.transformer_block()
    model = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    weight_dqs = [n.inputs[1].producer() for n in _nodes(model, "MatMul") if n.inputs[1].producer().inputs[0].is_initializer()]
    assert len(weight_dqs) == 6
    for dq in weight_dqs:
        assert dq.attributes["axis"].as_int() == 1
        assert _const(dq.inputs[1]).shape == (dq.inputs[0].shape[1],)

    w = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    for trans_b, weight in ((1, w), (0, w.T.copy())):
        p = _gemm_model(weight, np.zeros(5, np.float32), trans_b=trans_b)
        q = quantize(_ir(p), _samples(p, 2), check_fusion=False, report_samples=0).model
        dq = _nodes(q, "Gemm")[0].inputs[1].producer()
        assert dq.attributes["axis"].as_int() == (0 if trans_b else 1)
        assert _const(dq.inputs[1]).shape == (5,)


def test_bias_overflow_raises_weight_scale():
    w = np.full((3, 4), 1e-7, np.float32)
    b = np.array([5.0, -5.0, 0.5], np.float32)
    proto = _gemm_model(w, b)
    samples = [{"x": np.full((1, 4), v, np.float32)} for v in (-1e-3, 1e-3)]
    model = quantize(_ir(proto), samples, check_fusion=False, report_samples=0).model
    gemm = _nodes(model, "Gemm")[0]
    b_int = _const(gemm.inputs[2].producer().inputs[0])
    assert b_int.dtype == np.int32
    assert np.abs(b_int.astype(np.int64)).max() < 2**31 - 1
    x = {"x": np.full((1, 4), 1e-3, np.float32)}
    ref = runtime.run(runtime.session(proto.SerializeToString()), x)["y"]
    got = runtime.run(runtime.session(model), x)["y"]
    out_step = float(_const(_nodes(model, "QuantizeLinear")[-1].inputs[1]))
    assert np.max(np.abs(ref - got)) <= out_step  # bias survived: 5.0 is not lost to overflow


def test_shared_tensor_gets_one_q_and_one_dq_per_consumer():
    proto = synthetic.residual_cnn()
    model = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    add = _nodes(model, "Add")[0]
    skip_dq = add.inputs[0].producer()
    q_out = skip_dq.inputs[0]
    consumers = q_out.consumers()
    assert len(consumers) == 2 and all(c.op_type == "DequantizeLinear" for c in consumers)
    assert len({id(c.outputs[0].consumers()[0]) for c in consumers}) == 2  # one DQ per consumer


def test_shape_ops_share_the_input_scale():
    proto = synthetic.transformer_block()
    model = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    for reshape in _nodes(model, "Reshape"):
        dq_in = reshape.inputs[0].producer()
        q_out = next(c for c in reshape.outputs[0].consumers() if c.op_type == "QuantizeLinear")
        assert dq_in.op_type == "DequantizeLinear"
        assert _const(dq_in.inputs[1]) == _const(q_out.inputs[1])
        assert _const(dq_in.inputs[2]) == _const(q_out.inputs[2])


def test_convtranspose_stays_float_with_reason():
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="up", strides=[2, 2])],
        "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    result = quantize(_ir(proto), _samples(proto, 2), check_fusion=False, report_samples=0)
    assert not _nodes(result.model, "QuantizeLinear")
    reasons = {x["node"]: x["reason"] for x in result.report["left_float"]}
    assert "fused" in reasons["up"]


def test_exclude_by_name_and_type_and_unknown_name():
    proto = synthetic.residual_cnn()
    second_conv = [n.name for n in proto.graph.node if n.op_type == "Conv"][1]
    result = quantize(_ir(proto), _samples(proto, 2), config=QuantConfig(exclude=(second_conv, "Add")),
                      check_fusion=False, report_samples=0)
    assert result.report["quantized_ops"]["Conv"] == 6  # 8 - the excluded one - the float stem
    assert "Add" not in result.report["quantized_ops"]
    with pytest.raises(UsageError, match="no node or op type"):
        quantize(_ir(proto), _samples(proto, 2), config=QuantConfig(exclude=("no_such_node",)))


# ------------------------------------------------------------------ numbers


def test_gemm_output_within_one_step_of_numpy_simulation():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    proto = _gemm_model(w, b, relu=True)
    samples = [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(8)]
    model = quantize(_ir(proto), samples, check_fusion=False, report_samples=0).model
    sess = runtime.session(model)
    gemm = _nodes(model, "Gemm")[0]
    x_dq, w_dq = gemm.inputs[0].producer(), gemm.inputs[1].producer()
    s_x, zp_x = _const(x_dq.inputs[1]), _const(x_dq.inputs[2])
    s_w = _const(w_dq.inputs[1])
    q_out = _nodes(model, "QuantizeLinear")[-1]
    s_y, zp_y = float(_const(q_out.inputs[1])), int(_const(q_out.inputs[2]))
    assert zp_y == 0  # the Relu went into the uint8 zero point
    u8 = kernels.int_range(8, signed=False)
    for feed in samples:
        x_fq = kernels.fake_quantize(feed["x"], s_x, zp_x, u8)
        w_fq = kernels.fake_quantize(w, s_w, 0, kernels.int_range(8, True, narrow=True), axis=0)
        b_fq = np.rint(b / (s_x * s_w)) * (s_x * s_w)
        y = np.maximum(x_fq.astype(np.float64) @ w_fq.T.astype(np.float64) + b_fq, 0)
        expected = kernels.fake_quantize(y.astype(np.float32), s_y, 0, u8)
        got = runtime.run(sess, feed)["y"]
        assert np.max(np.abs(got - expected)) <= s_y + 1e-6


@pytest.mark.parametrize("name", ["cnn8", "cnn8_res", "mobilenet_v2", "transformer"])
def test_sqnr_of_synthetic_models(name):
    proto = synthetic.SYNTHETIC_MODELS[name]()
    result = quantize(_ir(proto), _samples(proto, 8), check_fusion=False, report_samples=4)
    acc = result.report["accuracy"]
    assert acc["samples"] == 4
    assert acc["sqnr_db"] > 25.0, acc
    assert acc["worst_layers"] and acc["worst_layers"][0]["sqnr_db"] <= acc["sqnr_db"] + 30


def test_sqnr_at_least_onnxruntime_quantizer():
    """Same model, same calibration samples, MinMax both: ours (defaults) >= onnxruntime (defaults)."""
    ort_quant = pytest.importorskip("onnxruntime.quantization")
    import tempfile
    from pathlib import Path

    proto = synthetic.residual_cnn()
    samples = _samples(proto, 8)
    test = _samples(proto, 32, seed=7)  # enough samples that 0.5 dB is not noise
    ours = quantize(_ir(proto), samples, check_fusion=False, report_samples=0).model

    class Reader(ort_quant.CalibrationDataReader):
        def __init__(self):
            self.it = iter(samples)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (str(Path(tmp) / n) for n in ("f.onnx", "p.onnx", "q.onnx"))
        onnx.save(proto, src)
        ort_quant.quant_pre_process(src, pre)
        ort_quant.quantize_static(pre, out, Reader(), quant_format=ort_quant.QuantFormat.QDQ)
        theirs = onnx.load(out).SerializeToString()
    ref_s, ours_s, theirs_s = (runtime.session(m) for m in (proto.SerializeToString(), ours, theirs))
    ref = [runtime.run(ref_s, f)["output"] for f in test]
    ours_sqnr = sqnr_db(ref, [runtime.run(ours_s, f)["output"] for f in test])
    theirs_sqnr = sqnr_db(ref, [runtime.run(theirs_s, f)["output"] for f in test])
    assert ours_sqnr >= theirs_sqnr, (ours_sqnr, theirs_sqnr)


# ------------------------------------------------------------------ fusion


def _fused(model: ir.Model) -> dict:
    from zenith_onnx.fusion import fusion_report

    return fusion_report(model).to_dict()


def test_residual_cnn_fully_fused():
    proto = synthetic.residual_cnn()
    model = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    fusion = _fused(model)
    ops = fusion["integer_ops"]
    assert ops.get("QLinearConv", 0) == 7  # + the float stem Conv, by choice
    assert ops.get("com.microsoft::QLinearAdd", 0) == 2
    assert ops.get("com.microsoft::QGemm", 0) == 1
    leftovers = fusion["float_ops_fed_by_dq"]
    for op in ("Conv", "Add", "Gemm", "MatMul"):
        assert op not in leftovers, leftovers


def test_transformer_matmuls_and_adds_fused():
    proto = synthetic.transformer_block()
    model = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    ops = _fused(model)["integer_ops"]
    assert ops.get("QLinearMatMul", 0) == 8
    assert ops.get("com.microsoft::QLinearAdd", 0) == 8
    assert ops.get("com.microsoft::QLinearSoftmax", 0) == 1


def test_a_softmax_writing_a_model_output_stays_float():
    """Gemm -> Softmax -> output: the Softmax runs in float on the dequantized logits (exact,
    faster than QLinearSoftmax + DQ); the Gemm stays an integer kernel."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((10, 16)).astype(np.float32)
    proto = _gemm_model(w, np.zeros(10, np.float32))
    graph = proto.graph
    graph.node[0].output[0] = "logits"
    graph.node.append(helper.make_node("Softmax", ["logits"], ["y"], name="softmax", axis=-1))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    data = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    result = quantize(_ir(proto), data, report_samples=4)
    assert [(f["op"], "writes a model output" in f["reason"]) for f in result.report["left_float"]] == [("Softmax", True)]
    softmax = _nodes(result.model, "Softmax")[0]
    assert softmax.outputs[0].is_graph_output() and softmax.inputs[0].producer().op_type == "DequantizeLinear"
    fusion = result.report["fusion"]
    assert fusion["integer_ops"].get("com.microsoft::QGemm") == 1 and "com.microsoft::QLinearSoftmax" not in fusion["integer_ops"]
    assert result.report["accuracy"]["sqnr_db"] > 30


def test_light_early_layers_after_a_float_stem_stay_float():
    """MobileNetV2's first block (depthwise 16 ch, pointwise 16 -> 16, residual Add) reads only
    the float stem: it stays float with no Q/DQ inside; the 16 -> 64 expansion after it is
    quantized and the rest of the net fuses as before."""
    proto = synthetic.mobilenet_v2()
    result = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0)
    early = [f for f in result.report["left_float"] if "reads only float layers" in f["reason"]]
    assert [f["op"] for f in early] == ["Conv", "Conv", "Add"]
    assert "16 multiply-adds" in early[1]["reason"]
    model = result.model
    convs = _nodes(model, "Conv")
    stem, dw, pw, expand = convs[:4]
    for conv in (stem, dw, pw):
        assert conv.inputs[1].dtype == ir.DataType.FLOAT
        assert conv.inputs[0].producer() is None or conv.inputs[0].producer().op_type != "DequantizeLinear"
    add = _nodes(model, "Add")[0]
    assert add.outputs[0].consumers()[0].op_type == "QuantizeLinear"  # first quantized tensor
    assert expand.inputs[1].producer().op_type == "DequantizeLinear"  # int8 weight
    fused = _fused(model)
    assert fused["integer_ops"].get("QLinearConv", 0) == 16
    assert fused["integer_ops"].get("com.microsoft::QLinearAdd", 0) == 2
    assert not fused["float_ops_fed_by_dq"]


def test_a_depthwise_conv_after_quantized_layers_is_quantized():
    """The float region grows only from a float stem: a heavy stem (8 input channels) is
    quantized, and so is the light depthwise Conv after it."""
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "w")
    dw = numpy_helper.from_array((rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32), "dw")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="stem", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "dw"], ["y"], name="dw", pads=[1, 1, 1, 1], group=16)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])], [w, dw])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    result = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0)
    assert result.report["left_float"] == []
    assert result.report["quantized_ops"]["Conv"] == 2


# ------------------------------------------------------------------ already quantized input


def test_quantized_model_is_not_quantized_twice():
    proto = synthetic.residual_cnn()
    once = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0).model
    twice = quantize(once, None, check_fusion=False, report_samples=0).model
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv", "Add"):
        assert len(_nodes(twice, op)) == len(_nodes(once, op)), op
    scales_once = sorted(float(_const(q.inputs[1])) for q in _nodes(once, "QuantizeLinear"))
    scales_twice = sorted(float(_const(q.inputs[1])) for q in _nodes(twice, "QuantizeLinear"))
    assert scales_once == scales_twice
    feed = _samples(proto, 1, seed=5)[0]
    a = runtime.run(runtime.session(once), feed)["output"]
    b = runtime.run(runtime.session(twice), feed)["output"]
    np.testing.assert_array_equal(a, b)


def test_no_data_and_no_ranges_is_a_usage_error():
    proto = synthetic.conv_bn_relu_cnn()
    with pytest.raises(UsageError, match="no calibration data"):
        quantize(_ir(proto), None)


# ------------------------------------------------------------------ CLI


def test_cli_quantize_end_to_end(tmp_path):
    proto = synthetic.residual_cnn()
    src = tmp_path / "model.onnx"
    onnx.save(proto, src)
    before = src.read_bytes()
    np.savez(tmp_path / "calib.npz", **synthetic.calibration_samples(proto, 8))
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    proc = _cli("quantize", src, "-o", out, "--data", tmp_path / "calib.npz", "--report", report)
    assert proc.returncode == 0, proc.stderr
    assert "QLinearConv 7" in proc.stdout and "SQNR" in proc.stdout
    assert src.read_bytes() == before
    import json

    data = json.loads(report.read_text())
    assert data["accuracy"]["sqnr_db"] > 25
    assert data["fusion"]["integer_ops"]["QLinearConv"] == 7
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_insert_qdq_cannot_run_from_optimize_without_ranges(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(synthetic.conv_bn_relu_cnn(), src)
    proc = _cli("optimize", src, "-o", tmp_path / "o.onnx", "--passes", "insert_qdq")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "zenith-onnx quantize" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_quantize_model_with_external_data(tmp_path):
    proto = synthetic.residual_cnn()
    src = tmp_path / "res.onnx"
    stored = onnx.ModelProto()
    stored.CopyFrom(proto)  # onnx.save rewrites the proto it saves to point at the data file
    onnx.save(stored, src, save_as_external_data=True, location="res.weights", size_threshold=0)
    np.savez(tmp_path / "calib.npz", **synthetic.calibration_samples(proto, 4))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    proc = _cli("quantize", src, "-o", out, "--data", tmp_path / "calib.npz")
    assert proc.returncode == 0, proc.stderr
    assert "QLinearConv 7" in proc.stdout
    feed = _samples(proto, 1, seed=3)[0]
    ref = runtime.run(runtime.session(proto.SerializeToString()), feed)["output"]
    got = runtime.run(runtime.session(str(out)), feed)["output"]
    assert sqnr_db(ref, got) > 25


@pytest.mark.parametrize("opset", [11, 12, 13, 17, 21])
def test_opsets_11_to_21_and_opset_raised_only_when_needed(opset):
    proto = synthetic.residual_cnn()
    proto.opset_import[0].version = opset  # every op of this model has the same signature in 11-21
    onnx.checker.check_model(proto)
    result = quantize(_ir(proto), _samples(proto, 4), report_samples=2)
    notes = " ".join(result.report["notes"])
    if opset < 13:
        assert f"raised the opset from {opset} to 13" in notes
        assert result.model.opset_imports[""] == 13
    else:
        assert "raised the opset" not in notes
        assert result.model.opset_imports[""] == opset
    assert result.report["fusion"]["integer_ops"]["QLinearConv"] == 7
    assert result.report["accuracy"]["sqnr_db"] > 30


def test_per_tensor_at_opset_11_keeps_the_opset():
    proto = synthetic.conv_bn_relu_cnn()
    proto.opset_import[0].version = 11
    result = quantize(_ir(proto), _samples(proto, 2), config=QuantConfig(per_channel=False), report_samples=0)
    assert result.model.opset_imports[""] == 11
    assert not result.report["notes"]
    for dq in _nodes(result.model, "DequantizeLinear"):
        assert "axis" not in dq.attributes and _const(dq.inputs[1]).ndim == 0 or dq.inputs[0].dtype == ir.DataType.INT32


def test_16_bit_activations_raise_opset_21_and_use_uint16():
    proto = synthetic.residual_cnn()
    result = quantize(_ir(proto), _samples(proto, 4), config=QuantConfig(activation_bits=16), report_samples=2)
    assert result.model.opset_imports[""] == 21
    assert "16-bit activations need QuantizeLinear-21" in " ".join(result.report["notes"])
    qs = _nodes(result.model, "QuantizeLinear")
    assert qs and all(q.inputs[2].dtype == ir.DataType.UINT16 for q in qs)
    eight = quantize(_ir(proto), _samples(proto, 4), report_samples=2)
    assert result.report["accuracy"]["sqnr_db"] >= eight.report["accuracy"]["sqnr_db"]


def test_cli_calibrate_then_quantize_with_ranges(tmp_path):
    proto = synthetic.residual_cnn()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "calib.npz", **synthetic.calibration_samples(proto, 4))
    # minmax: exact extremes, the same on the raw model (calibrate) and on the folded one
    # (quantize), which differ by the rounding of the folded weights
    proc = _cli("calibrate", src, "--data", tmp_path / "calib.npz", "-o", tmp_path / "r.json", "--method", "minmax")
    assert proc.returncode == 0, proc.stderr
    proc = _cli("quantize", src, "-o", tmp_path / "q.onnx", "--ranges", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "QLinearConv 7" in proc.stdout
    direct = quantize(_ir(proto), _samples(proto, 4), check_fusion=False, report_samples=0,
                      config=QuantConfig(method="minmax")).model
    via_ranges = ir.load(tmp_path / "q.onnx")
    s1 = sorted(float(_const(q.inputs[1])) for q in _nodes(direct, "QuantizeLinear"))
    s2 = sorted(float(_const(q.inputs[1])) for q in _nodes(via_ranges, "QuantizeLinear"))
    np.testing.assert_allclose(s1, s2, rtol=1e-6)  # same ranges -> same scales


@pytest.mark.parametrize("bad, message", [
    ({"input": (-1.0, 1e300)}, "float32"),
    ({"input": (float("nan"), 1.0)}, "input"),
    ({"input": (2.0, 1.0)}, "min 2.0 > max 1.0"),
    ({"input": {"min": 0.0}}, "must be"),
])
def test_ranges_given_as_a_mapping_are_validated(bad, message):
    from zenith_onnx.errors import DataError

    proto = synthetic.conv_bn_relu_cnn()
    with pytest.raises(DataError, match=message):
        quantize(_ir(proto), None, ranges=bad, check_fusion=False, report_samples=0)


def test_several_inputs_and_outputs_and_ops_without_integer_kernels():
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), f"w{len(s)}_{rng.integers(1e9)}")
    wa, wb = w(4, 8, 3, 3), w(4, 8, 3, 3)  # 8 input channels: not a stem that stays float
    nodes = [
        helper.make_node("Conv", ["a", wa.name], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", wb.name], ["cb"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ca", "cb"], ["sum"], name="add"),
        helper.make_node("Erf", ["sum"], ["erf"], name="erf"),  # no integer kernel: stays float
        helper.make_node("Mul", ["erf", "ca"], ["prod"], name="mul"),
        helper.make_node("Relu", ["cb"], ["side"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "two_in_two_out",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 8, 8, 8]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("prod", "side")],
        [wa, wb],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    samples = [{n: rng.standard_normal((1, 8, 8, 8)).astype(np.float32) for n in ("a", "b")} for _ in range(6)]
    result = quantize(_ir(proto), samples, report_samples=4)
    model = result.model
    assert [o.name for o in model.graph.outputs] == ["prod", "side"]
    assert [i.name for i in model.graph.inputs] == ["a", "b"]
    assert len(_nodes(model, "Erf")) == 1
    erf = _nodes(model, "Erf")[0]
    assert erf.inputs[0].producer().op_type == "DequantizeLinear"  # fed from the quantized Add
    assert result.report["quantized_ops"]["Add"] == 1 and result.report["quantized_ops"]["Mul"] == 1
    outputs = result.report["accuracy"]["outputs"]
    assert set(outputs) == {"prod", "side"} and all(o["sqnr_db"] > 25 for o in outputs.values())
    feed = {n: rng.standard_normal((3, 8, 8, 8)).astype(np.float32) for n in ("a", "b")}  # dynamic batch
    got = runtime.run(runtime.session(model), feed)
    assert got["prod"].shape == (3, 4, 8, 8) and got["side"].shape == (3, 4, 8, 8)


def test_cli_auto_fallback_keeps_costly_layers_float(tmp_path):
    import json

    proto = synthetic.mobilenet_v2()
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    np.savez(tmp_path / "calib.npz", **synthetic.calibration_samples(proto, 8))
    proc = _cli("quantize", src, "-o", tmp_path / "q.onnx", "--data", tmp_path / "calib.npz", "--auto-fallback",
               "--max-float-nodes", "4", "--fallback-goal-db", "60", "--report", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    fallback = json.loads((tmp_path / "r.json").read_text())["fallback"]
    assert 0 < len(fallback["kept_float"]) <= 4
    assert fallback["sqnr_db_after"] >= fallback["sqnr_db_before"]
    kept = set(fallback["kept_float"])
    assert {n.name for n in ir.load(tmp_path / "q.onnx").graph if n.name in kept}  # the nodes are still there, in float
    proc = _cli("quantize", src, "-o", tmp_path / "q2.onnx", "--ranges", tmp_path / "r.json", "--auto-fallback")
    assert proc.returncode == 2 and "needs --data" in proc.stderr
    assert not (tmp_path / "q2.onnx").exists()


def test_calibrate_and_quantize_share_the_default_method():
    """`zenith-onnx calibrate` then `quantize --ranges` calibrates as `quantize --data` does."""
    import inspect

    from zenith_onnx.calibration import calibrate, calibrate_file
    from zenith_onnx.cli import build_parser
    from zenith_onnx.qconfig import DEFAULT_METHOD

    parser = build_parser()
    assert parser.parse_args(["calibrate", "m.onnx", "--data", "d.npz", "-o", "r.json"]).method == DEFAULT_METHOD
    assert QuantConfig().method == DEFAULT_METHOD == "mse"
    for function in (calibrate, calibrate_file):
        assert inspect.signature(function).parameters["method"].default == DEFAULT_METHOD


@pytest.mark.parametrize("extra, method", [([], "mse"), (["--auto-fallback"], "minmax"),
                                           (["--method", "percentile"], "percentile"),
                                           (["--auto-fallback", "--method", "mse"], "mse")])
def test_quantize_cli_method_default_depends_on_the_fallback(tmp_path, monkeypatch, extra, method):
    """MSE for plain quantization, MinMax for the fallback search (qconfig says why); an
    explicit --method wins either way."""
    from zenith_onnx import cli, quantize as quantize_module

    seen = {}

    def fake_quantize_file(model, output, *, config, **kwargs):
        seen["method"] = config.method

    monkeypatch.setattr(quantize_module, "quantize_file", fake_quantize_file)
    assert cli.main(["quantize", "m.onnx", "-o", str(tmp_path / "q.onnx"), "--data", "d.npz", *extra]) == 0
    assert seen["method"] == method


def test_fallback_without_a_config_calibrates_with_minmax(monkeypatch):
    from zenith_onnx import quantize as quantize_module
    from zenith_onnx import sensitivity

    proto = synthetic.conv_bn_relu_cnn(blocks=2)
    methods = []
    real = quantize_module.quantize

    def spy(model, data=None, *, config=None, **kwargs):
        methods.append((config or QuantConfig()).method)
        return real(model, data, config=config, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize", spy)
    sensitivity.quantize_with_fallback(_ir(proto), _samples(proto, 2), max_float_nodes=2, latency_runs=0)
    assert methods and set(methods) == {"minmax"}
