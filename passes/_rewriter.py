"""Graph edits shared by the rewriting passes: unique names, new constants, bypassing a
node, and dropping constants nothing reads any more."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes import _graph

__all__ = ["Rewriter"]


class Rewriter:
    """Graph edits shared by the rewrites: unique names, new constants, node bypass and
    dropping constants nothing reads any more. Built once per pass run."""

    def __init__(self, model: ir.Model):
        self._names: set[str] = set()
        for container in _graph.all_graphs(model):
            self._names.update(v.name for v in container.inputs if v.name)
            if isinstance(container, ir.Graph):
                self._names.update(container.initializers)
            for node in container:
                self._names.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self._names.add(node.name)
        # Where new constants go: the node's own graph, or, inside a local function
        # (which cannot hold initializers), a Constant node in the function body.
        self.scope: ir.Graph | ir.Function | None = None

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def constant(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        target = self.scope if isinstance(self.scope, ir.Function) else graph
        return _graph.make_initializer(target, self.unique(base), array)

    def set_input(self, node: ir.Node, index: int, value: ir.Value) -> None:
        if len(node.inputs) <= index:
            node.resize_inputs(index + 1)
        old = node.inputs[index]
        node.replace_input_with(index, value)
        self.drop_if_unused(old)

    def new_node(self, op_type: str, inputs: list[ir.Value], like: ir.Value, base: str) -> ir.Node:
        output = ir.Value(name=self.unique(base), type=like.type, shape=like.shape)
        return ir.node(op_type, inputs, outputs=[output], name=self.unique(f"{base}_{op_type}"))

    def bypass(self, node: ir.Node, replacement: ir.Value) -> None:
        """Make everything that read the node's output read ``replacement`` (which now
        computes it), then remove the node. ``replacement`` takes the output's name, so
        ranges and references by tensor name (calibration files, graph outputs) keep
        meaning the same values; a graph output also keeps its dtype and shape."""
        out = node.outputs[0]
        was_output = out.is_graph_output()
        out.replace_all_uses_with(replacement, replace_graph_outputs=True)
        name = out.name
        out.name = None
        if was_output:
            _graph.copy_value_type(out, replacement)
        replacement.name = name
        self.remove(node)

    def remove(self, node: ir.Node) -> None:
        inputs = node.inputs
        node.graph.remove(node, safe=True)
        for value in inputs:
            self.drop_if_unused(value)

    def drop_if_unused(self, value: ir.Value | None) -> None:
        """Remove a constant (initializer or Constant node) that nothing reads any more."""
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            return
        if value.is_initializer():
            value.graph.initializers.pop(value.name)
            return
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and _graph.is_default_domain(producer):
            producer.graph.remove(producer, safe=True)
