"""Pattern-matching helpers shared by the rewrite passes (no pass logic here)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes import _graph

__all__ = ["is_op", "scalar", "other_operand", "nodes_to_rewrite"]


def is_op(node: ir.Node | None, op_type: str) -> bool:
    """``node`` exists, is of ``op_type`` and in the default domain."""
    return node is not None and node.op_type == op_type and _graph.is_default_domain(node)


def scalar(value: ir.Value | None) -> float | None:
    """The value as a Python float when it is a one-element floating-point constant."""
    array = _graph.constant_array(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def other_operand(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The input of a binary ``node`` that is not ``value`` (None if ``value`` is not an input)."""
    if len(node.inputs) != 2:
        return None
    if node.inputs[0] is value:
        return node.inputs[1]
    return node.inputs[0] if node.inputs[1] is value else None


def nodes_to_rewrite(model: ir.Model, rewriter, op_types: tuple[str, ...]) -> Iterator[ir.Node]:
    """Every default-domain node of ``op_types`` in the main graph, subgraphs and
    functions, still in its graph when reached (earlier rewrites may remove nodes).
    ``rewriter.scope`` follows the function being visited, as `fold_batchnorm` does."""
    for container in _graph.all_graphs(model):
        if isinstance(container, ir.Function):
            rewriter.scope = container
        for node in list(container):
            if node.op_type in op_types and _graph.is_default_domain(node) and node.graph is not None:
                yield node
