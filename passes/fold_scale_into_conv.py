"""Move a multiplication by a scalar constant into the weights of the Convs that read it.

After `expand_hard_activations` (and `div_to_mul` on written-out hard-swish) every
activation ends in ``* (1/6)``: in a quantized model one more QLinearMul per activation,
although the Conv after it could absorb the factor for free. Before/After::

    Before:  X -> Mul(c) -> Conv(W, b) -> Y            c a scalar constant
             X -> Mul(c) -> Mul(H) -> Conv(W, b) -> Y  (the factor passes through a product)
    After:   X -> Conv(c W, b) -> Y
             X -> Mul(H) -> Conv(c W, b) -> Y

Math: a Conv is linear in its input and pads with zeros, so ``Conv(c x, W, b) =
Conv(x, c W, b)`` for any group, stride, dilation and padding; ``(c x) h = c (x h)``.
The scaled weights are computed in float64 and rounded once to their dtype. Every reader
of the scaled value must be the data input of a Conv with a constant weight (each gets
its own scaled copy), or one elementwise Mul whose readers are such Convs. Refused (debug
line): a graph output on the way, another reader (Add, Concat, pooling, ...), a weight
that is not constant. The values on the way change by the factor ``1/c``; nothing reads
them but the rewritten nodes.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes import _graph
from zenith_onnx.passes._match import nodes_to_rewrite
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["FoldScaleIntoConvPass"]

logger = logging.getLogger(__name__)


def _scalar_operand(mul: ir.Node) -> tuple[int, float] | None:
    """(slot of the scaled operand, factor) when one operand of ``mul`` is a scalar constant."""
    if len(mul.inputs) != 2:
        return None
    for slot in (0, 1):
        array = _graph.constant_array(mul.inputs[slot])
        if array is not None and array.size == 1 and np.issubdtype(array.dtype, np.floating):
            other = mul.inputs[1 - slot]
            if _graph.constant_array(other) is None:
                return 1 - slot, float(array.reshape(()))
    return None


def _convs_reading(value: ir.Value) -> list[ir.Node] | str:
    """The Convs that alone read ``value`` (each on its data input, constant weight)."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    readers = [use.node for use in value.uses()]
    if not readers:
        return f"nothing reads '{value.name}'"
    for node in readers:
        if node.op_type != "Conv" or not _graph.is_default_domain(node):
            return f"'{value.name}' is read by {node.op_type} '{node.name}'"
        if node.inputs[0] is not value or value in node.inputs[1:]:
            return f"'{value.name}' is not only the data input of Conv '{node.name}'"
        if _graph.constant_array(node.inputs[1]) is None:
            return f"Conv '{node.name}' weight is not a constant"
    return readers


def _match(mul: ir.Node) -> tuple[ir.Value, float, ir.Node | None, list[ir.Node]] | str:
    """(unscaled input, factor, Mul the factor passes through or None, Convs) or why not."""
    found = _scalar_operand(mul)
    if found is None:
        return "no scalar constant operand"
    slot, factor = found
    out = mul.outputs[0]
    convs = _convs_reading(out)
    if not isinstance(convs, str):
        return mul.inputs[slot], factor, None, convs
    through = _graph.single_consumer(out)
    if through is None or through.op_type != "Mul" or not _graph.is_default_domain(through) or len(through.inputs) != 2:
        return convs
    if through.inputs[0] is through.inputs[1]:
        return f"Mul '{through.name}' squares the scaled value"
    after = _convs_reading(through.outputs[0])
    if isinstance(after, str):
        return f"through Mul '{through.name}': {after}"
    return mul.inputs[slot], factor, through, after


@register("fold_scale_into_conv")
class FoldScaleIntoConvPass(ir.passes.InPlacePass):
    """A Mul by a scalar constant moves into the weights of the Convs that read it."""

    def __init__(self) -> None:
        super().__init__()
        self.folded = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.folded = 0
        rw = Rewriter(model)
        for mul in nodes_to_rewrite(model, rw, ("Mul",)):
            found = _match(mul)
            if isinstance(found, str):
                logger.debug("Mul '%s' not folded into a Conv: %s", mul.name, found)
                continue
            x, factor, through, convs = found
            for conv in convs:
                weight = _graph.constant_array(conv.inputs[1])
                scaled = (weight.astype(np.float64) * factor).astype(weight.dtype)
                base = conv.name or "conv"
                rw.set_input(conv, 1, rw.constant(conv.graph, f"{base}.weight_scaled", scaled))
            mul.outputs[0].replace_all_uses_with(x)
            rw.remove(mul)
            self.folded += 1
            logger.debug("Mul '%s' (x %g) folded into %d Conv(s)%s", mul.name, factor, len(convs),
                         f" through Mul '{through.name}'" if through is not None else "")
        if self.folded:
            logger.info("fold_scale_into_conv: %d scalar Mul(s) folded into Conv weights", self.folded)
        return ir.passes.PassResult(model, bool(self.folded))
