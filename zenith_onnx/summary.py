"""What a model holds: op counts, inputs and outputs with shapes, opsets, weight bytes.

Backs `zenith-onnx inspect` and the before/after op table of `optimize`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir

__all__ = ["op_counts", "summarize", "ModelSummary"]


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def op_counts(model: ir.Model) -> dict[str, int]:
    """Count of each op type over the main graph, its subgraphs and local functions."""
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[_op_name(node)] += 1
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            counts[_op_name(node)] += 1
    return dict(sorted(counts.items()))


def _describe(value: ir.Value) -> dict:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    shape = [] if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": dtype, "shape": shape if value.shape is not None else None}


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        def io(v):
            shape = "?" if v["shape"] is None else "x".join(str(d) for d in v["shape"]) or "scalar"
            return f"  {v['name']}: {v['dtype']}[{shape}]"

        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(self.opsets.items()))
        lines = [
            f"ir_version {self.ir_version}; opsets: {opsets}; producer: {self.producer or '?'}",
            f"nodes {self.nodes}, initializers {self.initializers} ({self.initializer_bytes:,} bytes)",
            "inputs:",
            *map(io, self.inputs),
            "outputs:",
            *map(io, self.outputs),
            "ops:",
            *(f"  {op:<32}{n:>6}" for op, n in sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        ]
        return "\n".join(lines)


def summarize(model: ir.Model) -> ModelSummary:
    initializers = list(model.graph.initializers.values())
    for g in model.graph.subgraphs():
        initializers.extend(g.initializers.values())
    size = sum(v.const_value.nbytes for v in initializers if v.const_value is not None)
    ops = op_counts(model)
    return ModelSummary(
        opsets=dict(model.opset_imports),
        ir_version=model.ir_version,
        producer=" ".join(filter(None, [model.producer_name, model.producer_version])),
        inputs=[_describe(v) for v in model.graph.inputs],
        outputs=[_describe(v) for v in model.graph.outputs],
        ops=ops,
        nodes=sum(ops.values()),
        initializers=len(initializers),
        initializer_bytes=size,
    )
