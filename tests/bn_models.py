"""Small models with BatchNormalization for the fold tests, built with onnx.helper.

Every model pins ir_version 10 and opset 17 (unless a test asks for another opset) so
that the checker and onnxruntime see the same thing on every machine. BatchNormalization
statistics are drawn away from degenerate values (var in [0.5, 2], |gamma| in [0.5, 1.5])
so a folding bug shows up as a large error, not as noise.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

IR_VERSION = 10
OPSET = 17

_ONNX_TYPE = {
    np.dtype(np.float32): onnx.TensorProto.FLOAT,
    np.dtype(np.float16): onnx.TensorProto.FLOAT16,
    np.dtype(np.float64): onnx.TensorProto.DOUBLE,
}


class GraphBuilder:
    """Collects nodes, initializers and graph inputs/outputs of one graph."""

    def __init__(self, name: str = "g", *, seed: int = 0, dtype=np.float32, constants_as_nodes: bool = False):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.constants_as_nodes = constants_as_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    @property
    def elem_type(self) -> int:
        return _ONNX_TYPE[self.dtype]

    def input(self, name: str, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, self.elem_type, shape))
        return name

    def output(self, name: str, shape=None, elem_type: int | None = None) -> str:
        """A graph output; ``shape=None`` leaves it to shape inference in `make_model`."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, shape))
        return name

    def const(self, name: str, array: np.ndarray, *, as_node: bool | None = None) -> str:
        """An initializer, or a Constant node when the builder (or ``as_node``) asks."""
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if self.constants_as_nodes if as_node is None else as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor))
        else:
            self.initializers.append(tensor)
        return name

    def random(self, shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(self.dtype)

    def node(self, op_type: str, inputs: list[str], output: str, name: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=name or output, **attrs))
        return output

    def conv(self, x: str, c_in: int, c_out: int, name: str, *, kernel=(3, 3), group: int = 1,
             bias: bool = True, weight: str | None = None, **attrs) -> str:
        if weight is None:
            fan_in = c_in // group * int(np.prod(kernel))
            weight = self.const(f"{name}.w", self.random((c_out, c_in // group, *kernel), 1 / np.sqrt(fan_in)))
        inputs = [x, weight]
        if bias:
            inputs.append(self.const(f"{name}.b", self.random((c_out,), 0.1)))
        return self.node("Conv", inputs, f"{name}_out", name, group=group, **attrs)

    def bn_params(self, name: str, channels: int) -> list[str]:
        rng = self.rng
        gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
        beta = rng.standard_normal(channels) * 0.5
        mean = rng.standard_normal(channels) * 0.5
        var = rng.uniform(0.5, 2.0, channels)
        return [self.const(f"{name}.{p}", v.astype(self.dtype))
                for p, v in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))]

    def bn(self, x: str, channels: int, name: str, output: str | None = None, **attrs) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(name, channels)], output or f"{name}_out", name, **attrs)

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)


def make_model(graph: onnx.GraphProto, *, opset: int = OPSET, functions=(), domains: dict[str, int] | None = None,
               infer_shapes: bool = False) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION, functions=list(functions))
    # Graph outputs need a shape for the checker; intermediate shapes only when asked
    # (several tests are about what the pass does without them).
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if infer_shapes:
        model = inferred
    else:
        del model.graph.output[:]
        model.graph.output.extend(inferred.graph.output)
    onnx.checker.check_model(model, full_check=True)
    return model


def to_ir(model: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(model)

