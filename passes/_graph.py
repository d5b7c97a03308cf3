"""Small graph helpers shared by the passes (no pass logic here)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

__all__ = [
    "all_graphs",
    "constant_array",
    "is_default_domain",
    "single_consumer",
    "attr_int",
    "attr_ints",
    "attr_float",
    "make_initializer",
    "copy_value_type",
]


def all_graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every subgraph (If/Loop/Scan bodies) and every local function
    together with its subgraphs."""
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def is_default_domain(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's numpy array if it is a constant: an initializer that is not also a
    graph input (a caller could override those), or the output of a Constant node
    holding a tensor. None otherwise."""
    if value is None:
        return None
    if value.is_initializer() and not value.is_graph_input():
        return None if value.const_value is None else value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and is_default_domain(producer):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    return None


def single_consumer(value: ir.Value) -> ir.Node | None:
    """The one node that reads ``value``, if exactly one does (graph outputs count as a
    reader too, so a graph output never has a single consumer)."""
    if value.is_graph_output():
        return None
    users = {id(use.node): use.node for use in value.uses()}
    if len(users) != 1:
        return None
    return next(iter(users.values()))


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_ints(node: ir.Node, name: str, default: list[int] | None = None) -> list[int] | None:
    attr = node.attributes.get(name)
    return default if attr is None else list(attr.as_ints())


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def make_initializer(graph: ir.Graph | ir.Function, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a unique name.

    Functions cannot hold initializers; there the value is produced by a Constant node
    inserted at the start of the function body.
    """
    tensor = ir.tensor(np.array(array, order="C"), name=name)  # keeps 0-d arrays scalar
    if isinstance(graph, ir.Function):
        node = ir.node("Constant", [], attributes={"value": tensor}, outputs=[ir.Value(name=name)])
        value = node.outputs[0]
        value.dtype = tensor.dtype
        value.shape = ir.Shape(array.shape)
        first = next(iter(graph), None)
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
        return value
    unique = name
    k = 1
    while unique in graph.initializers:
        unique = f"{name}_{k}"
        k += 1
    tensor.name = unique
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def copy_value_type(source: ir.Value, target: ir.Value) -> None:
    """Give ``target`` the dtype and shape of ``source`` (needed when a value becomes a
    graph output in place of another)."""
    target.type = source.type
    target.shape = source.shape
