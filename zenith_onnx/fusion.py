"""What onnxruntime actually fuses: load at ``ORT_ENABLE_EXTENDED``, read the optimized graph.

A QDQ model is only fast if onnxruntime's CPU provider turns DequantizeLinear -> op ->
QuantizeLinear groups into integer kernels. This module asks onnxruntime rather than
predicting it: the model is loaded with ``graph_optimization_level=ORT_ENABLE_EXTENDED``
and ``optimized_model_filepath``, and the written graph is counted:

- integer ops: QLinear* (ai.onnx and com.microsoft), QGemm, MatMulInteger*, ConvInteger,
  MatMulNBits, DynamicQuantize*, QAttention;
- QuantizeLinear / DequantizeLinear left over;
- float ops (everything else), and every DequantizeLinear whose output still feeds one of
  them (any reader except QuantizeLinear; graph outputs are not readers), by op type with
  the node names. Those are the places where the model runs in float between Q and DQ.

The report shows what onnxruntime 1.32 really does, bugs included (see ORT-NOTES): with B1
(int8 activations + Reshape at opset >= 21) the optimizer fails and `fusion_report` raises
`ModelError` with onnxruntime's first line; with B2 (a Relu feeding a 4-bit QuantizeLinear)
the Relu disappears and the report warns that outputs at this level differ from
``ORT_DISABLE_ALL``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir

from zenith_onnx import runtime
from zenith_onnx.errors import ModelError

__all__ = ["FusionReport", "fusion_report", "fused_counts", "is_integer_op"]

logger = logging.getLogger(__name__)

_INTEGER_PREFIXES = ("QLinear", "MatMulInteger", "DynamicQuantize")
_INTEGER_OPS = {"QGemm", "ConvInteger", "MatMulNBits", "QAttention", "NhwcQLinearConv"}
_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_NOT_COMPUTE = {"Constant"}
# Ops that only move data: they run on whatever their first input holds (after ORT drops
# the Q/DQ around them, that is int8/uint8).
_DATA_MOVEMENT = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Slice", "Expand",
    "Tile", "Identity", "Split", "Pad", "MaxPool", "Resize", "ReduceMax", "ReduceMin",
    "DepthToSpace", "SpaceToDepth",
}
# Integer ops whose output is float (they dequantize internally).
_FLOAT_OUTPUT = {"MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeMatMul", "QAttention"}
_FOUR_BIT = {ir.DataType.INT4, ir.DataType.UINT4}
_LOAD_PREFIX = "onnxruntime cannot load the model: "


def is_integer_op(op_type: str) -> bool:
    """True for ops that compute on integers (the fused kernels we want to see)."""
    return op_type.startswith(_INTEGER_PREFIXES) or op_type in _INTEGER_OPS


def _op_name(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


@dataclasses.dataclass
class FusionReport:
    """Op counts of the graph onnxruntime runs at ``ORT_ENABLE_EXTENDED``."""

    model: str
    level: str
    ops: dict[str, int]
    integer_ops: dict[str, int]
    float_ops: dict[str, int]
    integer_data_ops: dict[str, int]  # data movement (Reshape, MaxPool, ...) running on int8/uint8
    quantize_linear: int
    dequantize_linear: int
    float_ops_fed_by_dq: dict[str, list[str]]  # reader op type -> names of the reading nodes
    dq_feeding_float: int  # DequantizeLinear nodes with at least one float reader
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def fully_fused(self) -> bool:
        """No DequantizeLinear feeds a float op."""
        return not self.float_ops_fed_by_dq

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["fully_fused"] = self.fully_fused
        return data

    def format(self) -> str:
        def table(counts: dict[str, int]) -> list[str]:
            return [f"  {op:<36}{n:>6}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))] or ["  (none)"]

        lines = [
            f"onnxruntime {_ort_version()} at {self.level}: "
            f"{sum(self.integer_ops.values())} integer ops, {sum(self.float_ops.values())} float ops, "
            f"{sum(self.integer_data_ops.values())} data ops on integers, "
            f"{self.quantize_linear} QuantizeLinear, {self.dequantize_linear} DequantizeLinear left",
            "integer ops:",
            *table(self.integer_ops),
            "float ops:",
            *table(self.float_ops),
        ]
        if self.integer_data_ops:
            lines += ["data movement on integers (Q/DQ dropped around them):", *table(self.integer_data_ops)]
        if self.float_ops_fed_by_dq:
            total = sum(len(v) for v in self.float_ops_fed_by_dq.values())
            lines.append(
                f"float ops still fed by DequantizeLinear ({total} nodes read {self.dq_feeding_float} "
                "DequantizeLinear outputs; these run in float):"
            )
            for op, names in sorted(self.float_ops_fed_by_dq.items()):
                shown = ", ".join(f"'{n}'" for n in names[:8]) + (f", ... {len(names) - 8} more" if len(names) > 8 else "")
                lines.append(f"  {op:<24}{len(names):>4}  {shown}")
        else:
            lines.append("no DequantizeLinear feeds a float op")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _optimized_model(model: ir.Model | str | os.PathLike, name: str, folder: Path) -> ir.Model:
    path = folder / "optimized.onnx"
    try:
        runtime.session(model, "extended", optimized_model_filepath=str(path))
    except ModelError as e:
        reason = str(e).removeprefix(_LOAD_PREFIX)
        try:
            runtime.session(model, "disable_all")
        except ModelError:
            raise ModelError(f"{name}: onnxruntime cannot load the model: {reason}") from None
        hint = ""
        if "does not match y_zero_point type" in reason:
            hint = (" (onnxruntime 1.32 bug: int8 activations followed by Reshape at opset >= 21;"
                    " uint8 activations avoid it)")
        raise ModelError(
            f"{name}: onnxruntime runs the model at ORT_DISABLE_ALL but fails to optimize it at "
            f"ORT_ENABLE_EXTENDED: {reason}{hint}"
        ) from None
    return ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))


def _dropped_relus_before_4bit(source: ir.Model, optimized: ir.Model) -> list[str]:
    """Relu nodes that fed a 4-bit QuantizeLinear and are gone after optimization
    (onnxruntime 1.32 drops them at level 2 whatever the zero point; 8-bit is fine)."""
    kept = {node.name for node in optimized.graph.all_nodes()}
    dropped = []
    for node in source.graph.all_nodes():
        if node.op_type != "Relu" or not node.name or node.name in kept:
            continue
        for use in node.outputs[0].uses():
            q = use.node
            if q.op_type != "QuantizeLinear":
                continue
            zero_point = q.inputs[2] if len(q.inputs) > 2 else None
            out_dtype = q.attributes.get("output_dtype")
            dtype = zero_point.dtype if zero_point is not None else None
            if dtype in _FOUR_BIT or (out_dtype is not None and ir.DataType(out_dtype.as_int()) in _FOUR_BIT):
                dropped.append(node.name)
                break
    return dropped


def _integer_values(model: ir.Model) -> set[ir.Value]:
    """Values holding integer tensors in onnxruntime's optimized graph (it writes no
    value_info): typed integer inputs and initializers, outputs of QuantizeLinear and
    integer ops, and data movement applied to those."""
    result: set[ir.Value] = set()

    def is_integer(value: ir.Value | None) -> bool:
        if value is None:
            return False
        if value in result:
            return True
        return value.dtype is not None and not value.dtype.is_floating_point() and value.producer() is None

    for node in model.graph.all_nodes():  # onnxruntime writes nodes in topological order
        op = node.op_type
        if op in ("QuantizeLinear", "DynamicQuantizeLinear"):
            integer_out = [node.outputs[0]]
        elif op == "QGemm":  # float output unless y_scale is given
            integer_out = list(node.outputs) if len(node.inputs) > 7 and node.inputs[7] is not None else []
        elif is_integer_op(op) and op not in _FLOAT_OUTPUT:
            integer_out = list(node.outputs)
        elif op in _DATA_MOVEMENT and node.inputs and is_integer(node.inputs[0]):
            integer_out = list(node.outputs)
        else:
            integer_out = []
        result.update(integer_out)
    return result


def fusion_report(model: ir.Model | str | os.PathLike) -> FusionReport:
    """Load ``model`` in onnxruntime at ``ORT_ENABLE_EXTENDED`` and count what it fused.

    Raises `ModelError` (one line, onnxruntime's own first line included) when onnxruntime
    cannot load or optimize the model.
    """
    if isinstance(model, ir.Model):
        source, name = model, model.graph.name or "<model>"
    else:
        from zenith_onnx.modelio import load_model

        source, name = load_model(model), str(model)
    with tempfile.TemporaryDirectory(prefix="zenith-fusion-") as tmp:
        optimized = _optimized_model(model, name, Path(tmp))
    ops: Counter[str] = Counter()
    qdq: Counter[str] = Counter()
    integer: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    fed: dict[str, dict[str, None]] = {}  # op -> reader names, each once
    unnamed: dict[int, int] = {}
    feeding = 0
    moving: Counter[str] = Counter()
    integer_values = _integer_values(optimized)
    for node in optimized.graph.all_nodes():
        op = _op_name(node)
        ops[op] += 1
        if is_integer_op(node.op_type):
            integer[op] += 1
        elif node.op_type in _QDQ:
            qdq[node.op_type] += 1
        elif node.op_type in _DATA_MOVEMENT and node.inputs and node.inputs[0] in integer_values:
            moving[op] += 1
        elif node.op_type not in _NOT_COMPUTE:
            floats[op] += 1
        if node.op_type != "DequantizeLinear":
            continue
        readers = [use.node for use in node.outputs[0].uses() if use.node.op_type != "QuantizeLinear"]
        feeding += bool(readers)
        for reader in readers:
            # onnxruntime leaves the nodes of an inlined function (HardSwish -> HardSigmoid +
            # Mul) unnamed: number them, or they would count as one.
            label = reader.name or f"<unnamed {reader.op_type} {unnamed.setdefault(id(reader), len(unnamed) + 1)}>"
            fed.setdefault(_op_name(reader), {})[label] = None
    logger.debug("%s at ORT_ENABLE_EXTENDED: %s", name, dict(ops))
    warnings = [
        f"Relu '{r}' feeds a 4-bit QuantizeLinear and onnxruntime dropped it at ORT_ENABLE_EXTENDED "
        "(onnxruntime 1.32 bug); outputs at this level differ from ORT_DISABLE_ALL"
        for r in _dropped_relus_before_4bit(source, optimized)
    ]
    return FusionReport(
        model=name,
        level="ORT_ENABLE_EXTENDED",
        ops=dict(sorted(ops.items())),
        integer_ops=dict(sorted(integer.items())),
        float_ops=dict(sorted(floats.items())),
        integer_data_ops=dict(sorted(moving.items())),
        quantize_linear=qdq["QuantizeLinear"],
        dequantize_linear=qdq["DequantizeLinear"],
        float_ops_fed_by_dq={op: sorted(names) for op, names in sorted(fed.items())},
        dq_feeding_float=feeding,
        warnings=warnings,
    )


def fused_counts(model: ir.Model | str | os.PathLike) -> dict:
    """Op counts of the optimized graph by op type (domains merged, e.g.
    ``{'QLinearConv': 8, 'QLinearAdd': 2, 'DequantizeLinear': 1, ...}``) plus
    ``'float_ops_fed_by_dq': {op type: count}``. For tests: assert what fused."""
    report = fusion_report(model)
    counts: Counter[str] = Counter()
    for op, n in report.ops.items():
        counts[op.rpartition("::")[2]] += n
    result: dict = dict(sorted(counts.items()))
    result["float_ops_fed_by_dq"] = {
        op.rpartition("::")[2]: len(names) for op, names in report.float_ops_fed_by_dq.items()
    }
    return result
