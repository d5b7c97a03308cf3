"""Write HardSwish and HardSigmoid with ops onnxruntime runs on 8-bit integers.

onnxruntime has no integer kernel for HardSwish or HardSigmoid: in a quantized model each
runs as DequantizeLinear -> float op(s) -> QuantizeLinear (HardSwish is even inlined as
HardSigmoid + Mul). Written with Add, Clip and Mul it runs as QLinearAdd and QLinearMul,
the Clip(0, hi) vanishing into the QuantizeLinear after the Add, and the final scalar
factor can move into the next Conv's weights (`fold_scale_into_conv`). This is the
inverse of `fuse_hardswish`, which suits float models (onnxruntime fuses HardSigmoid and
HardSwish into the Conv before them); the quantize pipeline runs this one. Before/After::

    Before:  X -> HardSwish -> Y
    After:   X -> Add(3) -> Clip(0, 6) -> Mul(X) -> Mul(1/6) -> Y

    Before:  X -> HardSigmoid(alpha, beta) -> Y                      alpha > 0
    After:   X -> Add(beta/alpha) -> Clip(0, 1/alpha) -> Mul(alpha) -> Y

Math: ``HardSigmoid(x) = max(0, min(1, alpha x + beta)) = alpha Clip(x + beta/alpha, 0,
1/alpha)`` for alpha > 0, and ``HardSwish(x) = x HardSigmoid_{1/6, 1/2}(x)``; equal up to
a few float32 roundings. Constants are computed in float64, stored in the input's dtype.
Refused (debug line): alpha <= 0, an input dtype that is not floating point or unknown,
opset < 11 (Clip bounds were attributes then; every model that carries HardSwish is at
opset >= 14 anyway).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx.modelio import default_opset
from zenith_onnx.passes import _graph
from zenith_onnx.passes._match import nodes_to_rewrite
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["ExpandHardActivationsPass"]

logger = logging.getLogger(__name__)

CLIP_INPUTS_OPSET = 11


def _parameters(node: ir.Node) -> tuple[float, float] | str:
    """(alpha, beta) of ``node``'s hard-sigmoid (HardSwish: 1/6, 1/2), or why not."""
    x = node.inputs[0]
    if x.dtype is not None and not x.dtype.is_floating_point():
        return f"its input has dtype {x.dtype}"
    if node.op_type == "HardSwish":
        return 1.0 / 6.0, 0.5
    alpha = _graph.attr_float(node, "alpha", 0.2)
    if alpha <= 0:
        return f"alpha = {alpha} is not positive"
    return alpha, _graph.attr_float(node, "beta", 0.5)


@register("expand_hard_activations")
class ExpandHardActivationsPass(ir.passes.InPlacePass):
    """HardSwish / HardSigmoid become Add, Clip and Mul, which run as integer kernels in a quantized model."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        if default_opset(model) < CLIP_INPUTS_OPSET:
            logger.debug("expand_hard_activations: opset %d < %d, nothing done", default_opset(model), CLIP_INPUTS_OPSET)
            return ir.passes.PassResult(model, False)
        rw = Rewriter(model)
        for node in nodes_to_rewrite(model, rw, ("HardSwish", "HardSigmoid")):
            found = _parameters(node)
            if isinstance(found, str):
                logger.debug("%s '%s' kept: %s", node.op_type, node.name, found)
                continue
            self._expand(rw, node, *found)
            self.counts[node.op_type] = self.counts.get(node.op_type, 0) + 1
        if self.counts:
            logger.info("expand_hard_activations: %s", ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())))
        return ir.passes.PassResult(model, bool(self.counts))

    @staticmethod
    def _expand(rw: Rewriter, node: ir.Node, alpha: float, beta: float) -> None:
        x, out, graph = node.inputs[0], node.outputs[0], node.graph
        dtype = x.dtype.numpy() if x.dtype is not None else np.float32
        base = node.name or node.op_type.lower()

        def const(suffix: str, value: float) -> ir.Value:
            return rw.constant(graph, f"{base}.{suffix}", np.array(value, dtype=dtype))

        add = rw.new_node("Add", [x, const("shift", beta / alpha)], like=x, base=f"{base}_shifted")
        clip = rw.new_node("Clip", [add.outputs[0], const("low", 0.0), const("high", 1.0 / alpha)], like=x,
                           base=f"{base}_clipped")
        nodes = [add, clip]
        if node.op_type == "HardSwish":
            nodes.append(rw.new_node("Mul", [x, clip.outputs[0]], like=out, base=f"{base}_product"))
        nodes.append(rw.new_node("Mul", [nodes[-1].outputs[0], const("alpha", alpha)], like=out, base=f"{base}_scaled"))
        graph.insert_before(node, nodes)
        rw.bypass(node, nodes[-1].outputs[0])
