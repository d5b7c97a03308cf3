"""Turn a division by a constant into a multiplication by its reciprocal.

onnxruntime has an integer kernel for Mul (QLinearMul) and none for Div, so in a
quantized model ``x / c`` runs as DequantizeLinear -> float Div -> QuantizeLinear while
``x * (1/c)`` runs in integers. Before/After::

    Before:  X -> Div(C) -> Y          C constant, every element finite and non-zero
    After:   X -> Mul(1/C) -> Y

Math: ``x / c`` and ``x * fl(1/c)`` differ by at most one rounding of ``1/c`` (relative
2^-24 in float32). The reciprocal is computed in float64 and rounded once to C's dtype.
Refused (debug line): the divisor is not constant, has a zero, an infinity or a NaN, is
not floating point, or is the dividend (``C / X``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes import _graph
from zenith_onnx.passes._match import nodes_to_rewrite
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["DivToMulPass"]

logger = logging.getLogger(__name__)


def _reciprocal(div: ir.Node) -> np.ndarray | str:
    divisor = _graph.constant_array(div.inputs[1])
    if divisor is None:
        return f"divisor '{div.inputs[1].name}' is not a constant"
    if not np.issubdtype(divisor.dtype, np.floating):
        return f"divisor has dtype {divisor.dtype} (integer division)"
    if not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
        return "divisor has a zero, an infinity or a NaN"
    return (1.0 / divisor.astype(np.float64)).astype(divisor.dtype)


@register("div_to_mul")
class DivToMulPass(ir.passes.InPlacePass):
    """Div by a constant becomes Mul by its reciprocal (QLinearMul exists, QLinearDiv does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.rewritten = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewritten = 0
        rw = Rewriter(model)
        for div in nodes_to_rewrite(model, rw, ("Div",)):
            reciprocal = _reciprocal(div)
            if isinstance(reciprocal, str):
                logger.debug("Div '%s' kept: %s", div.name, reciprocal)
                continue
            base = div.name or "div"
            factor = rw.constant(div.graph, f"{base}.reciprocal", reciprocal)
            mul = rw.new_node("Mul", [div.inputs[0], factor], like=div.outputs[0], base=f"{base}_mul")
            div.graph.insert_before(div, mul)
            rw.bypass(div, mul.outputs[0])
            self.rewritten += 1
        if self.rewritten:
            logger.info("div_to_mul: %d Div by a constant became Mul", self.rewritten)
        return ir.passes.PassResult(model, bool(self.rewritten))
