"""Expose activations as graph outputs so that calibration can read them.

Before:  X -> Conv -> a -> Relu -> b -> MaxPool -> Y          outputs: Y
After:   X -> Conv -> a -> Relu -> b -> MaxPool -> Y          outputs: Y, a, b

No node changes, so every existing output keeps its value (float-preserving). The pass
works in place; `zenith_onnx.calibration` runs it on a clone, never on the user's model.

Which tensors: the names given, or by default every non-constant float tensor of the
main graph that is an input or output of a node whose op type is in
`DEFAULT_OBSERVED_OPS` (the ops that get Q/DQ, plus those whose ranges must match
them). After `call`, the pass tells where each tensor will be read:

- ``outputs``: graph outputs (added here, or already outputs);
- ``inputs``: graph inputs (read from the feeds, onnxruntime is not asked for them);
- ``constants``: initializers or Constant outputs named explicitly (read once);
- ``skipped``: name -> reason. onnxruntime cannot return a tensor that lives inside a
  subgraph (If/Loop/Scan bodies), so those are skipped and a warning names them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import onnx_ir as ir

from zenith_onnx.errors import UsageError
from zenith_onnx.passes._graph import is_default_domain
from zenith_onnx.passes.registry import register

__all__ = ["DEFAULT_OBSERVED_OPS", "FLOAT_TYPES", "ObservePass"]

logger = logging.getLogger(__name__)

DEFAULT_OBSERVED_OPS = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul",
    "Add", "Mul", "Sub", "Div", "Pow", "Sqrt",
    "Concat",
    "AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "Softmax", "HardSigmoid", "HardSwish",
    "Resize",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Expand",
    "ReduceMean", "LayerNormalization",
})  # fmt: skip

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


def _is_constant(value: ir.Value) -> bool:
    if value.is_initializer() or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and is_default_domain(producer)


def _may_be_float(value: ir.Value) -> bool:
    """Float, or of unknown type (onnxruntime infers it; calibration drops non-float)."""
    return value.dtype is None or value.dtype in FLOAT_TYPES


def _candidates(nodes: Iterable[ir.Node], ops: frozenset[str]) -> Iterable[ir.Value]:
    for node in nodes:
        if node.op_type not in ops or not is_default_domain(node):
            logger.debug("not observing around node '%s': op %s is not observed", node.name, node.op_type)
            continue
        for value in (*node.inputs, *node.outputs):
            if value is not None and value.name and not _is_constant(value) and _may_be_float(value):
                yield value


def _subgraphs(model: ir.Model) -> Iterator[tuple[ir.Node, ir.Graph]]:
    """``(main-graph node, graph)`` for every graph attribute of a main-graph node."""
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield node, attr.as_graph()
            elif attr.type == ir.AttributeType.GRAPHS:
                for graph in attr.as_graphs():
                    yield node, graph


def _subgraph_owners(model: ir.Model) -> dict[str, ir.Node]:
    """Names of values defined inside subgraphs -> the main-graph node that holds them."""
    owners: dict[str, ir.Node] = {}
    for node, graph in _subgraphs(model):
        for value in graph.inputs:
            owners.setdefault(value.name, node)
        for inner in ir.traversal.RecursiveGraphIterator(graph):
            for value in inner.outputs:
                owners.setdefault(value.name, node)
    return owners


def _subgraph_candidates(model: ir.Model, ops: frozenset[str]) -> dict[str, ir.Node]:
    """Tensors the default selection would observe if they were not inside a subgraph."""
    found: dict[str, ir.Node] = {}
    for node, graph in _subgraphs(model):
        for value in _candidates(ir.traversal.RecursiveGraphIterator(graph), ops):
            if value.graph is not model.graph:  # outer-scope values are observed in the main graph
                found.setdefault(value.name, node)
    return found


def _where(node: ir.Node) -> str:
    return f"inside a subgraph of node '{node.name}' ({node.op_type}); onnxruntime cannot return it"


def _warn_skipped(skipped: dict[str, str]) -> None:
    if not skipped:
        return
    names = list(skipped)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    logger.warning(
        "%d tensor(s) inside subgraphs are not observed (onnxruntime cannot return subgraph tensors), "
        "so they get no range: %s", len(names), shown,
    )


@register("observe")
class ObservePass(ir.passes.InPlacePass):
    """Add activations (inputs/outputs of observed ops, or given names) as graph outputs for calibration."""

    def __init__(self, tensors: Sequence[str] | None = None, ops: Iterable[str] = DEFAULT_OBSERVED_OPS):
        super().__init__()
        self.tensors = None if tensors is None else list(dict.fromkeys(tensors))
        self.ops = frozenset(ops)
        self.outputs: list[str] = []
        self.inputs: list[str] = []
        self.constants: list[str] = []
        self.skipped: dict[str, str] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.outputs, self.inputs, self.constants, self.skipped = [], [], [], {}
        if self.tensors is None:
            chosen = list(dict.fromkeys(_candidates(graph, self.ops)))
            self.skipped = {name: _where(node) for name, node in _subgraph_candidates(model, self.ops).items()}
        else:
            chosen = self._resolve(model)
        modified = False
        for value in chosen:
            if _is_constant(value):  # also an initializer that backs a graph input
                self.constants.append(value.name)
            elif value.is_graph_input():
                self.inputs.append(value.name)
            else:
                if not value.is_graph_output():
                    graph.outputs.append(value)
                    modified = True
                self.outputs.append(value.name)
        _warn_skipped(self.skipped)
        logger.info(
            "observing %d tensors: %d as graph outputs, %d graph inputs, %d constants",
            len(chosen), len(self.outputs), len(self.inputs), len(self.constants),
        )
        return ir.passes.PassResult(model, modified)

    def _resolve(self, model: ir.Model) -> list[ir.Value]:
        graph = model.graph
        by_name: dict[str, ir.Value] = dict(graph.initializers)
        by_name.update((v.name, v) for v in graph.inputs)
        by_name.update((v.name, v) for node in graph for v in node.outputs if v.name)
        chosen, owners = [], None
        for name in self.tensors:
            value = by_name.get(name)
            if value is not None:
                chosen.append(value)
                continue
            owners = _subgraph_owners(model) if owners is None else owners
            if name not in owners:
                raise UsageError(f"tensor '{name}' to observe is not in the model")
            self.skipped[name] = _where(owners[name])
        return chosen
