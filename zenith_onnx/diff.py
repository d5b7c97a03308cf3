"""Graph diff: structural (stable under renaming and reordering) and, with data, numeric.

Structure. Every value gets a Merkle signature, computed once per node in topological order
(linear in graph size): a graph input is its position, a constant (initializer, Constant
node, tensor attribute) is its dtype, shape and *value class*, and a node output is a hash
of the node's op, domain, attributes (with schema defaults filled in), the signatures of its
inputs and the output index. Subgraphs (If/Loop/Scan bodies) are signed the same way and
enter their node's signature as an attribute; local functions are compared by the
signature of their bodies. Names never enter a signature, so renaming values and nodes or
reordering nodes changes nothing.

Value classes make tolerance work inside a hash: the constants of both models are grouped
by dtype and shape, bitwise-equal ones share a class, and a float constant left without a
partner in the other model joins the class of one within tolerance
(``|a - b| <= atol + rtol * max(|a|, |b|)`` elementwise). Candidates come from two sums of
the values (a plain and a randomly weighted one) that any pair within tolerance must
agree on to a computable bound, so only near pairs get the elementwise check and no pair
within tolerance is missed.

Each node carries three signatures, from strict to loose: F (everything), S (constants by
dtype and shape only) and K (op skeleton: no attributes, constants anonymous). Nodes are
matched as multisets, F first, then S, then K, then by a backward signature (op and
attributes plus the nodes that read the outputs, computed from the graph outputs up).
The models are the same when every node pairs under F and every graph output has the same
F signature, or (tolerance is not transitive, so a class can split near-equal constants)
when every node pairs under S, reads constants within tolerance in the same role and is
wired to the partners of its producers. The looser passes explain differences:

- S pair: a constant read by the node differs beyond tolerance. Reported once per
  constant with the node and input slot that read it (its role, not its name) and the max
  absolute and relative difference.
- K pair: the node's attributes (or a constant's dtype or shape) differ; reported by name.
- backward pair: the node itself is unchanged but reads a changed or new node (counted).
- data-flow pair: what is left is aligned along the data flow, an A node with the first
  unpaired B node of its op that reads the partner of its first computed input, looking
  through a few unpaired nodes (a removed BatchNormalization, an inserted Q/DQ pair); its
  attribute and input changes are reported (a new bias input, a weight now dequantized).
- no pair: the node exists in one model only; reported with what it reads.

A pair whose own attributes and constants are equal differs only through its inputs and
is counted, not listed, so one change is reported once instead of once per node below it.

Numbers. With calibration data both models run in onnxruntime at ``ORT_DISABLE_ALL``;
each output (matched by position) gets max absolute error, max relative error
(``max|a - b| / max|a|`` over all samples) and SQNR in dB. An output differing by more
than ``atol + rtol * max|a|`` makes the models different.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from zenith_onnx.errors import DataError, ModelError, UsageError

__all__ = [
    "diff_models",
    "diff_files",
    "DiffReport",
    "NodeInfo",
    "NodeChange",
    "ValueDiff",
    "PortDiff",
    "OutputError",
    "NumericDiff",
]

logger = logging.getLogger(__name__)

_LIST_LIMIT = 20  # text report: entries shown per section
_Sig = tuple[bytes, bytes, bytes]  # (F, S, K)


def _h(*parts) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


_NONE: _Sig = (b"none",) * 3


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _op(node: ir.Node) -> str:
    domain = _domain(node.domain)
    return f"{domain}::{node.op_type}" if domain else node.op_type


def _node_label(node: ir.Node) -> str:
    return f"{_op(node)} '{node.name}'" if node.name else f"{_op(node)} (unnamed)"


def _type_str(dtype, shape) -> str:
    name = dtype.name.lower() if isinstance(dtype, ir.DataType) else str(dtype or "?")
    if shape is None:
        return f"{name}[?]"
    return f"{name}[{'x'.join(str(d) for d in shape) or 'scalar'}]"


# ------------------------------------------------------------------ report types


@dataclasses.dataclass
class NodeInfo:
    """A node present in one model only."""

    where: str
    name: str
    op: str
    reads: list[str]

    def describe(self) -> str:
        reads = ", ".join(self.reads) if self.reads else "nothing"
        return f"{self.where}{self.op} '{self.name}' reading {reads}"


@dataclasses.dataclass
class NodeChange:
    """A node present in both models whose own attributes or constant types differ."""

    where: str
    op: str
    name_a: str
    name_b: str
    details: list[str]

    def describe(self) -> str:
        names = f"'{self.name_a}'" if self.name_a == self.name_b else f"'{self.name_a}' (B: '{self.name_b}')"
        return f"{self.where}{self.op} {names}: " + "; ".join(self.details)


@dataclasses.dataclass
class ValueDiff:
    """A constant whose values differ beyond tolerance, found by the node slot reading it."""

    name_a: str
    name_b: str
    read_by: str
    type: str
    max_abs: float
    max_rel: float
    elements_differing: int
    elements: int


@dataclasses.dataclass
class PortDiff:
    """A graph input or output that differs in type or is missing on one side."""

    kind: str  # "input" or "output"
    position: int
    name_a: str | None
    name_b: str | None
    type_a: str | None
    type_b: str | None
    problem: str


@dataclasses.dataclass
class OutputError:
    position: int
    name_a: str
    name_b: str
    max_abs: float
    max_rel: float
    sqnr_db: float
    same: bool
    problem: str = ""


@dataclasses.dataclass
class NumericDiff:
    data: str
    samples: int
    outputs: list[OutputError]

    @property
    def same(self) -> bool:
        return all(o.same for o in self.outputs)


@dataclasses.dataclass
class DiffReport:
    """What differs between models A and B. ``same`` decides the exit code of `diff`."""

    a: str
    b: str
    rtol: float
    atol: float
    ir_version: tuple[int, int]
    opsets: tuple[dict[str, int], dict[str, int]]
    nodes: tuple[int, int]
    opset_differences: list[str] = dataclasses.field(default_factory=list)
    ports: list[PortDiff] = dataclasses.field(default_factory=list)
    op_counts: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    only_in_a: list[NodeInfo] = dataclasses.field(default_factory=list)
    only_in_b: list[NodeInfo] = dataclasses.field(default_factory=list)
    changed: list[NodeChange] = dataclasses.field(default_factory=list)
    values: list[ValueDiff] = dataclasses.field(default_factory=list)
    outputs_computed_differently: list[str] = dataclasses.field(default_factory=list)
    functions: list[str] = dataclasses.field(default_factory=list)
    rewired: int = 0  # unchanged nodes that read a changed or new node
    downstream: int = 0  # nodes that differ only through what they read
    structurally_same: bool = True
    numeric: NumericDiff | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.structurally_same and (self.numeric is None or self.numeric.same)

    def summary(self) -> str:
        parts = []
        for count, one, many in (
            (len(self.opset_differences), "opset difference", "opset differences"),
            (len(self.ports), "input/output difference", "input/output differences"),
            (len(self.only_in_a), "node only in A", "nodes only in A"),
            (len(self.only_in_b), "node only in B", "nodes only in B"),
            (len(self.changed), "changed node", "changed nodes"),
            (len(self.values), "constant differing in value", "constants differing in value"),
            (len(self.outputs_computed_differently), "output computed differently", "outputs computed differently"),
            (len(self.functions), "function difference", "function differences"),
        ):
            if count:
                parts.append(f"{count} {one if count == 1 else many}")
        if self.numeric is not None and not self.numeric.same:
            bad = sum(not o.same for o in self.numeric.outputs)
            parts.append(f"{bad} output{'' if bad == 1 else 's'} numerically different")
        if not parts and not self.structurally_same:
            parts.append("graphs differ")
        return "SAME" if self.same else "DIFFERENT: " + ", ".join(parts)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["same"] = self.same
        data["summary"] = self.summary()
        data["op_counts"] = {op: {"a": a, "b": b} for op, (a, b) in self.op_counts.items()}
        if self.numeric is not None:
            data["numeric"]["same"] = self.numeric.same
        return _finite(data)

    def format(self) -> str:
        lines = [f"A: {self.a}", f"B: {self.b}", f"result: {self.summary()}", ""]
        lines.append(f"{'':<20}{'A':>10}{'B':>10}")
        lines.append(f"{'ir_version':<20}{self.ir_version[0]:>10}{self.ir_version[1]:>10}")
        for domain in sorted(set(self.opsets[0]) | set(self.opsets[1])):
            label = f"opset {domain or 'ai.onnx'}"
            lines.append(f"{label:<20}{self.opsets[0].get(domain, '-'):>10}{self.opsets[1].get(domain, '-'):>10}")
        lines.append(f"{'nodes':<20}{self.nodes[0]:>10}{self.nodes[1]:>10}")
        _section(lines, "opsets that differ:", self.opset_differences)
        _section(lines, "inputs/outputs that differ:", [_port_line(p) for p in self.ports])
        if self.op_counts:
            lines += ["", "op counts that differ:", f"  {'op':<28}{'A':>6}{'B':>6}"]
            lines += [f"  {op:<28}{a:>6}{b:>6}" for op, (a, b) in sorted(self.op_counts.items())]
        _section(lines, "nodes only in A:", [n.describe() for n in self.only_in_a])
        _section(lines, "nodes only in B:", [n.describe() for n in self.only_in_b])
        _section(lines, "changed nodes:", [c.describe() for c in self.changed])
        if self.values:
            lines += ["", f"constants that differ beyond rtol={self.rtol:g}, atol={self.atol:g} "
                      "(matched by the node input that reads them):"]
            for v in self.values[:_LIST_LIMIT]:
                names = v.name_a if v.name_a == v.name_b else f"{v.name_a} / {v.name_b}"
                lines.append(
                    f"  {names} -> {v.read_by}: {v.type}, max abs {v.max_abs:.3g}, max rel {v.max_rel:.3g}, "
                    f"{v.elements_differing}/{v.elements} elements beyond tolerance"
                )
            _more(lines, self.values)
        _section(lines, "outputs computed differently:", self.outputs_computed_differently)
        _section(lines, "functions:", self.functions)
        if self.rewired or self.downstream:
            count = self.rewired + self.downstream
            what = "1 more node differs only in what it reads" if count == 1 else (
                f"{count} more nodes differ only in what they read")
            lines += ["", f"{what} (downstream of the changes above)"]
        if self.numeric is not None:
            n = self.numeric
            lines += ["", f"numeric ({n.samples} samples from {n.data}, onnxruntime ORT_DISABLE_ALL):",
                      f"  {'output':<24}{'max abs':>11}{'max rel':>11}{'SQNR dB':>10}  verdict"]
            for o in n.outputs:
                name = o.name_a if o.name_a == o.name_b else f"{o.name_a}/{o.name_b}"
                verdict = "same" if o.same else (o.problem or "DIFFERENT")
                lines.append(f"  {name:<24}{o.max_abs:>11.3g}{o.max_rel:>11.3g}{o.sqnr_db:>10.1f}  {verdict}")
        _section(lines, "notes:", self.notes)
        return "\n".join(lines)


def _finite(data):
    """JSON has no NaN or infinity: they become null (an infinite SQNR means identical
    outputs; NaN means not comparable, e.g. shapes differ)."""
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def _port_line(p: PortDiff) -> str:
    name = p.name_a if p.name_a == p.name_b or p.name_b is None else f"{p.name_a}/{p.name_b}" if p.name_a else p.name_b
    types = f"{p.type_a or '-'} vs {p.type_b or '-'}"
    return f"{p.kind} #{p.position} '{name}': {p.problem} ({types})"


def _section(lines: list[str], title: str, items: Sequence[str]) -> None:
    if not items:
        return
    lines += ["", title]
    lines += [f"  {item}" for item in items[:_LIST_LIMIT]]
    _more(lines, items)


def _more(lines: list[str], items: Sequence) -> None:
    if len(items) > _LIST_LIMIT:
        lines.append(f"  ... and {len(items) - _LIST_LIMIT} more (--json lists all)")


# ------------------------------------------------------------------ constants


@dataclasses.dataclass(eq=False)
class _Const:
    side: int
    name: str
    dtype: ir.DataType
    array: np.ndarray
    cls: int = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @functools.cached_property
    def digest(self) -> bytes:
        if self.array.dtype == object:
            data = repr(self.array.tolist()).encode()
        else:
            data = np.ascontiguousarray(self.array).tobytes()
        return hashlib.blake2b(data, digest_size=16).digest()

    @functools.cached_property
    def floats(self) -> np.ndarray:
        return self.array.astype(np.float64).ravel()

    @property
    def type(self) -> str:
        return _type_str(self.dtype, self.shape)


_CONSTANT_ATTRS = {
    "value_float": (ir.DataType.FLOAT, np.float32),
    "value_floats": (ir.DataType.FLOAT, np.float32),
    "value_int": (ir.DataType.INT64, np.int64),
    "value_ints": (ir.DataType.INT64, np.int64),
}


def _constant_node_value(node: ir.Node) -> tuple[ir.DataType, np.ndarray] | None:
    """The tensor a Constant node produces, when it is given directly (not a sparse
    tensor, not a reference to a function attribute)."""
    if node.op_type != "Constant" or _domain(node.domain) or len(node.attributes) != 1:
        return None
    ((name, attr),) = node.attributes.items()
    if attr.is_ref():
        return None
    if name == "value":
        tensor = attr.as_tensor()
        return tensor.dtype, tensor.numpy()
    if name in _CONSTANT_ATTRS:
        dtype, np_dtype = _CONSTANT_ATTRS[name]
        return dtype, np.asarray(attr.value, dtype=np_dtype)
    if name in ("value_string", "value_strings"):
        return ir.DataType.STRING, np.asarray(attr.value, dtype=object)
    return None


def _graphs(model: ir.Model) -> Iterable[ir.Graph | ir.Function]:
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function
        yield from function.subgraphs()


def _collect_constants(model: ir.Model, side: int):
    """Constants of every graph: {value: _Const} for initializers and Constant outputs,
    {(node, attribute): [_Const]} for tensor attributes of other nodes."""
    values: dict[ir.Value, _Const] = {}
    attrs: dict[tuple[ir.Node, str], list[_Const]] = {}
    for graph in _graphs(model):
        if isinstance(graph, ir.Graph):
            for value in graph.initializers.values():
                if value.const_value is not None:
                    tensor = value.const_value
                    values[value] = _Const(side, value.name, tensor.dtype, tensor.numpy())
        for node in graph:
            constant = _constant_node_value(node)
            if constant is not None:
                out = node.outputs[0]
                values[out] = _Const(side, out.name or node.name, constant[0], constant[1])
                continue
            for name, attr in node.attributes.items():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR:
                    tensors = [attr.as_tensor()]
                elif attr.type == ir.AttributeType.TENSORS:
                    tensors = list(attr.as_tensors())
                else:
                    continue
                label = f"{name} of {_node_label(node)}"
                attrs[(node, name)] = [_Const(side, label, t.dtype, t.numpy()) for t in tensors]
    return values, attrs


def _close(a: _Const, b: _Const, rtol: float, atol: float) -> np.ndarray:
    """Elementwise: within ``atol + rtol * max(|a|, |b|)`` (NaN equals NaN, inf equals inf)."""
    x, y = a.floats, b.floats
    with np.errstate(invalid="ignore", over="ignore"):
        return (np.abs(x - y) <= atol + rtol * np.maximum(np.abs(x), np.abs(y))) | (x == y) | (
            np.isnan(x) & np.isnan(y)
        )


def _value_error(a: _Const, b: _Const, rtol: float, atol: float) -> tuple[float, float, int]:
    """(max |a - b|, max |a - b| / max |a|, elements beyond tolerance)."""
    if a.dtype == ir.DataType.STRING or b.dtype == ir.DataType.STRING:
        differing = int(np.sum(a.array.ravel() != b.array.ravel()))
        return float("nan"), float("nan"), differing
    x, y = a.floats, b.floats
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(x - y)
        max_abs = float(np.nanmax(err)) if err.size and not np.all(np.isnan(err)) else 0.0
        scale = float(np.nanmax(np.abs(x))) if x.size and not np.all(np.isnan(x)) else 0.0
    differing = int(np.sum(~_close(a, b, rtol, atol)))
    return max_abs, (max_abs / scale if scale > 0 else max_abs), differing


def _assign_classes(consts: Iterable[_Const], rtol: float, atol: float) -> None:
    """Give every constant a class: bitwise-equal ones share one; a float constant of one
    side with no equal on the other joins a class of the other side within tolerance."""
    groups: dict[tuple, list[_Const]] = collections.defaultdict(list)
    for c in consts:
        groups[(c.dtype, c.shape)].append(c)
    next_class = 0
    for (dtype, _), members in groups.items():
        classes: dict[bytes, int] = {}
        for c in members:
            if c.digest not in classes:
                classes[c.digest] = next_class
                next_class += 1
            c.cls = classes[c.digest]
        if not dtype.is_floating_point() or (rtol == 0 and atol == 0) or len(classes) < 2:
            continue
        sides: dict[int, set[int]] = collections.defaultdict(set)
        first: dict[int, _Const] = {}
        for c in members:
            sides[c.cls].add(c.side)
            first.setdefault(c.cls, c)
        only_a = [first[k] for k, s in sides.items() if s == {0}]
        only_b = [first[k] for k, s in sides.items() if s == {1}]
        if only_a and only_b:
            merged = _close_classes(only_a, only_b, rtol, atol)
            for c in members:
                c.cls = merged.get(c.cls, c.cls)


def _close_classes(only_a: list[_Const], only_b: list[_Const], rtol: float, atol: float) -> dict[int, int]:
    """{class of a B constant: class of an A constant within tolerance}.

    For ``|a - b| <= atol + rtol * max(|a|, |b|)`` elementwise and weights ``|w| <= 1``,
    ``|sum(w a) - sum(w b)| <= n atol + rtol (sum|a| + sum|b|)``, and ``sum|a|`` is bounded
    by ``sum|b|``; so sorting A by ``sum(a)`` and bisecting finds every candidate, and a
    second, randomly weighted sum discards most false ones before the elementwise check.
    """
    n = only_a[0].floats.size
    weights = np.random.default_rng(n).uniform(-1.0, 1.0, n)

    def stats(c: _Const) -> tuple[float, float, float]:
        x = c.floats
        return float(np.sum(x)), float(np.dot(x, weights)), float(np.sum(np.abs(x)))

    a_stats = sorted(((*stats(c), c) for c in only_a), key=lambda t: t[0])
    a_sums = [t[0] for t in a_stats]
    candidates: list[tuple[float, int, int]] = []
    for b in only_b:
        s1, s2, mass = stats(b)
        if not (math.isfinite(s1) and math.isfinite(s2)):
            continue
        if rtol >= 1:
            bound = math.inf
        else:
            mass_a = (mass * (1 + rtol) + n * atol) / (1 - rtol)
            bound = n * atol + rtol * (mass + mass_a)
            bound += 1e-9 * (mass + mass_a) + 1e-300  # float summation slack
        lo = bisect.bisect_left(a_sums, s1 - bound)
        hi = bisect.bisect_right(a_sums, s1 + bound)
        for _, a2, _, a in a_stats[lo:hi]:
            if abs(a2 - s2) <= bound and bool(np.all(_close(a, b, rtol, atol))):
                candidates.append((float(np.max(np.abs(a.floats - b.floats), initial=0.0)), a.cls, b.cls))
    # Tolerance is not transitive: one B constant can be near several A constants. Pair
    # one to one, nearest first; `_Differ.match` checks the rest by role.
    merged: dict[int, int] = {}
    taken: set[int] = set()
    for _, a_cls, b_cls in sorted(candidates):
        if b_cls not in merged and a_cls not in taken:
            merged[b_cls] = a_cls
            taken.add(a_cls)
    return merged


# ------------------------------------------------------------------ signatures


@functools.lru_cache(maxsize=None)
def _schema_defaults(domain: str, op_type: str, version: int) -> dict[str, ir.Attr]:
    """Attributes an op's schema gives a default, so an explicit default equals an absent one."""
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return {}
    defaults = {}
    for name, attr in schema.attributes.items():
        if attr.default_value.type != onnx.AttributeProto.UNDEFINED:
            defaults[name] = ir.serde.deserialize_attribute(attr.default_value)
    return defaults


def _plain(value):
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return value


def _display(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_display(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


class _Signer:
    """Signatures (F, S, K) of every value and node of one model, in topological order."""

    def __init__(self, model: ir.Model, consts: dict[ir.Value, _Const], attr_consts: dict, label: str):
        self.model = model
        self.consts = consts
        self.attr_consts = attr_consts
        self.label = label
        self.opsets = {_domain(d): v for d, v in model.opset_imports.items()}
        self.sig: dict[ir.Value, _Sig] = {}
        self.node_sig: dict[ir.Node, _Sig] = {}
        self.local: dict[ir.Node, bytes] = {}
        self.attrs: dict[ir.Node, dict[str, tuple]] = {}
        self.order: dict[object, list[ir.Node]] = {}
        self.graph_sig: dict[object, _Sig] = {}
        self.subgraph_of: dict[tuple[ir.Node, str], list[ir.Graph]] = {}
        self._signed: set[ir.Node] = set()

    # -- graphs

    def sign_graph(self, graph: ir.Graph | ir.Function, depth: int) -> _Sig:
        inputs = [v for v in graph.inputs if v not in self.consts]
        for i, value in enumerate(inputs):
            self.sig[value] = (_h("in", depth, i),) * 3
        nodes: list[ir.Node] = []
        self.order[graph] = nodes
        for node in graph:
            self._ensure(node, depth, nodes)
        outs = [self.value_sig(v) for v in graph.outputs]
        params = tuple(sorted(graph.attributes)) if isinstance(graph, ir.Function) else ()
        sig = tuple(
            _h("graph", len(inputs), params, tuple(sorted(self.node_sig[n][k] for n in nodes)), tuple(o[k] for o in outs))
            for k in range(3)
        )
        self.graph_sig[graph] = sig
        return sig

    def value_sig(self, value: ir.Value | None) -> _Sig:
        if value is None:
            return _NONE
        sig = self.sig.get(value)
        if sig is not None:
            return sig
        const = self.consts.get(value)
        if const is not None:
            sig = _const_sigs(const)
        else:  # read but defined nowhere (load_model refuses such models)
            sig = (_h("undefined", value.name),) * 3
        self.sig[value] = sig
        return sig

    # -- nodes

    def _deps(self, node: ir.Node) -> list[ir.Node]:
        deps = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        for attr in node.attributes.values():
            if attr.is_ref() or attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                continue
            inner = set()
            for g in attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else [attr.as_graph()]:
                inner.add(g)
                inner.update(g.subgraphs())
            for g in inner:
                for n in g:
                    for v in n.inputs:
                        p = v.producer() if v is not None else None
                        if p is not None and p.graph not in inner:
                            deps.append(p)
        return deps

    def _ensure(self, node: ir.Node, depth: int, nodes: list[ir.Node]) -> None:
        if node in self._signed:
            return
        stack = [(node, iter(self._deps(node)))]
        active = {node}
        while stack:
            current, deps = stack[-1]
            for dep in deps:
                if dep in self._signed:
                    continue
                if dep in active:
                    raise ModelError(f"{self.label}: the graph has a cycle through {_node_label(dep)}")
                active.add(dep)
                stack.append((dep, iter(self._deps(dep))))
                break
            else:
                stack.pop()
                active.discard(current)
                self._sign_node(current, depth, nodes)
                self._signed.add(current)

    def _attr_sigs(self, node: ir.Node, depth: int) -> dict[str, tuple]:
        """{name: (F repr, S repr, display)} with schema defaults filled in."""
        domain = _domain(node.domain)
        items = dict(_schema_defaults(domain, node.op_type, self.opsets.get(domain, 0)) if domain in ("", "ai.onnx.ml") else {})
        items.update(node.attributes)
        out = {}
        for name in sorted(items):
            attr = items[name]
            kind = attr.type
            if attr.is_ref():
                f = s = ("ref", attr.ref_attr_name, kind.name)
                shown = f"@{attr.ref_attr_name}"
            elif kind in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                consts = self.attr_consts[(node, name)]
                f = ("tensor", tuple((c.dtype, c.shape, c.cls) for c in consts))
                s = ("tensor", tuple((c.dtype, c.shape) for c in consts))
                shown = ", ".join(c.type for c in consts)
            elif kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs = list(attr.as_graphs()) if kind == ir.AttributeType.GRAPHS else [attr.as_graph()]
                self.subgraph_of[(node, name)] = graphs
                sigs = [self.sign_graph(g, depth + 1) for g in graphs]
                f = ("graph", tuple(g[0] for g in sigs))
                s = ("graph", tuple(g[1] for g in sigs))
                shown = "<subgraph>"
            elif kind in (
                ir.AttributeType.FLOAT, ir.AttributeType.INT, ir.AttributeType.STRING,
                ir.AttributeType.FLOATS, ir.AttributeType.INTS, ir.AttributeType.STRINGS,
            ):
                f = s = (kind.name, _plain(attr.value))
                shown = _display(attr.value)
            else:
                f = s = (kind.name, str(attr.value))
                shown = str(attr.value)
            out[name] = (f, s, shown)
        return out

    def _sign_node(self, node: ir.Node, depth: int, nodes: list[ir.Node]) -> None:
        if node.outputs and node.outputs[0] in self.consts and _constant_node_value(node) is not None:
            self.value_sig(node.outputs[0])  # a Constant node is a leaf, not a node to match
            return
        attrs = self._attr_sigs(node, depth)
        self.attrs[node] = attrs
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        outputs = list(node.outputs)
        while len(outputs) > 1 and not outputs[-1].uses() and not outputs[-1].is_graph_output():
            outputs.pop()  # unused trailing outputs (a Dropout mask) do not change the computation
        ins = [self.value_sig(v) for v in inputs]
        op = (_domain(node.domain), node.op_type, node.overload)
        f_attrs = tuple((k, v[0]) for k, v in attrs.items())
        s_attrs = tuple((k, v[1]) for k, v in attrs.items())
        f = _h(op, f_attrs, tuple(i[0] for i in ins), len(outputs))
        s = _h(op, s_attrs, tuple(i[1] for i in ins), len(outputs))
        k = _h(op, tuple(i[2] for i in ins), len(outputs))
        self.node_sig[node] = (f, s, k)
        self.local[node] = _h(op, s_attrs, len(inputs), len(outputs))
        for index, value in enumerate(node.outputs):
            self.sig[value] = (_h(f, index), _h(s, index), _h(k, index))
        nodes.append(node)

    def backward(self, graph) -> dict[ir.Node, bytes]:
        """Signature of each node from the graph outputs up: op, attributes and the
        backward signatures of the nodes (and graph outputs) that read it."""
        nodes = self.order[graph]
        output_positions: dict[ir.Value, list[int]] = collections.defaultdict(list)
        for i, value in enumerate(graph.outputs):
            output_positions[value].append(i)
        sigs: dict[ir.Node, bytes] = {}
        for node in reversed(nodes):
            parts = []
            for index, value in enumerate(node.outputs):
                for use in value.uses():
                    reader = sigs.get(use.node)
                    parts.append((index, use.idx, reader if reader is not None else use.node.op_type))
                parts.extend((index, "output", p) for p in output_positions.get(value, ()))
            sigs[node] = _h(self.local[node], tuple(sorted(parts, key=repr)))
        return sigs


def _const_sigs(c: _Const) -> _Sig:
    return (_h("const", c.dtype, c.shape, c.cls), _h("const", c.dtype, c.shape), _h("const"))


# ------------------------------------------------------------------ matching


def _pair(left_a, left_b, key_a, key_b, pref_a=None, pref_b=None):
    """Pair nodes with equal keys (first those whose ``pref`` keys also agree), in order."""
    pairs = []
    for use_pref in ((True, False) if pref_a is not None else (False,)):
        buckets: dict = collections.defaultdict(collections.deque)
        for nb in left_b:
            buckets[(key_b(nb), pref_b(nb)) if use_pref else key_b(nb)].append(nb)
        rest_a, taken = [], set()
        for na in left_a:
            bucket = buckets.get((key_a(na), pref_a(na)) if use_pref else key_a(na))
            if bucket:
                nb = bucket.popleft()
                taken.add(nb)
                pairs.append((na, nb))
            else:
                rest_a.append(na)
        left_a = rest_a
        left_b = [nb for nb in left_b if nb not in taken]
    return pairs, left_a, left_b


class _Differ:
    def __init__(self, model_a: ir.Model, model_b: ir.Model, report: DiffReport, rtol: float, atol: float):
        self.report = report
        self.rtol, self.atol = rtol, atol
        consts_a, attrs_a = _collect_constants(model_a, 0)
        consts_b, attrs_b = _collect_constants(model_b, 1)
        every = [*consts_a.values(), *consts_b.values(), *(c for cs in attrs_a.values() for c in cs),
                 *(c for cs in attrs_b.values() for c in cs)]
        _assign_classes(every, rtol, atol)
        logger.debug("%d constants in %d value classes", len(every), len({c.cls for c in every}))
        self.a = _Signer(model_a, consts_a, attrs_a, report.a)
        self.b = _Signer(model_b, consts_b, attrs_b, report.b)
        self.seen_values: set[tuple[int, int]] = set()

    def run(self, model_a: ir.Model, model_b: ir.Model) -> None:
        self.a.sign_graph(model_a.graph, 0)
        self.b.sign_graph(model_b.graph, 0)
        same = self.match(model_a.graph, model_b.graph, "")
        self.report.structurally_same = self.report.structurally_same and same
        self._compare_functions(model_a, model_b)

    def _same_value(self, va: ir.Value | None, vb: ir.Value | None, pairing: dict) -> bool:
        """``va`` and ``vb`` hold the same: equal F signature, constants within tolerance,
        or the same output of paired nodes."""
        if va is None or vb is None:
            return va is vb
        if self.a.value_sig(va)[0] == self.b.value_sig(vb)[0]:
            return True
        ca, cb = self.a.consts.get(va), self.b.consts.get(vb)
        if ca is not None and cb is not None:
            return (ca.dtype, ca.shape) == (cb.dtype, cb.shape) and bool(np.all(_close(ca, cb, self.rtol, self.atol)))
        pa, pb = va.producer(), vb.producer()
        return pa is not None and pb is not None and pairing.get(pa) is pb and va.index() == vb.index()

    def _wired_alike(self, na: ir.Node, nb: ir.Node, pairing: dict) -> bool:
        inputs_a, inputs_b = list(na.inputs), list(nb.inputs)
        while inputs_a and inputs_a[-1] is None:
            inputs_a.pop()
        while inputs_b and inputs_b[-1] is None:
            inputs_b.pop()
        if len(inputs_a) != len(inputs_b):
            return False
        return all(self._same_value(va, vb, pairing) for va, vb in zip(inputs_a, inputs_b))

    def _compare_outputs(self, graph_a, graph_b, where: str, pairing: dict) -> bool:
        """True when every output pair holds the same value (see `_same_value`); lists
        the ones that differ (all nodes pair, so the outputs were swapped or rewired)."""
        same = True
        position_b = {self.b.value_sig(v)[0]: j for j, v in enumerate(graph_b.outputs)}
        for i, (va, vb) in enumerate(zip(graph_a.outputs, graph_b.outputs)):
            if self._same_value(va, vb, pairing):
                continue
            same = False
            j = position_b.get(self.a.value_sig(va)[0])
            if j is not None:
                why = f"is computed like B's output #{j} '{graph_b.outputs[j].name}' (outputs reordered)"
            else:
                why = f"comes from {_source(va)} in A but from {_source(vb)} in B"
            self.report.outputs_computed_differently.append(f"{where}output #{i} '{va.name}' {why}")
        return same

    def match(self, graph_a, graph_b, where: str) -> bool:
        """Pair the nodes of two graphs and record what differs; True when the graphs
        compute the same (outputs included)."""
        sa, sb = self.a, self.b
        left_a, left_b = sa.order[graph_a], sb.order[graph_b]
        f_pairs, left_a, left_b = _pair(left_a, left_b, lambda n: sa.node_sig[n][0], lambda n: sb.node_sig[n][0])
        if not left_a and not left_b:
            return self._compare_outputs(graph_a, graph_b, where, dict(f_pairs))
        back_a, back_b = sa.backward(graph_a), sb.backward(graph_b)
        s_pairs, left_a, left_b = _pair(
            left_a, left_b, lambda n: sa.node_sig[n][1], lambda n: sb.node_sig[n][1], back_a.get, back_b.get
        )
        k_pairs, left_a, left_b = _pair(
            left_a, left_b, lambda n: sa.node_sig[n][2], lambda n: sb.node_sig[n][2], back_a.get, back_b.get
        )
        r_pairs, left_a, left_b = _pair(
            left_a, left_b, lambda n: (sa.local[n], back_a[n]), lambda n: (sb.local[n], back_b[n])
        )
        aligned, left_a, left_b = self._align(
            graph_a, graph_b, [*f_pairs, *s_pairs, *k_pairs, *r_pairs], left_a, left_b
        )
        local = [self._local_differences(na, nb, where) for na, nb in [*s_pairs, *k_pairs, *aligned]]
        if not (k_pairs or r_pairs or aligned or left_a or left_b or any(local)):
            # Every node pairs by structure and reads constants within tolerance by role:
            # the same graph if the pairs are wired alike (F differed only because
            # tolerance classes are not transitive).
            pairing = dict([*f_pairs, *s_pairs])
            if all(self._wired_alike(na, nb, pairing) for na, nb in s_pairs):
                return self._compare_outputs(graph_a, graph_b, where, pairing)
        self.report.downstream += local.count(False)
        self.report.rewired += len(r_pairs)
        self.report.only_in_a += [_node_info(n, where, sa) for n in left_a]
        self.report.only_in_b += [_node_info(n, where, sb) for n in left_b]
        return False

    def _align(self, graph_a, graph_b, pairs, left_a, left_b):
        """Pair what the signatures could not by following the data flow: an A node pairs
        with the first unpaired B node of its op reading (through at most a few unpaired
        nodes, e.g. a removed BatchNormalization or an inserted Q/DQ) the partner of its
        first computed input. Explains differences only; the verdict is already known."""
        sa, sb = self.a, self.b
        partner: dict[ir.Value, ir.Value] = {}
        inputs_a = [v for v in graph_a.inputs if v not in sa.consts]
        inputs_b = [v for v in graph_b.inputs if v not in sb.consts]
        partner.update(zip(inputs_a, inputs_b))
        for na, nb in pairs:
            partner.update(zip(na.outputs, nb.outputs))
        unpaired_a, unpaired_b = set(left_a), set(left_b)

        def anchor(node: ir.Node, depth: int = 0) -> ir.Value | None:
            value = next((v for v in _inputs(node) if v is not None and v not in sa.consts), None)
            if value is None or value in partner:
                return partner.get(value) if value is not None else None
            producer = value.producer()
            return anchor(producer, depth + 1) if producer in unpaired_a and depth < 3 else None

        aligned = []
        for na in left_a:
            start = anchor(na)
            frontier, found = [start] if start is not None else [], None
            for _ in range(4):
                readers = [u.node for v in frontier for u in v.uses() if u.node in unpaired_b]
                found = next((n for n in readers if (n.domain, n.op_type) == (na.domain, na.op_type)), None)
                if found is not None or not readers:
                    break
                frontier = [v for n in readers for v in n.outputs]
            if found is not None:
                aligned.append((na, found))
                unpaired_a.discard(na)
                unpaired_b.discard(found)
                partner.update(zip(na.outputs, found.outputs))
        return aligned, [n for n in left_a if n in unpaired_a], [n for n in left_b if n in unpaired_b]

    def _local_differences(self, na: ir.Node, nb: ir.Node, where: str) -> bool:
        """Record what differs in the node itself; False when it differs only through inputs."""
        details = []
        found_values = False
        attrs_a, attrs_b = self.a.attrs[na], self.b.attrs[nb]
        for name in sorted(set(attrs_a) | set(attrs_b)):
            fa, sa_, shown_a = attrs_a.get(name, (None, None, "absent"))
            fb, sb_, shown_b = attrs_b.get(name, (None, None, "absent"))
            if fa == fb:
                continue
            graphs_a = self.a.subgraph_of.get((na, name))
            graphs_b = self.b.subgraph_of.get((nb, name))
            if graphs_a and graphs_b and len(graphs_a) == len(graphs_b):
                inner = f"{where}{_node_label(na)} {name}: "
                for ga, gb in zip(graphs_a, graphs_b):
                    found_values |= not self.match(ga, gb, inner)
                continue
            consts_a = self.a.attr_consts.get((na, name))
            consts_b = self.b.attr_consts.get((nb, name))
            if consts_a and consts_b and sa_ == sb_:
                for ca, cb in zip(consts_a, consts_b):
                    found_values |= self._value_diff(ca, cb, f"{where}{_node_label(na)} attribute {name}")
                continue
            details.append(f"attribute {name}: {shown_a} -> {shown_b}")
        inputs_a, inputs_b = _inputs(na), _inputs(nb)
        for slot in range(max(len(inputs_a), len(inputs_b))):
            va = inputs_a[slot] if slot < len(inputs_a) else None
            vb = inputs_b[slot] if slot < len(inputs_b) else None
            ca = self.a.consts.get(va) if va is not None else None
            cb = self.b.consts.get(vb) if vb is not None else None
            if va is None or vb is None or (ca is None) != (cb is None):
                if va is not None or vb is not None:
                    details.append(f"input {slot}: {_input_text(va, ca)} -> {_input_text(vb, cb)}")
                continue
            if ca is None or cb is None or ca.cls == cb.cls:
                continue
            if (ca.dtype, ca.shape) != (cb.dtype, cb.shape):
                details.append(f"input {slot} '{va.name}': {ca.type} -> {cb.type}")
            else:
                found_values |= self._value_diff(ca, cb, f"{where}{_node_label(na)} input {slot}")
        if details:
            self.report.changed.append(NodeChange(where, _op(na), na.name or "", nb.name or "", details))
        return bool(details) or found_values

    def _value_diff(self, ca: _Const, cb: _Const, read_by: str) -> bool:
        """Record ``ca`` vs ``cb`` if they differ beyond tolerance (once per pair)."""
        max_abs, max_rel, differing = _value_error(ca, cb, self.rtol, self.atol)
        if not differing:
            return False
        key = (id(ca), id(cb))
        if key not in self.seen_values:
            self.seen_values.add(key)
            self.report.values.append(
                ValueDiff(ca.name, cb.name, read_by, ca.type, max_abs, max_rel, differing, ca.array.size)
            )
        return True

    def _compare_functions(self, model_a: ir.Model, model_b: ir.Model) -> None:
        used = {(_domain(n.domain), n.op_type, n.overload) for m in (model_a, model_b) for n in _all_nodes(m)}
        funcs_a = {(_domain(k[0]), k[1], k[2]): f for k, f in model_a.functions.items()}
        funcs_b = {(_domain(k[0]), k[1], k[2]): f for k, f in model_b.functions.items()}
        for key in sorted(set(funcs_a) | set(funcs_b)):
            name = "::".join(filter(None, key[:2])) + (f":{key[2]}" if key[2] else "")
            fa, fb = funcs_a.get(key), funcs_b.get(key)
            if fa is None or fb is None:
                problem = f"function {name} only in {'A' if fb is None else 'B'}"
            elif self.a.sign_graph(fa, 0)[0] != self.b.sign_graph(fb, 0)[0]:
                problem = f"function {name} has a different body"
            else:
                continue
            if key in used:
                self.report.functions.append(problem)
                self.report.structurally_same = False
            else:
                self.report.notes.append(problem + " (not called)")


def _inputs(node: ir.Node) -> list[ir.Value | None]:
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _input_text(value: ir.Value | None, const: _Const | None) -> str:
    if value is None:
        return "absent"
    if const is not None:
        return f"constant {value.name} {const.type}"
    producer = value.producer()
    return f"{value.name} from {_node_label(producer)}" if producer is not None else f"graph input {value.name}"


def _all_nodes(model: ir.Model) -> Iterable[ir.Node]:
    for graph in _graphs(model):
        yield from graph


def _source(value: ir.Value) -> str:
    producer = value.producer()
    if producer is not None:
        return _node_label(producer)
    return "a graph input" if value.is_graph_input() else "a constant" if value.is_initializer() else "nothing"


def _node_info(node: ir.Node, where: str, signer: _Signer) -> NodeInfo:
    reads = []
    for value in node.inputs:
        if value is None:
            continue
        const = signer.consts.get(value)
        if const is not None:
            reads.append(f"{value.name} (constant {const.type})")
        elif value.producer() is not None:
            reads.append(f"{value.name} (from {_node_label(value.producer())})")
        else:
            reads.append(f"{value.name} (graph input)")
    return NodeInfo(where=where, name=node.name or "", op=_op(node), reads=reads)


# ------------------------------------------------------------------ ports, opsets, op counts


def _dims(shape) -> tuple | None:
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value or "?") for d in shape)


def _compare_ports(model_a: ir.Model, model_b: ir.Model, report: DiffReport, consts: tuple) -> None:
    for kind, values_a, values_b in (
        ("input", [v for v in model_a.graph.inputs if v not in consts[0]], [v for v in model_b.graph.inputs if v not in consts[1]]),
        ("output", list(model_a.graph.outputs), list(model_b.graph.outputs)),
    ):
        for i in range(max(len(values_a), len(values_b))):
            va = values_a[i] if i < len(values_a) else None
            vb = values_b[i] if i < len(values_b) else None
            type_a = _type_str(va.dtype, _dims(va.shape)) if va is not None else None
            type_b = _type_str(vb.dtype, _dims(vb.shape)) if vb is not None else None
            if va is None or vb is None:
                problem = f"only in {'A' if vb is None else 'B'}"
                report.ports.append(PortDiff(kind, i, va and va.name, vb and vb.name, type_a, type_b, problem))
                continue
            dims_a, dims_b = _dims(va.shape), _dims(vb.shape)
            anonymous = lambda dims: None if dims is None else tuple(d if isinstance(d, int) else "?" for d in dims)  # noqa: E731
            if va.dtype != vb.dtype or anonymous(dims_a) != anonymous(dims_b):
                problem = "dtype differs" if va.dtype != vb.dtype else "shape differs"
                report.ports.append(PortDiff(kind, i, va.name, vb.name, type_a, type_b, problem))
            elif dims_a != dims_b:
                report.notes.append(f"{kind} #{i} '{va.name}': symbolic dims renamed ({type_a} vs {type_b})")
            if va.name != vb.name:
                report.notes.append(f"{kind} #{i} renamed: '{va.name}' -> '{vb.name}'")


def _compare_opsets(model_a: ir.Model, model_b: ir.Model, report: DiffReport) -> None:
    used = {_domain(n.domain) for m in (model_a, model_b) for n in _all_nodes(m)}
    a, b = report.opsets
    for domain in sorted(set(a) | set(b)):
        if a.get(domain) == b.get(domain):
            continue
        line = f"{domain or 'ai.onnx'}: {a.get(domain, '-')} vs {b.get(domain, '-')}"
        if domain == "" or domain in used:
            report.opset_differences.append(line)
        else:
            report.notes.append(f"opset {line} (domain not used)")
    if model_a.ir_version != model_b.ir_version:
        report.notes.append(f"ir_version {model_a.ir_version} vs {model_b.ir_version}")


def _as_model(model: ir.Model | str | os.PathLike) -> tuple[ir.Model, str]:
    if isinstance(model, ir.Model):
        return model, f"<in-memory model '{model.graph.name}'>" if model.graph.name else "<in-memory model>"
    from zenith_onnx.modelio import load_model

    return load_model(model), str(model)


# ------------------------------------------------------------------ public API


def diff_models(
    a: ir.Model | str | os.PathLike,
    b: ir.Model | str | os.PathLike,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    data: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
) -> DiffReport:
    """Compare two models (in memory or paths) structurally and, with ``data``, numerically.

    ``data`` is anything `zenith_onnx.calibration_data.as_feeds` reads for A: a calibration
    ``.npz`` (one array per graph input, samples on axis 0), a list of feeds
    ``{input name: array}``, ...; B gets the same arrays, matched to its inputs by position.
    """
    if rtol < 0 or atol < 0:
        raise UsageError(f"tolerances must not be negative (rtol={rtol}, atol={atol})")
    model_a, name_a = _as_model(a)
    model_b, name_b = _as_model(b)
    from zenith_onnx.summary import op_counts

    counts_a, counts_b = op_counts(model_a), op_counts(model_b)
    report = DiffReport(
        a=name_a,
        b=name_b,
        rtol=rtol,
        atol=atol,
        ir_version=(model_a.ir_version, model_b.ir_version),
        opsets=({_domain(d): v for d, v in model_a.opset_imports.items()},
                {_domain(d): v for d, v in model_b.opset_imports.items()}),
        nodes=(sum(counts_a.values()), sum(counts_b.values())),
    )
    _compare_opsets(model_a, model_b, report)
    differ = _Differ(model_a, model_b, report, rtol, atol)
    _compare_ports(model_a, model_b, report, (differ.a.consts, differ.b.consts))
    differ.run(model_a, model_b)
    report.op_counts = {
        op: (counts_a.get(op, 0), counts_b.get(op, 0))
        for op in sorted(set(counts_a) | set(counts_b))
        if counts_a.get(op, 0) != counts_b.get(op, 0)
    }
    if report.opset_differences or report.ports:
        report.structurally_same = False
    if data is not None:
        report.numeric = _numeric_diff(a, b, model_a, model_b, data, rtol, atol)
    return report


def diff_files(
    a: str | os.PathLike,
    b: str | os.PathLike,
    data: str | os.PathLike | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> DiffReport:
    """`diff_models` on two files (the `zenith-onnx diff` command)."""
    return diff_models(a, b, rtol=rtol, atol=atol, data=data)


# ------------------------------------------------------------------ numeric


def _numeric_diff(a, b, model_a: ir.Model, model_b: ir.Model, data, rtol: float, atol: float) -> NumericDiff:
    from zenith_onnx import runtime
    from zenith_onnx.calibration_data import as_feeds
    from zenith_onnx.testing import sqnr_db

    label = str(data) if isinstance(data, (str, os.PathLike)) else "feeds"
    feeds = as_feeds(data, model_a)
    inputs_a = [v.name for v in model_a.graph.inputs if not v.is_initializer()]
    inputs_b = [v.name for v in model_b.graph.inputs if not v.is_initializer()]
    if len(inputs_a) != len(inputs_b):
        raise DataError(f"models take different numbers of inputs ({len(inputs_a)} vs {len(inputs_b)}); cannot run both")
    rename = dict(zip(inputs_a, inputs_b))
    sess_a = runtime.session(a if not isinstance(a, ir.Model) else model_a, "disable_all")
    sess_b = runtime.session(b if not isinstance(b, ir.Model) else model_b, "disable_all")
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    got_a = collections.defaultdict(list)
    got_b = collections.defaultdict(list)
    samples = 0
    for feed in feeds:
        samples += 1
        try:
            out_a = runtime.run(sess_a, feed)
            out_b = runtime.run(sess_b, {rename[k]: v for k, v in feed.items()})
        except Exception as e:  # onnxruntime rejects the feed (wrong shape or dtype)
            raise DataError(f"{label}: onnxruntime cannot run the data: {str(e).strip().splitlines()[0][:300]}") from None
        for name in names_a:
            got_a[name].append(out_a[name])
        for name in names_b:
            got_b[name].append(out_b[name])
    results = []
    for i, (na, nb) in enumerate(zip(names_a, names_b)):
        xs, ys = got_a[na], got_b[nb]
        if any(x.shape != y.shape for x, y in zip(xs, ys)):
            results.append(OutputError(i, na, nb, math.nan, math.nan, math.nan, False, "shapes differ"))
            continue
        max_abs = max((float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0)
                      for x, y in zip(xs, ys))
        scale = max((float(np.max(np.abs(x.astype(np.float64)))) if x.size else 0.0) for x in xs)
        max_rel = max_abs / scale if scale > 0 else max_abs
        same = bool(max_abs <= atol + rtol * scale)
        results.append(OutputError(i, na, nb, max_abs, max_rel, sqnr_db(list(xs), list(ys)), same))
    for i in range(len(results), max(len(names_a), len(names_b))):
        na = names_a[i] if i < len(names_a) else ""
        nb = names_b[i] if i < len(names_b) else ""
        results.append(OutputError(i, na, nb, math.nan, math.nan, math.nan, False, f"only in {'A' if na else 'B'}"))
    return NumericDiff(label, samples, results)
