"""Remove what earlier passes left behind: unused nodes, initializers, functions and
opset imports, and Identity nodes.

Before:  X -> Conv -> Identity -> Y     W_old (unused initializer)
After:   X -> Conv -> Y

Graph outputs keep their names (onnx_ir's identity elimination renames the producer's
output when an Identity feeds a graph output).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes import common

from zenith_onnx.passes.registry import register

__all__ = ["CleanupPass", "LiftConstantsPass", "InferShapesPass"]

logger = logging.getLogger(__name__)


@register("cleanup")
class CleanupPass(ir.passes.InPlacePass):
    """Remove Identity nodes and unused nodes, initializers, functions and opsets."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inner = ir.passes.Sequential(
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        )
        return ir.passes.PassResult(model, inner(model).modified)


@register("lift_constants")
class LiftConstantsPass(ir.passes.InPlacePass):
    """Turn Constant nodes holding tensors into initializers (older exports use them for weights)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inner = common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)
        return ir.passes.PassResult(model, inner(model).modified)


@register("infer_shapes")
class InferShapesPass(ir.passes.InPlacePass):
    """Fill in value types and shapes with ONNX shape inference (best effort; the model is kept if it fails)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inner = common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)
        # onnx_ir logs a failed inference as a warning with a full traceback; keep it to
        # one line of ours (the model is left as it was, which is fine for the callers).
        source = logging.getLogger(common.ShapeInferencePass.__module__)
        failures: list[str] = []

        def capture(record: logging.LogRecord) -> bool:
            failures.append(str(record.exc_info[1]).splitlines()[0][:200] if record.exc_info else record.getMessage())
            return False

        source.addFilter(capture)
        try:
            modified = inner(model).modified
        finally:
            source.removeFilter(capture)
        for failure in failures:
            logger.info("shape inference left the model unchanged: %s", failure)
        return ir.passes.PassResult(model, modified)
