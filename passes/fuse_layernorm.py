"""Replace a layer normalization written out with ReduceMean/Sub/Pow/Sqrt/Div by one
LayerNormalization op (opset >= 17).

onnxruntime fuses the written-out form itself in a float model, but in a quantized model
the QuantizeLinear/DequantizeLinear pairs placed around its Sub, Mul and Add break that
fusion: the statistics then run as separate float ops fed by DequantizeLinear, with
extra quantization points in the middle of the normalization. As one op it is one float
op between one DequantizeLinear and one QuantizeLinear. Before/After::

    Before:  X -> ReduceMean(axis) -> Sub(X, .) = D;  D -> Pow(2) -> ReduceMean(axis) -> Add(eps) -> Sqrt = S
             D -> Div(S) [-> Mul(gamma)] [-> Add(beta)] -> Y
    After:   X -> LayerNormalization(gamma or 1, beta, axis, epsilon=eps) -> Y

Math: ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta`` over the
last axis is exactly LayerNormalization's definition (``Mul(D, D)`` is accepted for
``Pow(D, 2)``); onnxruntime computes it in float32 with another summation order, so the
outputs agree to ~1e-6 relative. Matched only exactly: both means over the same single
axis which is the last one (rank known, or axis -1) with keepdims, every intermediate
read only inside the pattern and no graph output, eps/gamma/beta constants (gamma, beta
possibly behind Reshape/Unsqueeze of a constant) that vary along the last axis alone.
Refused with a debug line. At opset < 17 matches are only counted (``needs_opset``):
the caller decides whether raising the opset is worth it (`zenith_onnx.opset`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx.modelio import default_opset
from zenith_onnx.passes import _graph
from zenith_onnx.passes._match import is_op as _is
from zenith_onnx.passes._match import nodes_to_rewrite
from zenith_onnx.passes._match import other_operand as _other
from zenith_onnx.passes._match import scalar as _scalar
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.fuse_bias_add import constant_through_shape_ops
from zenith_onnx.passes.registry import register

__all__ = ["FuseLayerNormPass", "LAYERNORM_OPSET"]

logger = logging.getLogger(__name__)

LAYERNORM_OPSET = 17
REDUCE_AXES_INPUT_OPSET = 18  # ReduceMean takes axes as an input from opset 18


def _reduce_axis(node: ir.Node, opset: int) -> int | None:
    """The single axis of a keepdims ReduceMean, or None."""
    if _graph.attr_int(node, "keepdims", 1) != 1:
        return None
    if opset >= REDUCE_AXES_INPUT_OPSET:
        axes = _graph.constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = None if axes is None else [int(a) for a in axes.ravel()]
    else:
        axes = _graph.attr_ints(node, "axes")
    return axes[0] if axes is not None and len(axes) == 1 else None


def _single(value: ir.Value) -> ir.Node | None:
    return _graph.single_consumer(value)


@dataclasses.dataclass
class _LayerNorm:
    x: ir.Value
    axis: int
    epsilon: float
    gamma: np.ndarray | None
    beta: np.ndarray | None
    width: int  # size of the last axis
    nodes: list[ir.Node]  # in graph order; the last one's output is the result


_SAME_RANK = ("Relu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Identity", "Cast", "Sqrt", "Erf", "Tanh",
              "LayerNormalization", "Softmax", "Slice", "Concat", "Transpose", "Dropout")
_BROADCASTING = ("Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Where")


def _ranks(graph: ir.Graph | ir.Function) -> dict[ir.Value, int]:
    """The rank of every value whose rank follows from the graph, in one forward walk:
    shapes where known, else Transpose's perm, Reshape's target length, and the inputs
    of rank-keeping and broadcasting ops. Paddle exports carry no shapes and shape
    inference stops at their run-time Reshapes; the ranks still follow."""
    ranks: dict[ir.Value, int] = {}

    def known(value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in ranks:
            return ranks[value]
        if value.shape is not None:
            return len(value.shape)
        array = _graph.constant_array(value)
        return None if array is None else array.ndim

    for node in graph:
        out = node.outputs[0] if node.outputs else None
        if out is None:
            continue
        rank = known(out)
        if rank is None and _graph.is_default_domain(node):
            if node.op_type == "Transpose" and "perm" in node.attributes:
                rank = len(_graph.attr_ints(node, "perm"))
            elif node.op_type == "Reshape" and len(node.inputs) > 1:
                rank = _length(node.inputs[1])
            elif node.inputs and (node.op_type in _SAME_RANK or (
                    node.op_type.startswith("Reduce") and _graph.attr_int(node, "keepdims", 1) == 1)):
                rank = known(node.inputs[0])
            elif node.op_type in _BROADCASTING:
                found = [known(v) for v in node.inputs]
                rank = None if None in found else max(found)
        if rank is not None:
            ranks[out] = rank
    return ranks


def _length(value: ir.Value) -> int | None:
    """The number of elements of a 1-D shape tensor, when it is fixed: a static shape, a
    constant, or a Slice with constant non-negative bounds (of ``Shape(x)``, say)."""
    if value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int):
        return value.shape[0]
    array = _graph.constant_array(value)
    if array is not None:
        return array.size
    node = value.producer()
    if _is(node, "Slice") and len(node.inputs) >= 3:
        starts, ends = (_graph.constant_array(v) for v in node.inputs[1:3])
        steps = _graph.constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is not None and ends is not None and starts.size == ends.size == 1 and (steps is None or steps.size == 1 and int(steps) == 1):
            start, end = int(starts.reshape(())), int(ends.reshape(()))
            if 0 <= start <= end < 2**31:
                return end - start
    return None


def _parameter(value: ir.Value | None) -> np.ndarray | None:
    """A constant operand of the scale or shift: constant (behind shape ops), or a
    constant vector reshaped to a 1-D shape computed at run time (Paddle writes
    ``Reshape(gamma, Slice(Shape(x), [2], [3]))``, which is gamma itself)."""
    found = constant_through_shape_ops(value)
    if found is not None or value is None:
        return found
    node = value.producer()
    if _is(node, "Reshape") and len(node.inputs) == 2:
        data = constant_through_shape_ops(node.inputs[0])
        if data is not None and data.ndim == 1 and _length(node.inputs[1]) == 1:
            return data
    return None


def _last_axis_vector(array: np.ndarray, rank: int | None, width: int | None) -> np.ndarray | None:
    """``array`` as a vector along the last axis, if that is all it varies along."""
    if rank is not None and array.ndim > rank:
        return None
    if any(d != 1 for d in array.shape[:-1]):
        return None
    vector = array.reshape(-1)
    if width is not None and vector.size not in (1, width):
        return None
    return vector


def _match(mean: ir.Node, opset: int, ranks: dict[ir.Value, int]) -> _LayerNorm | str:
    x = mean.inputs[0]
    axis = _reduce_axis(mean, opset)
    if axis is None:
        return "not a keepdims mean over one axis"
    rank = ranks.get(x, len(x.shape) if x.shape is not None else None)
    if axis != -1 and (rank is None or axis != rank - 1):
        return f"axis {axis} is not the last axis (rank {rank})"
    sub = _single(mean.outputs[0])
    if not _is(sub, "Sub") or sub.inputs[0] is not x or sub.inputs[1] is not mean.outputs[0]:
        return "the mean is not subtracted from its input alone"
    d = sub.outputs[0]
    readers = {id(u.node): u.node for u in d.uses()}
    if d.is_graph_output() or len(readers) != 2:
        return "the centred value is not read by exactly the variance and the division"
    square = next((n for n in readers.values() if n.op_type in ("Pow", "Mul")), None)
    div = next((n for n in readers.values() if n.op_type == "Div"), None)
    if square is None or div is None or div.inputs[0] is not d:
        return "the centred value does not feed Pow/Mul and Div"
    exponent = _graph.constant_array(square.inputs[1]) if _is(square, "Pow") else None  # 2 or 2.0
    if _is(square, "Pow") and not (square.inputs[0] is d and exponent is not None and exponent.size == 1
                                   and float(exponent.reshape(())) == 2.0):
        return "Pow is not a square"
    if _is(square, "Mul") and not (square.inputs[0] is d and square.inputs[1] is d):
        return "Mul is not a square"
    var = _single(square.outputs[0])
    if not _is(var, "ReduceMean") or _reduce_axis(var, opset) != axis:
        return "the square is not averaged over the same axis"
    add_eps = _single(var.outputs[0])
    eps = _scalar(_other(add_eps, var.outputs[0])) if _is(add_eps, "Add") else None
    if eps is None or eps < 0:
        return "the variance is not increased by a constant epsilon"
    sqrt = _single(add_eps.outputs[0])
    if not _is(sqrt, "Sqrt") or _single(sqrt.outputs[0]) is not div or div.inputs[1] is not sqrt.outputs[0]:
        return "the deviation is not the Sqrt that the division reads"
    width = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
    nodes = [mean, sub, square, var, add_eps, sqrt, div]
    affine: dict[str, np.ndarray | None] = {"Mul": None, "Add": None}  # gamma, then beta
    for op_type in affine:
        follower = _single(nodes[-1].outputs[0])
        found = _parameter(_other(follower, nodes[-1].outputs[0])) if _is(follower, op_type) else None
        affine[op_type] = None if found is None else _last_axis_vector(found, rank, width)
        if affine[op_type] is not None:
            nodes.append(follower)
    gamma, beta = affine["Mul"], affine["Add"]
    if any(n.graph is not mean.graph for n in nodes):
        return "the pattern spans several graphs"
    sizes = {v.size for v in (gamma, beta) if v is not None and v.size > 1}
    if width is not None:
        sizes.add(width)
    if len(sizes) != 1:
        return "the size of the last axis is unknown (run shape inference)"
    return _LayerNorm(x, axis, eps, gamma, beta, sizes.pop(), nodes)


@register("fuse_layernorm")
class FuseLayerNormPass(ir.passes.InPlacePass):
    """A layer normalization written out with ReduceMean/Sub/Pow/Sqrt/Div becomes LayerNormalization (opset >= 17)."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0
        # Patterns found in a model below opset 17: raise the opset and run again to fuse them.
        self.needs_opset = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fused = 0
        self.needs_opset = 0
        opset = default_opset(model)
        rw = Rewriter(model)
        ranks: dict[int, dict[ir.Value, int]] = {}  # per graph, computed before its first rewrite
        for node in nodes_to_rewrite(model, rw, ("ReduceMean",)):
            graph_ranks = ranks.setdefault(id(node.graph), _ranks(node.graph))
            found = _match(node, opset, graph_ranks)
            if isinstance(found, str):
                logger.debug("ReduceMean '%s' does not start a layer normalization: %s", node.name, found)
                continue
            if opset < LAYERNORM_OPSET:
                self.needs_opset += 1
                continue
            self._replace(rw, found)
            self.fused += 1
        if self.fused:
            logger.info("fuse_layernorm: %d layer normalization(s) fused", self.fused)
        if self.needs_opset:
            logger.info("fuse_layernorm: %d layer normalization(s) found, not fused at opset %d "
                        "(LayerNormalization needs opset %d)", self.needs_opset, opset, LAYERNORM_OPSET)
        return ir.passes.PassResult(model, bool(self.fused))

    @staticmethod
    def _replace(rw: Rewriter, ln: _LayerNorm) -> None:
        last = ln.nodes[-1]
        graph = last.graph
        dtype = ln.x.dtype.numpy() if ln.x.dtype is not None else np.float32
        base = ln.nodes[0].name or "layernorm"
        gamma = np.ones(ln.width) if ln.gamma is None else np.broadcast_to(ln.gamma, (ln.width,))
        inputs = [ln.x, rw.constant(graph, f"{base}.scale", gamma.astype(dtype))]
        if ln.beta is not None:
            inputs.append(rw.constant(graph, f"{base}.bias", np.broadcast_to(ln.beta, (ln.width,)).astype(dtype)))
        node = rw.new_node("LayerNormalization", inputs, like=last.outputs[0], base=f"{base}_layernorm")
        node.attributes["axis"] = ir.AttrInt64("axis", -1)
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", ln.epsilon)
        graph.insert_before(last, node)
        rw.bypass(last, node.outputs[0])
        for old in reversed(ln.nodes[:-1]):
            rw.remove(old)
