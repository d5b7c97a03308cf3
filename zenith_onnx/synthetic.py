"""Synthetic float models with BatchNorm, for tests, benchmarks and the README figures.

Each builder returns an ``onnx.ModelProto`` with seeded random weights and BatchNorm
statistics, exported the way PyTorch exports eval-mode models (BatchNormalization kept,
opset 17, ir_version 8):

- `conv_bn_relu_cnn`: 8 Conv-BN-ReLU blocks (32-64 channels) on 1x3x64x64, pooled to a Gemm head.
- `residual_cnn`: the same with two residual Adds.
- `mobilenet_v2`: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project,
  ReLU6 as Clip, residual Adds).
- `transformer_block`: pre-norm attention + MLP block (MatMul, Softmax, Add, LayerNormalization).
- `conv_chain`: ``n`` Conv-BN-ReLU blocks of few channels (graph-size scaling).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "conv_bn_relu_cnn",
    "residual_cnn",
    "mobilenet_v2",
    "transformer_block",
    "conv_chain",
    "SYNTHETIC_MODELS",
    "calibration_samples",
]

OPSET = 17
IR_VERSION = 8


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        array = np.asarray(array)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.const("w", w)]
        if bias:
            inputs.append(self.const("b", self.rng.standard_normal(cout).astype(np.float32) * 0.1))
        pad = k // 2
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            self.const("gamma", (1.0 + 0.2 * r.standard_normal(c)).astype(np.float32)),
            self.const("beta", (0.1 * r.standard_normal(c)).astype(np.float32)),
            self.const("mean", (0.1 * r.standard_normal(c)).astype(np.float32)),
            self.const("var", (1.0 + 0.3 * r.random(c)).astype(np.float32)),
        ]
        return self.op("BatchNormalization", [x, *params], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def relu6(self, x: str) -> str:
        return self.op("Clip", [x, self.const("zero", np.array(0, np.float32)), self.const("six", np.array(6, np.float32))])

    def head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        w = self.rng.standard_normal((classes, c)).astype(np.float32) / np.sqrt(c)
        b = self.rng.standard_normal(classes).astype(np.float32) * 0.1
        return self.op("Gemm", [flat, self.const("fc_w", w), self.const("fc_b", b)], transB=1)

    def model(self, name: str, x: str, shape: list, y: str, out_shape: list) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "output"
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="zenith-onnx-synthetic")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def _cbr(b: _Builder, x: str, cin: int, cout: int, stride: int = 1) -> str:
    return b.relu(b.bn(b.conv(x, cin, cout, 3, stride), cout))


def conv_bn_relu_cnn(seed: int = 0, blocks: int = 8) -> onnx.ModelProto:
    """8 Conv-BN-ReLU blocks, 32 then 64 channels, 1x3x64x64 input, 10 outputs."""
    b = _Builder(seed)
    x, c = "input", 3
    for i in range(blocks):
        cout = 32 if i < blocks // 2 else 64
        x = _cbr(b, x, c, cout, stride=2 if i in (2, blocks // 2 + 1) else 1)
        c = cout
    b.head(x, c)
    return b.model("conv_bn_relu_cnn", "input", [1, 3, 64, 64], "output", [1, 10])


def residual_cnn(seed: int = 0) -> onnx.ModelProto:
    """Like `conv_bn_relu_cnn` with two residual blocks (Conv-BN-ReLU-Conv-BN + skip, ReLU)."""
    b = _Builder(seed)
    x = _cbr(b, "input", 3, 32)
    x = _cbr(b, x, 32, 32, stride=2)
    for c, down in ((32, False), (64, True)):
        if down:
            x = _cbr(b, x, 32, 64, stride=2)
        y = _cbr(b, x, c, c)
        y = b.bn(b.conv(y, c, c), c)
        x = b.relu(b.op("Add", [x, y]))
    x = _cbr(b, x, 64, 64)
    b.head(x, 64)
    return b.model("residual_cnn", "input", [1, 3, 64, 64], "output", [1, 10])


def mobilenet_v2(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style: stem, inverted residual blocks with ReLU6, 1x3x64x64 input."""
    b = _Builder(seed)
    x = b.relu6(b.bn(b.conv("input", 3, 16, 3, 2), 16))
    c = 16
    # (expansion, out channels, stride)
    for t, cout, s in ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1), (4, 64, 1)):
        hidden = c * t
        y = x
        if t != 1:
            y = b.relu6(b.bn(b.conv(y, c, hidden, 1), hidden))
        y = b.relu6(b.bn(b.conv(y, hidden, hidden, 3, s, group=hidden), hidden))
        y = b.bn(b.conv(y, hidden, cout, 1), cout)
        x = b.op("Add", [x, y]) if s == 1 and c == cout else y
        c = cout
    x = b.relu6(b.bn(b.conv(x, c, 128, 1), 128))
    b.head(x, 128)
    return b.model("mobilenet_v2", "input", [1, 3, 64, 64], "output", [1, 10])


def transformer_block(seed: int = 0, tokens: int = 32, dim: int = 64, heads: int = 4) -> onnx.ModelProto:
    """Pre-norm transformer block: LN -> MHA -> Add -> LN -> MLP(ReLU) -> Add."""
    b = _Builder(seed)
    r = b.rng
    hd = dim // heads

    def linear(x: str, din: int, dout: int) -> str:
        w = r.standard_normal((din, dout)).astype(np.float32) / np.sqrt(din)
        y = b.op("MatMul", [x, b.const("w", w)])
        return b.op("Add", [y, b.const("b", (0.02 * r.standard_normal(dout)).astype(np.float32))])

    def layernorm(x: str) -> str:
        g = b.const("ln_g", (1 + 0.1 * r.standard_normal(dim)).astype(np.float32))
        bb = b.const("ln_b", (0.1 * r.standard_normal(dim)).astype(np.float32))
        return b.op("LayerNormalization", [x, g, bb], axis=-1, epsilon=1e-5)

    def heads_first(x: str) -> str:
        shape = b.const("shape", np.array([1, tokens, heads, hd], np.int64))
        return b.op("Transpose", [b.op("Reshape", [x, shape])], perm=[0, 2, 1, 3])

    h = layernorm("input")
    q, k, v = (heads_first(linear(h, dim, dim)) for _ in range(3))
    kt = b.op("Transpose", [k], perm=[0, 1, 3, 2])
    att = b.op("MatMul", [q, kt])
    att = b.op("Mul", [att, b.const("inv_sqrt_d", np.array(1 / np.sqrt(hd), np.float32))])
    att = b.op("Softmax", [att], axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [att, v])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("shape", np.array([1, tokens, dim], np.int64))])
    x = b.op("Add", ["input", linear(ctx, dim, dim)])
    h = layernorm(x)
    h = linear(b.relu(linear(h, dim, 4 * dim)), 4 * dim, dim)
    b.op("Add", [x, h])
    return b.model("transformer_block", "input", [1, tokens, dim], "output", [1, tokens, dim])


def conv_chain(blocks: int, channels: int = 8, hw: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` Conv-BN-ReLU blocks (3 nodes each) of ``channels`` channels."""
    b = _Builder(seed)
    x = "input"
    for _ in range(blocks):
        x = _cbr(b, x, channels, channels)
    b.nodes[-1].output[0] = "output"
    graph = helper.make_graph(
        b.nodes,
        "conv_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, hw, hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, hw, hw])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


SYNTHETIC_MODELS = {
    "cnn8": conv_bn_relu_cnn,
    "cnn8_res": residual_cnn,
    "mobilenet_v2": mobilenet_v2,
    "transformer": transformer_block,
}


def calibration_samples(model: onnx.ModelProto, count: int, seed: int = 1) -> dict[str, np.ndarray]:
    """``count`` standard-normal samples per graph input, stacked on axis 0 (the .npz layout)."""
    rng = np.random.default_rng(seed)
    data = {}
    for inp in model.graph.input:
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        data[inp.name] = rng.standard_normal((count, *dims)).astype(np.float32)
    return data
