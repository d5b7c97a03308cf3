"""What a model holds: op counts, inputs and outputs with shapes, opsets, weight bytes.

Backs `zenith-onnx inspect` and the before/after op table of `optimize`. Counts cover the
main graph, every subgraph (If/Loop/Scan bodies) and every local function; ops outside
the ai.onnx domain are shown as ``domain::Op`` and listed as custom ops. Weights are
counted wherever they live: initializers (main graph and subgraphs, inline or external
data) and the tensors held by Constant nodes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir

__all__ = ["op_counts", "summarize", "ModelSummary"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _all_nodes(model: ir.Model):
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def op_counts(model: ir.Model) -> dict[str, int]:
    """Count of each op type over the main graph, its subgraphs and local functions."""
    return dict(sorted(Counter(_op_name(node) for node in _all_nodes(model)).items()))


def _describe(value: ir.Value) -> dict:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = None if value.shape is None else [d if isinstance(d, int) else (d.value or "?") for d in value.shape]
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _constant_tensor(node: ir.Node) -> ir.TensorProtocol | None:
    if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS:
        return None
    attr = node.attributes.get("value")
    if attr is None or attr.is_ref() or attr.type != ir.AttributeType.TENSOR:
        return None
    return attr.as_tensor()


@dataclasses.dataclass
class ModelSummary:
    opsets: dict[str, int]
    ir_version: int
    producer: str
    inputs: list[dict]
    outputs: list[dict]
    ops: dict[str, int]
    nodes: int
    initializers: int
    initializer_bytes: int
    external_bytes: int  # part of initializer_bytes stored in external data files
    constant_nodes: int
    constant_bytes: int
    functions: list[str]
    custom_ops: dict[str, int]  # ops outside ai.onnx that are not local functions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        def io(v):
            shape = "?" if v["shape"] is None else "x".join(str(d) for d in v["shape"]) or "scalar"
            return f"  {v['name']}: {v['dtype']}[{shape}]"

        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items()))
        weights = f"initializers {self.initializers} ({self.initializer_bytes:,} bytes"
        weights += f", {self.external_bytes:,} in external data)" if self.external_bytes else ")"
        if self.constant_nodes:
            weights += f", Constant nodes {self.constant_nodes} ({self.constant_bytes:,} bytes)"
        lines = [
            f"ir_version {self.ir_version}; opsets: {opsets}; producer: {self.producer or '?'}",
            f"nodes {self.nodes}, {weights}",
            "inputs:",
            *map(io, self.inputs),
            "outputs:",
            *map(io, self.outputs),
            "ops:",
            *(f"  {op:<32}{n:>6}" for op, n in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        ]
        if self.functions:
            lines.append(f"local functions: {', '.join(self.functions)}")
        if self.custom_ops:
            listed = ", ".join(f"{op} ({n})" for op, n in self.custom_ops.items())
            lines.append(f"custom ops (not ai.onnx; onnxruntime needs a kernel for them): {listed}")
        return "\n".join(lines)


def summarize(model: ir.Model) -> ModelSummary:
    initializers = [v for g in (model.graph, *model.graph.subgraphs()) for v in g.initializers.values()]
    tensors = [v.const_value for v in initializers if v.const_value is not None]
    constants = [t for t in map(_constant_tensor, _all_nodes(model)) if t is not None]
    ops = op_counts(model)
    functions = {(f.domain, f.name) for f in model.functions.values()}
    custom = Counter(
        _op_name(n) for n in _all_nodes(model)
        if n.domain not in (*_DEFAULT_DOMAINS, "ai.onnx.ml") and (n.domain, n.op_type) not in functions
    )
    return ModelSummary(
        opsets=dict(model.opset_imports),
        ir_version=model.ir_version,
        producer=" ".join(filter(None, [model.producer_name, model.producer_version])),
        inputs=[_describe(v) for v in model.graph.inputs if not v.is_initializer()],
        outputs=[_describe(v) for v in model.graph.outputs],
        ops=ops,
        nodes=sum(ops.values()),
        initializers=len(initializers),
        initializer_bytes=sum(t.nbytes for t in tensors),
        external_bytes=sum(t.nbytes for t in tensors if isinstance(t, ir.ExternalTensor)),
        constant_nodes=len(constants),
        constant_bytes=sum(t.nbytes for t in constants),
        functions=sorted(f"{d}::{n}" for d, n in functions),
        custom_ops=dict(sorted(custom.items())),
    )
