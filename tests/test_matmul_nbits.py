"""--weight-bits 4: one-row MatMuls become MatMulNBits; every other weight stays in an int8 container."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import runtime
from zenith_onnx.passes.matmul_nbits import BLOCK_SIZE, dequantize_blocks, quantize_blocks
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.quantize import quantize
from zenith_onnx.testing import sqnr_db


def _mlp(rows: int, k: int = 96, hidden: int = 128, seed: int = 0) -> onnx.ModelProto:
    """x[1, rows, k] -> MatMul -> Add(bias) -> Relu -> MatMul -> y[1, rows, k]."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array((rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array((rng.standard_normal((hidden, k)) / np.sqrt(hidden)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, rows, k])], [w1, b1, w2])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def _samples(proto: onnx.ModelProto, n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("k", [64, 100])  # 100: the last block is padded
def test_block_packing_round_trips(k):
    w = np.random.default_rng(k).standard_normal((k, 24)).astype(np.float32)
    packed, scale = quantize_blocks(w)
    blocks = -(-k // BLOCK_SIZE)
    assert packed.shape == (24, blocks, BLOCK_SIZE // 2) and packed.dtype == np.uint8
    assert scale.shape == (24 * blocks,)
    back = dequantize_blocks(packed, scale, k)
    assert back.shape == w.shape
    # symmetric 4-bit per block of 32: at most half a step off
    steps = np.repeat(scale.reshape(24, blocks), BLOCK_SIZE, axis=1)[:, :k].T
    assert np.all(np.abs(back - w) <= 0.5 * steps + 1e-6)


def test_one_row_matmuls_become_matmulnbits_and_match_numpy():
    proto = _mlp(rows=1)
    data = _samples(proto)
    result = quantize(ir.serde.deserialize_model(proto), data, config=QuantConfig(weight_bits=4), report_samples=4)
    model = result.model
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert [n.name for n in nbits] == ["fc1", "fc2"]
    assert all(n.domain == "com.microsoft" and n.attributes["bits"].value == 4 for n in nbits)
    assert not [n for n in model.graph if n.op_type == "MatMul"]
    assert result.report["quantized_ops"]["MatMulNBits"] == 2
    assert nbits[0].inputs[0].name == "x"  # reads the float input: no Q/DQ before it
    assert result.report["fusion"]["integer_ops"] == {"com.microsoft::MatMulNBits": 2}
    # the bias Add and the Relu between them read float and stay float: no Q/DQ anywhere
    assert not [n for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert {f["node"] for f in result.report["left_float"]} == {"bias1"}
    # numbers: a numpy model with the block-dequantized weights, float activations
    # (onnxruntime quantizes the activation to int8 per block: small extra error)
    w1 = numpy_helper.to_array(proto.graph.initializer[0])
    b1 = numpy_helper.to_array(proto.graph.initializer[1])
    w2 = numpy_helper.to_array(proto.graph.initializer[2])
    d1 = dequantize_blocks(*quantize_blocks(w1), w1.shape[0])
    d2 = dequantize_blocks(*quantize_blocks(w2), w2.shape[0])
    sess = runtime.session(model)
    for feed in data[:4]:
        got = sess.run(None, feed)[0]
        ref = np.maximum(feed["x"] @ d1 + b1, 0) @ d2
        assert sqnr_db([ref], [got]) > 25
    assert result.report["accuracy"]["sqnr_db"] > 15  # 4-bit weights vs the float model


def test_several_rows_keep_the_int8_container():
    proto = _mlp(rows=8)
    result = quantize(ir.serde.deserialize_model(proto), _samples(proto), config=QuantConfig(weight_bits=4), report_samples=0)
    model = result.model
    assert not [n for n in model.graph if n.op_type == "MatMulNBits"]
    weights = [n.inputs[0].const_value.numpy() for n in model.graph
               if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.numpy().dtype == np.int8]
    assert len(weights) == 2 and all(np.abs(w).max() <= 7 for w in weights)  # 4-bit values, int8 type


def test_8_bit_weights_never_use_matmulnbits():
    proto = _mlp(rows=1)
    result = quantize(ir.serde.deserialize_model(proto), _samples(proto), report_samples=0)
    assert not [n for n in result.model.graph if n.op_type == "MatMulNBits"]
    assert result.report["quantized_ops"]["MatMul"] == 2
