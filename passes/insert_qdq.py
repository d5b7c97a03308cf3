"""Insert QuantizeLinear/DequantizeLinear pairs that onnxruntime fuses into integer kernels.

Before (float, BatchNorm already folded)::

    x -> Conv(W, b) -> Relu -> y -> Reshape -> MatMul(V) -> z

After::

    x -> Q -> DQ -> Conv(DQ(W_int8), DQ(b_int32)) -> Q(y) -> DQ -> Reshape -> Q(y) -> DQ -> MatMul(DQ(V_int8)) -> Q -> DQ -> z

Placement follows `zenith_onnx.qdq_rules`: the activation inputs and the output of every
op with an integer kernel get Q/DQ; shape ops join their input's scale group so the pair
around them is dropped by onnxruntime; a Relu (or Clip(0, hi)) after a quantized op is
removed and its range given to the Q, whose zero point 0 saturates exactly like it.

Math (`zenith_onnx.kernels`): activations are uint8 asymmetric per tensor,
``s = (max - min) / 255``, ``zp = round(-min / s)``; weights are int8 symmetric narrow
range per output channel, ``s_c = max|W_c| / 127``; the bias becomes int32 with
``s_b = s_x * s_c`` and when ``|b_c| / s_b`` would overflow int32 the weight scale of that
channel is raised until it fits.

Planning (`plan_quantization`) is separate from rewriting (`InsertQDQPass`): the plan
names the tensors whose ranges calibration must observe; the pass takes the ranges.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from zenith_onnx import kernels
from zenith_onnx.passes._graph import attr_int, attr_ints, constant_array, is_default_domain, make_initializer
from zenith_onnx.passes.registry import register
from zenith_onnx.passes.matmul_nbits import nbits_is_faster, replace_with_nbits
from zenith_onnx.errors import ModelError, UsageError
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.qdq_rules import ABSORBED_ACTIVATIONS, COMPUTE_RULES, SAME_SCALE_OPS, SLOW_WHEN_QUANTIZED

__all__ = ["QParams", "QuantPlan", "plan_quantization", "float_region", "InsertQDQPass", "FROZEN_QPARAMS"]

logger = logging.getLogger(__name__)

# Value.meta key under which strip_qdq leaves the quantization parameters of a model
# that already carried Q/DQ (a QAT export): they are kept, never recomputed.
FROZEN_QPARAMS = "zenith.frozen_qparams"

_INT32 = kernels.IntRange(-(2**31), 2**31 - 1)
_NP_OF = {
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.INT16: np.int16,
    ir.DataType.INT32: np.int32,
}


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale/zero point of one quantized tensor (``axis`` set for per-channel)."""

    scale: np.ndarray
    zero_point: np.ndarray
    dtype: ir.DataType
    qrange: kernels.IntRange
    axis: int | None = None


# ------------------------------------------------------------------ plan (match + check)


class _Groups:
    """Union-find over values: members of a group share one scale and zero point."""

    def __init__(self):
        self.parent: dict[ir.Value, ir.Value] = {}

    def add(self, v: ir.Value) -> None:
        self.parent.setdefault(v, v)

    def find(self, v: ir.Value) -> ir.Value:
        root = v
        while self.parent[root] is not root:
            root = self.parent[root]
        while self.parent[v] is not root:
            self.parent[v], v = root, self.parent[v]
        return root

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.add(a)
        self.add(b)
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra

    def __contains__(self, v: ir.Value) -> bool:
        return v in self.parent

    def members(self) -> dict[ir.Value, list[ir.Value]]:
        out: dict[ir.Value, list[ir.Value]] = {}
        for v in self.parent:
            out.setdefault(self.find(v), []).append(v)
        return out


@dataclasses.dataclass
class QuantPlan:
    """Where Q/DQ go. Values, not names: the pass rewrites the same model object."""

    compute: list[ir.Node]
    groups: _Groups
    # (activation node, producer output): the activation is removed and the producer's
    # output is quantized with the activation output's range.
    absorbed: list[tuple[ir.Node, ir.Value]]
    # value -> value whose observed range it takes (the absorbed activation's output)
    range_source: dict[ir.Value, ir.Value]
    min0: set[ir.Value]
    left_float: list[tuple[str, str, str]]
    # 4-bit MatMuls that become MatMulNBits (float input, no Q/DQ around them)
    nbits: list[ir.Node] = dataclasses.field(default_factory=list)

    def observe_names(self) -> list[str]:
        """Names of the tensors whose ranges calibration must observe."""
        names = []
        for members in self.groups.members().values():
            if any(FROZEN_QPARAMS in m.meta for m in members):
                continue  # the group's parameters come from the model itself
            names.extend(self.range_source.get(m, m).name for m in members)
        return sorted(set(names))


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and v.dtype in (ir.DataType.FLOAT, None)


def _excluded(node: ir.Node, exclude: set[str]) -> bool:
    return bool(exclude) and (node.name in exclude or node.op_type in exclude)


def _absorbable(node: ir.Node, out: ir.Value, exclude: set[str]) -> ir.Node | None:
    """The Relu/Clip(0, hi) that alone reads ``out`` and can vanish into the Q after it."""
    if out.is_graph_output():
        return None
    consumers = out.consumers()
    if len(consumers) != 1:
        return None
    act = consumers[0]
    if act.op_type not in ABSORBED_ACTIVATIONS or not is_default_domain(act) or _excluded(act, exclude):
        return None
    if act.op_type == "Clip":
        lo = constant_array(act.inputs[1]) if len(act.inputs) > 1 else None
        if lo is None or float(lo) != 0.0:
            logger.debug("Clip %s not absorbed: its lower bound is not the constant 0", act.name)
            return None
        if len(act.inputs) > 2 and act.inputs[2] is not None and constant_array(act.inputs[2]) is None:
            logger.debug("Clip %s not absorbed: its upper bound is not constant", act.name)
            return None
    return act


def plan_quantization(model: ir.Model, config: QuantConfig) -> QuantPlan:
    """Decide which nodes become integer kernels and which tensors get Q/DQ."""
    graph = model.graph
    exclude = set(config.exclude)
    groups = _Groups()
    plan = QuantPlan([], groups, [], {}, set(), [])
    nbits = {}
    if config.weight_bits == 4:
        nbits = {n: why for n in graph if not _is_frozen(n) and (why := nbits_is_faster(n))}
    region = float_region(graph, nbits)

    for node in graph:
        if not is_default_domain(node):
            continue
        if node.op_type in SLOW_WHEN_QUANTIZED and not _excluded(node, exclude):
            plan.left_float.append((node.name, node.op_type, SLOW_WHEN_QUANTIZED[node.op_type]))
            continue
        rule = COMPUTE_RULES.get(node.op_type)
        if rule is None:
            continue
        if _excluded(node, exclude):
            plan.left_float.append((node.name, node.op_type, "excluded by the user"))
            continue
        if not _computes_on_float(node, rule):
            continue  # shape arithmetic on integers (Concat of dims, ...): nothing to quantize
        if node.op_type == "Softmax" and node.outputs[0].is_graph_output():
            plan.left_float.append((node.name, node.op_type, FINAL_SOFTMAX))
            continue
        reason = _refuse_compute(node, rule)
        if reason:
            logger.debug("%s %s stays float: %s", node.op_type, node.name, reason)
            plan.left_float.append((node.name, node.op_type, reason))
            continue
        if node in nbits:
            logger.debug("MatMul %s becomes MatMulNBits: %s", node.name, nbits[node])
            plan.nbits.append(node)
            continue
        faster = region.get(node)
        if faster:
            logger.debug("%s %s stays float: %s", node.op_type, node.name, faster)
            plan.left_float.append((node.name, node.op_type, faster))
            out = node.outputs[0]
            act = _absorbable(node, out, exclude)
            readers = (act.outputs[0] if act is not None else out).consumers()
            # Quantized here (absorbing a Relu/Clip) when only quantized ops read it; a graph
            # output would only gain error, and float readers take the float tensor.
            if not out.is_graph_output() and readers and not any(c in region for c in readers):
                _plan_output(plan, node, rule, exclude)
            continue
        plan.compute.append(node)
        slots = range(len(node.inputs)) if rule.all_inputs else rule.activations
        for i in slots:
            v = node.inputs[i] if i < len(node.inputs) else None
            if v is None or constant_array(v) is not None:
                continue  # constants are quantized from their own values
            groups.add(v)
        if rule.weight is not None and rule.weight not in rule.activations:
            w = node.inputs[rule.weight]
            if constant_array(w) is None:
                groups.add(w)  # Gemm with an activation as B
        _plan_output(plan, node, rule, exclude)

    _check_exclude_matches(graph, exclude)
    # An absorbed activation's output becomes its producer's output: one group.
    absorbed_outputs = {act.outputs[0]: out for act, out in plan.absorbed}
    for act_out, out in absorbed_outputs.items():
        groups.union(out, act_out)
    # Shape ops run on the 8-bit tensor when input and output share a scale.
    for node in graph:
        slot = SAME_SCALE_OPS.get(node.op_type)
        if slot is None or not is_default_domain(node) or _excluded(node, exclude) or len(node.outputs) != 1:
            continue
        src = node.inputs[slot] if slot < len(node.inputs) else None
        src = absorbed_outputs.get(src, src)
        if src is not None and src in groups and _is_float(node.outputs[0]):
            groups.union(src, node.outputs[0])
    return plan


def _plan_output(plan: QuantPlan, node: ir.Node, rule, exclude: set[str]) -> None:
    """Quantize the node's output (taking the range after a Relu/Clip that follows)."""
    out = node.outputs[0]
    if rule.float_output and out.is_graph_output():
        return  # the kernel writes float: the model's output keeps full precision
    plan.groups.add(out)
    if rule.fixed_output_min0:
        plan.min0.add(out)
    act = _absorbable(node, out, exclude)
    if act is not None:
        plan.absorbed.append((act, out))
        plan.range_source[out] = act.outputs[0]


# A Conv that reads the model's input through so few products per output (C_in/group x
# kernel area) runs faster in float than as QLinearConv, which must also quantize the raw
# input and convert its layout (measured: 3-channel 3x3 stem 20 us as QLinearConv vs 9 us
# float; 1-channel 3x3 7.1 vs 3.3 us, onnxruntime 1.32, AVX-512 VNNI).
STEM_MAX_REDUCTION = 32

# After such a float stem, a Conv that does at most this many multiply-adds per element it
# reads (C_out/group x kernel area / stride area) saves less as QLinearConv than the
# QuantizeLinear, layout Transposes and DequantizeLinear that quantizing it alone would
# add: a depthwise 3x3 does 9, a 16 -> 16 pointwise 16, a 16 -> 64 pointwise 64.
# Measured (onnxruntime 1.32, 1 thread): the MobileNetV2-style bench net's first block
# (depthwise 16 channels at 32x32, pointwise 16 -> 16, residual Add) takes 34 us as
# QLinearConv/QLinearAdd with the conversions around them and 20 us in float, where
# onnxruntime also fuses the Add into the Conv (whole net 0.77x -> 0.70x float); on the
# real models 16 beat 32 (orientation 0.83x vs 0.88x float, PP-OCRv3 det 0.68x vs 0.69x;
# no region 0.86x and 0.74x).
FLOAT_REGION_MAX_MACS = 16

# A Softmax that writes a model output stays float: exact, and faster than QLinearSoftmax
# plus the DequantizeLinear after it (PP-OCRv3 rec, 6,625 classes per step: 6.02 -> 5.55 ms
# with it float, onnxruntime 1.32, 1 thread). A Softmax between quantized ops is fused by
# onnxruntime whatever the plan says (DQ -> Softmax -> Q becomes QLinearSoftmax).
FINAL_SOFTMAX = "writes a model output: float Softmax is exact and faster than QLinearSoftmax + DequantizeLinear"

# Ops that never join the float region: their integer kernels pay off on any input.
_HEAVY_OPS = frozenset({"Gemm", "MatMul", "ConvTranspose", "Attention", "LSTM", "GRU", "RNN"})


def _stem_is_faster_in_float(node: ir.Node) -> str | None:
    """Why this Conv, which reads the model input, should stay float for speed."""
    if node.op_type != "Conv" or not node.inputs[0].is_graph_input():
        return None
    w = constant_array(node.inputs[1])
    if w is None:
        return None
    reduction = int(np.prod(w.shape[1:]))
    if reduction > STEM_MAX_REDUCTION:
        return None
    return (f"reads the model input with {reduction} products per output; float Conv is faster "
            "than QLinearConv there (and the input stays unquantized)")


def _macs_per_input(node: ir.Node) -> float | None:
    """Multiply-adds per input element of a Conv with a constant weight (None otherwise)."""
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 3:
        return None
    stride_area = int(np.prod(attr_ints(node, "strides", [1])))
    return w.shape[0] * int(np.prod(w.shape[2:])) / (attr_int(node, "group", 1) * max(stride_area, 1))


def _is_frozen(node: ir.Node) -> bool:
    """Trained with quantization (QAT): deploy what was trained, never float for speed."""
    values = [*node.inputs, *node.outputs]
    return any(v is not None and FROZEN_QPARAMS in v.meta for v in values)


def float_region(graph: ir.Graph, seeds: Mapping[ir.Node, str] | None = None) -> dict[ir.Node, str]:
    """Nodes that run faster in float (or read float), with the reason for each.

    Seeds are stem Convs (`STEM_MAX_REDUCTION`) and the given ``seeds`` (MatMulNBits,
    which read and write float); a node joins when every tensor it reads
    (constants aside) comes from the region and it is light: not a matmul-like op, and a
    Conv only with at most `FLOAT_REGION_MAX_MACS` multiply-adds per element read.
    Quantizing such a node alone would add Q, DQ and layout conversions that cost more
    than its integer kernel saves.
    """
    region: dict[ir.Node, str] = {}
    for node in graph:  # topological order
        if not is_default_domain(node) or _is_frozen(node):
            continue
        why = (seeds or {}).get(node) or _stem_is_faster_in_float(node)
        if why:
            region[node] = why
            continue
        if not region or node.op_type in _HEAVY_OPS:
            continue
        reads = [v for v in node.inputs if v is not None and constant_array(v) is None]
        if not reads or not all(v.producer() in region for v in reads):
            continue
        if node.op_type == "Conv":
            macs = _macs_per_input(node)
            if macs is None or macs > FLOAT_REGION_MAX_MACS:
                continue
            region[node] = (f"reads only float layers and does {macs:g} multiply-adds per element read; "
                            "float is faster than quantizing it alone")
        else:
            region[node] = "reads only float layers; float is faster than quantizing it alone"
    return region


def _check_exclude_matches(graph: ir.Graph, exclude: set[str]) -> None:
    """An --exclude entry that names no node and no op type is a typo: say so."""
    if not exclude:
        return
    seen = set()
    for node in graph:
        seen.add(node.name)
        seen.add(node.op_type)
    unknown = sorted(exclude - seen)
    if unknown:
        raise UsageError(f"--exclude: no node or op type named {', '.join(repr(u) for u in unknown)} in the model")


def _computes_on_float(node: ir.Node, rule) -> bool:
    """True when the op's output and activation inputs are float32 (or of unknown type)."""
    slots = range(len(node.inputs)) if rule.all_inputs else rule.activations
    inputs = [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i] is not None]
    return _is_float(node.outputs[0]) and all(_is_float(v) for v in inputs)


def _refuse_compute(node: ir.Node, rule) -> str | None:
    """Why ``node`` cannot become an integer kernel, or None."""
    if node.op_type == "Gemm" and attr_int(node, "transA", 0):
        return "Gemm with transA=1"
    if node.op_type in ("Conv", "Gemm"):
        w = node.inputs[1]
        if node.op_type == "Conv" and constant_array(w) is None:
            return "weight is not a constant"
    if node.op_type == "Softmax" and len(node.outputs) != 1:
        return "more than one output"
    return None


# ------------------------------------------------------------------ rewrite


@register("insert_qdq", float_preserving=False, standalone=False)
class InsertQDQPass(ir.passes.InPlacePass):
    """Insert Q/DQ pairs (uint8 activations, int8 per-channel weights, int32 bias) that onnxruntime fuses."""

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        config: QuantConfig | None = None,
        plan: QuantPlan | None = None,
    ):
        super().__init__()
        self.ranges = dict(ranges or {})
        self.config = config or QuantConfig()
        self.plan = plan
        self.report: dict = {}
        # float model tensor name -> name of its dequantized counterpart (per-layer error)
        self.tensor_map: dict[str, str] = {}

    # -- parameters

    def _activation_range(self) -> kernels.IntRange:
        return kernels.int_range(self.config.activation_bits, signed=False)

    def _activation_dtype(self) -> ir.DataType:
        return ir.DataType.UINT8 if self.config.activation_bits == 8 else ir.DataType.UINT16

    def _group_qparams(self, plan: QuantPlan) -> dict[ir.Value, QParams]:
        qrange = self._activation_range()
        dtype = self._activation_dtype()
        params: dict[ir.Value, QParams] = {}
        for root, members in plan.groups.members().items():
            frozen = next((m.meta[FROZEN_QPARAMS] for m in members if FROZEN_QPARAMS in m.meta), None)
            if frozen is not None:
                qp = frozen
            else:
                seen = [self.ranges[n] for n in (plan.range_source.get(m, m).name for m in members) if n in self.ranges]
                if not seen:
                    logger.debug("no range for %s: left in float", [m.name for m in members])
                    continue
                lo = min(float(r[0]) for r in seen)
                hi = max(float(r[1]) for r in seen)
                if any(m in plan.min0 for m in members):
                    lo = 0.0
                scale, zp = kernels.scale_zero_point(lo, hi, qrange, symmetric=False)
                qp = QParams(scale, zp, dtype, qrange)
            for m in members:
                params[m] = qp
        return params

    def _weight_range(self) -> kernels.IntRange:
        return kernels.int_range(self.config.weight_bits, signed=True, narrow=self.config.symmetric_weights)

    def _weight_qparams(self, w: np.ndarray, axis: int | None, frozen: QParams | None) -> QParams:
        if frozen is not None:
            return frozen
        qrange = self._weight_range()
        if axis is None:
            lo, hi = np.array(w.min()), np.array(w.max())
        else:
            moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        scale, zp = kernels.scale_zero_point(lo, hi, qrange, symmetric=self.config.symmetric_weights)
        return QParams(scale, zp, ir.DataType.INT8, qrange, axis)

    # -- graph edits

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        plan = self.plan or plan_quantization(model, self.config)
        graph = model.graph
        params = self._group_qparams(plan)
        quantized_nodes = [n for n in plan.compute if self._fully_quantized(n, params)]
        for node in plan.compute:
            if node not in quantized_nodes:
                plan.left_float.append((node.name, node.op_type, "an input or output has no calibrated range"))
        self._cache: dict = {}
        float_names = {v: plan.range_source.get(v, v).name for v in params}

        removed_acts = 0
        for act, out in plan.absorbed:
            if out in params and act.graph is graph:
                params.pop(act.outputs[0], None)
                self._remove_activation(graph, act, out)
                removed_acts += 1

        for node in quantized_nodes:
            self._quantize_constants(graph, node, params)

        inserted = 0
        for v in list(params):
            if self._already_quantized(v):
                continue
            dq_name = self._insert_pair(graph, v, params[v])
            if dq_name:
                self.tensor_map[float_names[v]] = dq_name
            inserted += 1

        for node in plan.nbits:
            replace_with_nbits(model, node)

        counts: dict[str, int] = {}
        for n in quantized_nodes:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
        if plan.nbits:
            counts["MatMulNBits"] = len(plan.nbits)
        self.report = {
            "quantized_ops": counts,
            "quantized_tensors": inserted,
            "absorbed_activations": removed_acts,
            "left_float": [{"node": n, "op": op, "reason": r} for n, op, r in plan.left_float],
        }
        return ir.passes.PassResult(model, modified=bool(inserted or removed_acts or plan.nbits))

    @staticmethod
    def _fully_quantized(node: ir.Node, params: Mapping[ir.Value, QParams]) -> bool:
        rule = COMPUTE_RULES[node.op_type]
        slots = range(len(node.inputs)) if rule.all_inputs else rule.activations
        needed = [node.inputs[i] for i in slots if i < len(node.inputs) and node.inputs[i] is not None]
        if rule.weight is not None and rule.weight not in rule.activations:
            needed.append(node.inputs[rule.weight])
        needed = [v for v in needed if constant_array(v) is None]
        out = node.outputs[0]
        output_ok = out in params or (rule.float_output and out.is_graph_output())
        return output_ok and all(v in params for v in needed)

    @staticmethod
    def _already_quantized(v: ir.Value) -> bool:
        producer = v.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return True
        return any(c.op_type == "QuantizeLinear" for c in v.consumers())

    def _remove_activation(self, graph: ir.Graph, act: ir.Node, out: ir.Value) -> None:
        """Drop a Relu/Clip whose range the Q after ``out`` now enforces."""
        act_out = act.outputs[0]
        name = act_out.name
        was_output = act_out.is_graph_output()
        act_out.replace_all_uses_with(out, replace_graph_outputs=True)
        graph.remove(act, safe=True)
        if was_output:
            out.name = name

    def _initializer(self, graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
        key = (name, array.dtype.str, array.shape, array.tobytes())
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        value = make_initializer(graph, name, array)
        self._cache[key] = value
        return value

    def _qparam_values(self, graph: ir.Graph, base: str, qp: QParams) -> tuple[ir.Value, ir.Value]:
        scale = self._initializer(graph, f"{base}_scale", np.asarray(qp.scale, dtype=np.float32))
        zp = self._initializer(graph, f"{base}_zero_point", np.asarray(qp.zero_point).astype(_NP_OF[qp.dtype]))
        return scale, zp

    def _dq(self, graph: ir.Graph, q_value: ir.Value, scale: ir.Value, zp: ir.Value | None, axis: int | None, name: str) -> ir.Node:
        attrs = {} if axis is None else {"axis": axis}
        inputs = [q_value, scale] if zp is None else [q_value, scale, zp]
        return ir.node("DequantizeLinear", inputs, attributes=attrs, name=name, outputs=[ir.Value(name=name)])

    def _insert_pair(self, graph: ir.Graph, v: ir.Value, qp: QParams) -> str | None:
        """Q after ``v`` and a DQ before each consumer; returns the first DQ output's name."""
        base = v.name
        scale, zp = self._qparam_values(graph, base, qp)
        q = ir.node("QuantizeLinear", [v, scale, zp], name=f"{base}_QuantizeLinear",
                    outputs=[ir.Value(name=f"{base}_quantized")])
        q.outputs[0].dtype = qp.dtype
        q.outputs[0].shape = v.shape
        producer = v.producer()
        if producer is not None:
            graph.insert_after(producer, q)
        else:
            graph.insert_before(next(iter(graph)), q)
        first = None
        for k, use in enumerate(list(v.uses())):
            if use.node is q:
                continue
            dq = self._dq(graph, q.outputs[0], scale, zp, None, f"{base}_dq{k}")
            self._set_float_type(dq.outputs[0], v)
            graph.insert_before(use.node, dq)
            use.node.replace_input_with(use.idx, dq.outputs[0])
            first = first or dq.outputs[0].name
        if v.is_graph_output() and not v.is_graph_input():  # a model input passed through stays exact
            name = v.name
            v.name = f"{name}_float"
            dq = self._dq(graph, q.outputs[0], scale, zp, None, name)
            self._set_float_type(dq.outputs[0], v)
            graph.insert_after(q, dq)
            outputs = graph.outputs
            for i, o in enumerate(outputs):
                if o is v:
                    outputs[i] = dq.outputs[0]
            first = name
        return first

    @staticmethod
    def _set_float_type(target: ir.Value, source: ir.Value) -> None:
        target.type = source.type
        target.shape = source.shape

    # -- weights, biases and other constants of a quantized node

    def _weight_axis(self, node: ir.Node, w: np.ndarray) -> int | None:
        if not self.config.per_channel:
            return None
        if node.op_type == "Conv":
            return 0
        if node.op_type == "Gemm":
            return 0 if attr_int(node, "transB", 0) else 1
        if node.op_type == "MatMul":
            return 1 if w.ndim == 2 else None
        return None

    def _quantize_constants(self, graph: ir.Graph, node: ir.Node, params: Mapping[ir.Value, QParams]) -> None:
        rule = COMPUTE_RULES[node.op_type]
        weight_qp = None
        if rule.weight is not None and rule.weight < len(node.inputs):
            w_value = node.inputs[rule.weight]
            w = constant_array(w_value)
            if w is not None and w.dtype == np.float32:
                weight_qp = self._quantize_weight(graph, node, rule, w_value, w, params)
        slots = range(len(node.inputs)) if rule.all_inputs else rule.activations
        for i in slots:
            if i == rule.weight and weight_qp is not None:
                continue
            v = node.inputs[i] if i < len(node.inputs) else None
            c = constant_array(v)
            if c is None or c.dtype != np.float32:
                continue
            _check_finite(c, v, node)
            lo, hi = float(c.min()), float(c.max())
            qrange = self._activation_range()
            scale, zp = kernels.scale_zero_point(lo, hi, qrange, symmetric=False)
            qp = QParams(scale, zp, self._activation_dtype(), qrange)
            self._replace_with_dq(graph, node, i, v, c, qp)

    def _quantize_weight(self, graph, node, rule, w_value, w, params) -> QParams:
        _check_finite(w, w_value, node)
        axis = self._weight_axis(node, w)
        frozen = w_value.meta.get(FROZEN_QPARAMS)
        qp = self._weight_qparams(w, axis, frozen)
        bias_value = node.inputs[rule.bias] if rule.bias is not None and rule.bias < len(node.inputs) else None
        bias = constant_array(bias_value)
        x_qp = params.get(node.inputs[0])
        if bias is not None and x_qp is not None and bias.ndim == 1 and bias.dtype == np.float32:
            _check_finite(bias, bias_value, node)
            channels = w.shape[axis] if axis is not None else None
            if channels is None or bias.shape[0] == channels:
                qp = self._fit_bias(qp, bias, float(x_qp.scale), w, axis)
                b_scale = (np.float32(x_qp.scale) * qp.scale).astype(np.float32)
                b_axis = None if np.ndim(b_scale) == 0 else 0  # per-tensor weights: one bias scale
                b_q = kernels.quantize(bias, b_scale, 0, _INT32, axis=b_axis)
                b_qp = QParams(b_scale, np.zeros(np.shape(b_scale), np.int64), ir.DataType.INT32, _INT32, b_axis)
                self._replace_with_dq(graph, node, rule.bias, bias_value, bias, b_qp, quantized=b_q, with_zp=False)
        self._replace_with_dq(graph, node, rule.weight, w_value, w, qp)
        return qp

    def _fit_bias(self, qp: QParams, bias: np.ndarray, x_scale: float, w: np.ndarray, axis: int | None) -> QParams:
        """Raise weight scales whose int32 bias would overflow (tiny weights, big bias), or
        whose bias scale ``x_scale * w_scale`` would not be a normal float32 (it would
        round to 0 or a denormal for weights near 1e-36)."""
        limit = float(_INT32.qmax) * 0.5  # headroom: the kernel adds products to the bias
        w_scale = np.asarray(qp.scale, dtype=np.float64)
        need = np.abs(bias.astype(np.float64)) / (x_scale * limit)
        need = np.maximum(need, 2.0 * float(np.finfo(np.float32).tiny) / x_scale)
        if axis is None:
            need = need.max(initial=0.0)
        raised = np.maximum(w_scale, need)
        if np.all(raised == w_scale):
            return qp
        logger.info("raised %d weight scale(s) so the int32 bias does not overflow", int(np.sum(raised > w_scale)))
        return dataclasses.replace(qp, scale=raised.astype(np.float32))

    def _replace_with_dq(self, graph, node, slot, value, array, qp: QParams, quantized=None, with_zp=True) -> None:
        q = kernels.quantize(array, qp.scale, qp.zero_point, qp.qrange, qp.axis) if quantized is None else quantized
        q = q.astype(_NP_OF[qp.dtype])
        base = value.name or f"{node.name}_in{slot}"
        suffix = "quantized" if qp.dtype != ir.DataType.INT32 else "int32"
        q_value = self._initializer(graph, f"{base}_{suffix}", q)
        scale = self._initializer(graph, f"{base}_{suffix}_scale", np.asarray(qp.scale, dtype=np.float32))
        zp = None
        if with_zp:
            zp = self._initializer(graph, f"{base}_{suffix}_zero_point", np.asarray(qp.zero_point).astype(_NP_OF[qp.dtype]))
        axis = qp.axis if np.ndim(qp.scale) > 0 else None
        if axis is not None and axis < 0:
            axis += array.ndim
        dq = self._dq(graph, q_value, scale, zp, axis, f"{base}_{node.name}_dq")
        self._set_float_type(dq.outputs[0], value)
        if dq.outputs[0].dtype is None:
            dq.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, dq)
        node.replace_input_with(slot, dq.outputs[0])


def _check_finite(array: np.ndarray, value: ir.Value, node: ir.Node) -> None:
    """A constant with NaN or Inf has no quantization range: refuse it by name."""
    if not np.isfinite(array).all():
        what = "NaN" if np.isnan(array).any() else "Inf"
        where = f"{node.op_type} node '{node.name}'" if node.name else f"a {node.op_type} node"
        raise ModelError(f"constant '{value.name}' of {where} has {what} values; cannot quantize it")
