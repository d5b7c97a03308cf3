"""Move an Add of a per-channel constant after a Conv/ConvTranspose into the layer's bias.

Exporters that write the bias as a separate op (PaddlePaddle: ``Add(conv, Reshape(b, [1,
C, 1, 1]))``) leave a float Add after every such layer; a BatchNormalization after it then
has no Conv to fold into, and a quantized model pays a QLinearAdd and a uint8-quantized
bias for it. Before/After::

    Before:  X -> Conv(W[, b]) -> Add(B) -> Y        B constant, shape (C,1,1), (1,C,1,1), (1,) ...
    After:   X -> Conv(W, b + B.reshape(C)) -> Y

Math: ``Conv(x, W, b) + B = Conv(x, W, b + B)`` when B holds one value per output channel
(broadcast over the spatial axes) or one value in all; the sum is done in float64 and
rounded once to the bias dtype. The constant may be an initializer, a Constant node, or a
Reshape/Unsqueeze/Squeeze/Identity of constants (evaluated here).

Refused, with the reason in a debug line: the layer's output has other readers or is a
graph output, the other operand is not constant, it broadcasts over more than the
channel axis (or adds a rank), the layer's weight is not constant, dtypes differ.
Run before ``fold_batchnorm``: the BatchNormalization after the Add then folds into the
layer. The Conv's output takes the Add's output name (ranges by name stay valid).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes import _graph
from zenith_onnx.passes._match import nodes_to_rewrite
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["FuseBiasAddPass", "constant_through_shape_ops"]

logger = logging.getLogger(__name__)

_LAYERS = ("Conv", "ConvTranspose")


def constant_through_shape_ops(value: ir.Value | None) -> np.ndarray | None:
    """The value's array when it is a constant, possibly behind Reshape / Unsqueeze /
    Squeeze / Identity of constants; None otherwise."""
    array = _graph.constant_array(value)
    if array is not None or value is None:
        return array
    node = value.producer()
    if node is None or not _graph.is_default_domain(node):
        return None
    data = constant_through_shape_ops(node.inputs[0]) if node.inputs else None
    if data is None:
        return None
    if node.op_type == "Identity":
        return data
    # The second operand: Reshape's shape, or the axes of (Un)Squeeze (an attribute before opset 13).
    operand = _graph.attr_ints(node, "axes")
    if operand is None and len(node.inputs) > 1:
        found = _graph.constant_array(node.inputs[1])
        if found is None:
            return None
        operand = [int(a) for a in found.ravel()]
    axes = operand
    if node.op_type == "Reshape":
        if operand is None or _graph.attr_int(node, "allowzero", 0):
            return None
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(operand)]  # 0 copies the input dim
        return data.reshape(shape)
    if node.op_type == "Unsqueeze" and axes is not None:
        return np.expand_dims(data, tuple(axes))
    if node.op_type == "Squeeze":
        return np.squeeze(data, None if axes is None else tuple(axes))
    return None


def _channels(layer: ir.Node, weight: np.ndarray) -> int:
    if layer.op_type == "ConvTranspose":
        return weight.shape[1] * _graph.attr_int(layer, "group", 1)
    return weight.shape[0]


def _per_channel(bias: np.ndarray, rank: int, channels: int) -> np.ndarray | str:
    """``bias`` as a (C,) vector if adding it to a rank-``rank`` (N, C, ...) tensor adds
    one value per channel; otherwise why not."""
    if bias.ndim > rank:
        return f"its shape {bias.shape} has more axes than the layer's output (rank {rank})"
    shape = (1,) * (rank - bias.ndim) + bias.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return f"its shape {bias.shape} is not one value per output channel (C = {channels})"
    return np.broadcast_to(bias.reshape(-1), (channels,))


def _match(add: ir.Node) -> tuple[ir.Node, int, np.ndarray] | str:
    """(layer, slot of the layer's output in the Add, per-channel bias) or why not."""
    for slot in (0, 1):
        layer = add.inputs[slot].producer() if add.inputs[slot] is not None else None
        if layer is not None and layer.op_type in _LAYERS and _graph.is_default_domain(layer):
            break
    else:
        return "neither operand comes from a Conv/ConvTranspose"
    out = layer.outputs[0]
    if _graph.single_consumer(out) is not add or add.inputs[0] is add.inputs[1]:
        return f"{layer.op_type} '{layer.name}' output '{out.name}' has other readers or is a graph output"
    if layer.graph is not add.graph:
        return f"{layer.op_type} '{layer.name}' is in another graph"
    other = add.inputs[1 - slot]
    bias = constant_through_shape_ops(other)
    if bias is None:
        return f"the other operand '{other.name}' is not a constant"
    weight = _graph.constant_array(layer.inputs[1]) if len(layer.inputs) > 1 else None
    if weight is None:
        return f"{layer.op_type} '{layer.name}' weight is not a constant"
    if bias.dtype != weight.dtype or not np.issubdtype(bias.dtype, np.floating):
        return f"the constant has dtype {bias.dtype}, the weight {weight.dtype}"
    vector = _per_channel(bias, weight.ndim, _channels(layer, weight))
    if isinstance(vector, str):
        return f"the constant '{other.name}': {vector}"
    old = _graph.constant_array(layer.inputs[2]) if len(layer.inputs) > 2 and layer.inputs[2] is not None else None
    if len(layer.inputs) > 2 and layer.inputs[2] is not None and old is None:
        return f"{layer.op_type} '{layer.name}' bias is not a constant"
    total = vector.astype(np.float64) + (0.0 if old is None else old.astype(np.float64))
    return layer, slot, total.astype(weight.dtype)


@register("fuse_bias_add")
class FuseBiasAddPass(ir.passes.InPlacePass):
    """Move an Add of a per-channel constant after a Conv/ConvTranspose into its bias (Paddle exports)."""

    def __init__(self) -> None:
        super().__init__()
        self.fused: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fused = []
        rw = Rewriter(model)
        for node in nodes_to_rewrite(model, rw, ("Add",)):
            found = _match(node) if len(node.inputs) == 2 else "it has one input"
            if isinstance(found, str):
                logger.debug("Add '%s' not fused into a bias: %s", node.name, found)
                continue
            layer, _, bias = found
            base = layer.name or layer.op_type.lower()
            rw.set_input(layer, 2, rw.constant(layer.graph, f"{base}.bias_fused", bias))
            rw.bypass(node, layer.outputs[0])
            self.fused.append(layer.name)
            logger.debug("Add '%s' fused into the bias of %s '%s'", node.name, layer.op_type, layer.name)
        if self.fused:
            logger.info("fuse_bias_add: %d Add(s) moved into a Conv/ConvTranspose bias", len(self.fused))
        return ir.passes.PassResult(model, bool(self.fused))
