"""The Conv -> activation -> depthwise Conv test model of the channel rewrites
(test_split_channels.py, test_equalize_channels.py).

x -> Conv_a (3x3) -> Relu -> Conv_b (1x1) -> activation -> t -> Conv_c (3x3 depthwise) -> y.
The first half of ``t``'s channels is ``big`` times larger than the second and Conv_c
scales them back, so every output channel has the same size: one uint8 scale for ``t``
leaves the small half ~1 step (the zoo models' pattern before depthwise convs).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

__all__ = ["chain_model", "chain_feeds"]


def chain_model(channels: int, activation: str = "Relu", big: float = 200.0, extra_reader: bool = False) -> ir.Model:
    """``activation``: an op type, or "hardswish_written" for ``b * HardSigmoid(b)``.
    ``extra_reader``: ``t`` is also read by a ReduceMax that is a graph output."""
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((channels, 4, 3, 3)).astype(np.float32) * 0.25
    wb = rng.standard_normal((channels, channels, 1, 1)).astype(np.float32) * 0.2
    wb[: channels // 2] *= big
    wc = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32) * 0.3
    wc[: channels // 2] /= big
    bias = np.linspace(-0.1, 0.1, channels).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(wa, "wa"), (wb, "wb"), (wc, "wc"), (bias, "ba"), (bias, "bb"),
                                                          (bias, "bc")]]
    if activation == "hardswish_written":
        act = [helper.make_node("HardSigmoid", ["b"], ["gate"], name="HardSigmoid_b", alpha=1 / 6, beta=0.5),
               helper.make_node("Mul", ["b", "gate"], ["t"], name="Mul_b")]
    else:
        act = [helper.make_node(activation, ["b"], ["t"], name="Act_b")]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="Conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="Relu_a"),
        helper.make_node("Conv", ["a_relu", "wb", "bb"], ["b"], name="Conv_b", kernel_shape=[1, 1]),
        *act,
        helper.make_node("Conv", ["t", "wc", "bc"], ["y"], name="Conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         group=channels),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])]
    if extra_reader:
        nodes.append(helper.make_node("ReduceMax", ["t"], ["t_max"], name="Peek", keepdims=0))
        outputs.append(helper.make_tensor_value_info("t_max", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


def chain_feeds(count: int = 8) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(1).standard_normal((count, 1, 4, 8, 8)).astype(np.float32)
    return [{"x": v} for v in x]
