"""Fold inference-mode BatchNormalization into the linear layer next to it.

BatchNormalization at inference is a per-channel affine map on axis 1 of its input::

    BN(x) = gamma * (x - mean) / sqrt(var + eps) + beta = a * x + c
    a = gamma / sqrt(var + eps),   c = beta - a * mean

so it disappears into a neighbouring linear layer whose weights are constants.
Each BatchNormalization is handled by the first of these that applies:

1. Into the layer that produces its input (the layer's output feeds nothing else)::

       Before:  X -> Conv(W, b) -> BN -> Y        After:  X -> Conv(a*W, a*(b - mean) + beta) -> Y

   ``W' = a W`` along the weight's output-channel axis, ``b' = a b + c``:
   - Conv: weight ``(C_out, C_in/group, k...)``, output channels on axis 0.
   - ConvTranspose: weight ``(C_in, C_out/group, k...)``; viewed as
     ``(group, C_in/group, C_out/group, k...)``, output channel ``g * C_out/group + j``.
   - Gemm ``alpha * A B' + beta * C``: ``B'`` scaled along N (axis 1 of B, axis 0 with
     transB=1); ``C' = a * beta * C + c`` with beta reset to 1. C must be per-channel.
   - MatMul with a constant 2-D right-hand side, optionally followed by Add of a
     per-channel constant bias (``X -> MatMul(W) [-> Add(b)] -> BN`` becomes
     ``X -> MatMul(a W) -> Add(a b + c)``). Only for a 2-D output: BN's channel axis 1
     is then the feature axis; on a ``(B, T, N)`` output it would be T.

2. Into the Conv that reads its output, on the Conv's input channels::

       Before:  X -> BN -> Conv(W, b) -> Y        After:  X -> Conv(W a, b + sum_{i,k} W c) -> Y

   Exact only when the Conv reads no padding (pads all zero, auto_pad NOTSET or VALID):
   a padded zero would have been ``c`` before the fold and is ``0`` after it.

3. Otherwise into one Mul and one Add with constants shaped ``(C, 1, ...)`` for the
   input's rank::

       Before:  X -> BN -> Y                      After:  X -> Mul(a) -> Add(c) -> Y

Left alone, with the reason in the report: training_mode=1 or statistics outputs
requested, spatial=0 (opset < 9), non-constant scale/B/mean/var, and a BN that cannot
fold and whose input rank is unknown.

The numbers come from `zenith_onnx.kernels` (shared with the QAT stage); folded weights
keep their dtype. A folded weight is always a new initializer (a Constant node inside a
function), so a weight shared by two layers is never folded twice and the other layer
keeps the original. A BN output that is a graph output keeps its name, dtype and shape.
Main graph, subgraphs (If/Loop/Scan bodies) and local functions are visited; every
decision is logged at debug and recorded in ``FoldBatchNormPass.report``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from zenith_onnx import kernels
from zenith_onnx.passes import _graph
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["FoldBatchNormPass", "FoldRecord", "FOLDED", "CONVERTED", "LEFT"]

logger = logging.getLogger(__name__)

FOLDED, CONVERTED, LEFT = "folded", "converted", "left"


@dataclasses.dataclass(frozen=True)
class FoldRecord:
    """What happened to one BatchNormalization."""

    node: str  # the BatchNormalization's name ("" when unnamed)
    output: str  # its first output's name
    graph: str  # the graph or function holding it
    action: str  # FOLDED, CONVERTED (to Mul+Add) or LEFT
    target: str  # FOLDED: the layer it went into; CONVERTED: "Mul+Add"; LEFT: ""
    reason: str  # why it was not folded ("" when FOLDED)

    def format(self) -> str:
        where = f"BatchNormalization {_label(self.node, self.output)} in {self.graph}"
        if self.action == FOLDED:
            return f"{where}: folded into {self.target}"
        if self.action == CONVERTED:
            return f"{where}: converted to Mul+Add ({self.reason})"
        return f"{where}: left ({self.reason})"


# ---------------------------------------------------------------- helpers


def _label(name: str | None, output: str | None) -> str:
    return f"'{name}'" if name else f"(unnamed, output '{output}')"


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} {_label(node.name, node.outputs[0].name)}"


def _container_label(container: ir.Graph | ir.Function) -> str:
    if isinstance(container, ir.Function):
        return f"function {container.domain}::{container.name}"
    return f"graph '{container.name}'" if container.name else "graph (unnamed)"


def _is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.op_type in op_types and _graph.is_default_domain(node)


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _first_rank(*values: ir.Value | None) -> int | None:
    """The rank of the first value whose shape is known."""
    return next((len(v.shape) for v in values if v is not None and v.shape is not None), None)


# ---------------------------------------------------------------- check the BatchNormalization


@dataclasses.dataclass
class _BatchNorm:
    node: ir.Node
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def channels(self) -> int:
        return self.gamma.shape[0]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        return kernels.batchnorm_affine(self.gamma, self.beta, self.mean, self.var, self.eps)

    def fold_into(self, weight: np.ndarray, bias: np.ndarray | None, axis: int) -> tuple[np.ndarray, np.ndarray]:
        return kernels.fold_batchnorm_into_weight(
            weight, bias, self.gamma, self.beta, self.mean, self.var, self.eps, axis=axis
        )


_PARAMETERS = ("scale", "B", "input_mean", "input_var")


def _check_batchnorm(node: ir.Node) -> _BatchNorm | str:
    """The BN's constants, or why it cannot be treated as an affine map."""
    if _graph.attr_int(node, "training_mode", 0) != 0:
        return "training_mode=1: it computes batch statistics"
    extra = [v for v in node.outputs[1:] if v.name or v.uses() or v.is_graph_output()]
    if extra:
        return f"it has {1 + len(extra)} outputs: running statistics are requested (training)"
    if _graph.attr_int(node, "spatial", 1) == 0:
        return "spatial=0: per-activation statistics"
    if len(node.inputs) != 5 or any(v is None for v in node.inputs):
        return f"it has {len(node.inputs)} inputs, expected 5"
    arrays = []
    for name, value in zip(_PARAMETERS, node.inputs[1:]):
        array = _graph.constant_array(value)
        if array is None:
            return f"{name} '{value.name}' is not a constant"
        arrays.append(array)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return f"scale/B/mean/var are not 1-D of one length (shapes {[a.shape for a in arrays]})"
    gamma, beta, mean, var = arrays
    eps = _graph.attr_float(node, "epsilon", 1e-5)
    if not (all(np.isfinite(a).all() for a in arrays) and np.all(var.astype(np.float64) + eps > 0)):
        return "scale/B/mean/var hold NaN or Inf, or var + epsilon is not positive (it computes NaN or Inf)"
    return _BatchNorm(node, gamma, beta, mean, var, eps)


# ---------------------------------------------------------------- match + check a neighbour
#
# Each `_match_*` returns a rewrite (a closure that edits the graph and returns the
# name of the layer folded into) or the reason it does not apply. Matching reads
# constants and validates shapes; nothing is edited until the rewrite runs.

Rewrite = Callable[[Rewriter], str]


def _weight(node: ir.Node, index: int, what: str) -> np.ndarray | str:
    """The floating-point constant at input ``index``, or why there is none."""
    value = _optional_input(node, index)
    array = _graph.constant_array(value)
    if array is None:
        name = "missing" if value is None else f"'{value.name}'"
        return f"{_describe(node)} {what} {name} is not a constant"
    if not np.issubdtype(array.dtype, np.floating):
        return f"{_describe(node)} {what} has dtype {array.dtype}, not floating point"
    return array


def _optional_bias(node: ir.Node, index: int) -> np.ndarray | None | str:
    """The bias array, None when absent, or the reason it cannot be used."""
    return None if _optional_input(node, index) is None else _weight(node, index, "bias")


def _conv_parameters(conv: ir.Node) -> tuple[np.ndarray, np.ndarray | None, int] | str:
    """A Conv/ConvTranspose's constant weight, bias (None if absent) and group."""
    weight = _weight(conv, 1, "weight")
    if isinstance(weight, str):
        return weight
    bias = _optional_bias(conv, 2)
    if isinstance(bias, str):
        return bias
    return weight, bias, _graph.attr_int(conv, "group", 1)


def _match_producer(bn: _BatchNorm) -> Rewrite | str:
    x = bn.node.inputs[0]
    producer = x.producer()
    if producer is None:
        kind = "a graph input" if x.is_graph_input() else "not produced by a node"
        return f"its input '{x.name}' is {kind}"
    if not _is_op(producer, "Conv", "ConvTranspose", "Gemm", "MatMul", "Add"):
        return f"its input comes from {_describe(producer)}, not Conv/ConvTranspose/Gemm/MatMul"
    if _graph.single_consumer(x) is not bn.node:
        return f"{_describe(producer)} output '{x.name}' has other consumers or is a graph output"
    if producer.graph is not bn.node.graph:
        return f"{_describe(producer)} is in an enclosing graph"
    if producer.op_type in ("Conv", "ConvTranspose"):
        return _match_conv(bn, producer)
    if producer.op_type == "Gemm":
        return _match_gemm(bn, producer)
    if producer.op_type == "MatMul":
        return _match_matmul(bn, producer)
    return _match_matmul_add(bn, producer)


def _match_conv(bn: _BatchNorm, conv: ir.Node) -> Rewrite | str:
    found = _conv_parameters(conv)
    if isinstance(found, str):
        return found
    weight, bias, group = found
    transpose = conv.op_type == "ConvTranspose"
    out_channels = weight.shape[1] * group if transpose else weight.shape[0]
    if out_channels != bn.channels:
        return f"{_describe(conv)} has {out_channels} output channels, BatchNormalization {bn.channels}"
    if bias is not None and bias.shape != (out_channels,):
        return f"{_describe(conv)} bias has shape {bias.shape}, expected ({out_channels},)"

    def rewrite(rw: Rewriter) -> str:
        if transpose:
            # (C_in, C_out/g, k...) -> (C_in/g, g * C_out/g, k...): output channel
            # g * C_out/g + j on axis 1, the order BN's channels have.
            c_in, per_group, *kernel = weight.shape
            view = weight.reshape(group, c_in // group, per_group, *kernel).swapaxes(0, 1)
            folded, new_bias = bn.fold_into(view.reshape(c_in // group, group * per_group, *kernel), bias, axis=1)
            new_weight = folded.reshape(c_in // group, group, per_group, *kernel).swapaxes(0, 1).reshape(weight.shape)
        else:
            new_weight, new_bias = bn.fold_into(weight, bias, axis=0)
        _replace_weight_and_bias(rw, conv, new_weight, 2, new_bias)
        rw.bypass(bn.node, conv.outputs[0])
        return _describe(conv)

    return rewrite


def _replace_weight_and_bias(rw: Rewriter, layer: ir.Node, weight: np.ndarray, bias_index: int, bias: np.ndarray) -> None:
    base = layer.name or layer.op_type.lower()
    rw.set_input(layer, 1, rw.constant(layer.graph, f"{base}.weight_bnfold", weight))
    rw.set_input(layer, bias_index, rw.constant(layer.graph, f"{base}.bias_bnfold", bias))


def _match_gemm(bn: _BatchNorm, gemm: ir.Node) -> Rewrite | str:
    weight = _weight(gemm, 1, "B")
    if isinstance(weight, str):
        return weight
    if weight.ndim != 2:
        return f"{_describe(gemm)} B has rank {weight.ndim}, expected 2"
    axis = 0 if _graph.attr_int(gemm, "transB", 0) else 1
    if weight.shape[axis] != bn.channels:
        return f"{_describe(gemm)} has {weight.shape[axis]} output features, BatchNormalization {bn.channels}"
    c = _optional_bias(gemm, 2)
    if isinstance(c, str):
        return c
    if c is not None and c.size != 1 and c.shape not in ((bn.channels,), (1, bn.channels)):
        return f"{_describe(gemm)} C has shape {c.shape}, which is not one value per output feature"

    def rewrite(rw: Rewriter) -> str:
        # The layer's effective per-feature bias is beta * C; it becomes the new C and
        # beta goes back to its default of 1. alpha still scales A B only.
        bias = None
        if c is not None:
            bias = np.broadcast_to(c.astype(np.float64).reshape(-1), (bn.channels,)) * _graph.attr_float(gemm, "beta", 1.0)
        new_weight, new_bias = bn.fold_into(weight, bias, axis=axis)
        gemm.attributes.pop("beta", None)
        _replace_weight_and_bias(rw, gemm, new_weight, 2, new_bias)
        rw.bypass(bn.node, gemm.outputs[0])
        return _describe(gemm)

    return rewrite


def _check_matmul(bn: _BatchNorm, matmul: ir.Node, output: ir.Value) -> np.ndarray | str:
    """The MatMul's constant (K, N) weight if BN's channel axis is its feature axis."""
    weight = _weight(matmul, 1, "weight")
    if isinstance(weight, str):
        if _graph.constant_array(matmul.inputs[0]) is not None:
            return f"{_describe(matmul)} has its constant on the left (W @ X): channels are not its output features"
        return weight
    if weight.ndim != 2:
        return f"{_describe(matmul)} weight has rank {weight.ndim}, expected 2"
    # With a 2-D weight the output has the rank of the left operand (when it is >= 2).
    rank = _first_rank(output, bn.node.outputs[0], matmul.outputs[0], matmul.inputs[0])
    if rank is None:
        return f"{_describe(matmul)} output rank is unknown: BatchNormalization's channel axis may not be its feature axis"
    if rank != 2:
        return (
            f"{_describe(matmul)} output has rank {rank}: BatchNormalization's channel axis 1 "
            "is not the MatMul's feature axis (the last)"
        )
    if weight.shape[1] != bn.channels:
        return f"{_describe(matmul)} has {weight.shape[1]} output features, BatchNormalization {bn.channels}"
    return weight


def _match_matmul(bn: _BatchNorm, matmul: ir.Node) -> Rewrite | str:
    weight = _check_matmul(bn, matmul, matmul.outputs[0])
    if isinstance(weight, str):
        return weight

    def rewrite(rw: Rewriter) -> str:
        new_weight, new_bias = bn.fold_into(weight, None, axis=1)
        base = matmul.name or "matmul"
        rw.set_input(matmul, 1, rw.constant(matmul.graph, f"{base}.weight_bnfold", new_weight))
        add = rw.new_node("Add", [matmul.outputs[0], rw.constant(bn.node.graph, f"{base}.bias_bnfold", new_bias)],
                          like=bn.node.outputs[0], base=f"{base}_bias")
        bn.node.graph.insert_before(bn.node, add)
        rw.bypass(bn.node, add.outputs[0])
        return _describe(matmul)

    return rewrite


def _match_matmul_add(bn: _BatchNorm, add: ir.Node) -> Rewrite | str:
    for side in (0, 1):
        matmul = add.inputs[side].producer() if add.inputs[side] is not None else None
        bias = _graph.constant_array(add.inputs[1 - side])
        if _is_op(matmul, "MatMul") and bias is not None:
            break
    else:
        return f"its input comes from {_describe(add)}, which is not MatMul + constant bias"
    if _graph.single_consumer(matmul.outputs[0]) is not add:
        return f"{_describe(matmul)} output feeds more than {_describe(add)}"
    weight = _check_matmul(bn, matmul, add.outputs[0])
    if isinstance(weight, str):
        return weight
    if bias.size != 1 and bias.shape not in ((bn.channels,), (1, bn.channels)):
        return f"{_describe(add)} bias has shape {bias.shape}, which is not one value per output feature"

    def rewrite(rw: Rewriter) -> str:
        new_weight, new_bias = bn.fold_into(weight, np.broadcast_to(bias.reshape(-1), (bn.channels,)), axis=1)
        base = matmul.name or "matmul"
        rw.set_input(matmul, 1, rw.constant(matmul.graph, f"{base}.weight_bnfold", new_weight))
        rw.set_input(add, 1 - side, rw.constant(add.graph, f"{base}.bias_bnfold", new_bias))
        rw.bypass(bn.node, add.outputs[0])
        return f"{_describe(matmul)} + {_describe(add)}"

    return rewrite


def _match_following_conv(bn: _BatchNorm) -> Rewrite | str:
    out = bn.node.outputs[0]
    conv = _graph.single_consumer(out)
    if conv is None:
        if out.is_graph_output():
            return f"its output '{out.name}' is a graph output"
        return f"its output '{out.name}' has {len(out.consumers())} consumers"
    if not _is_op(conv, "Conv") or conv.inputs[0] is not out or out in conv.inputs[1:]:
        return f"its output feeds {_describe(conv)}, not the data input of a Conv"
    auto_pad = conv.attributes.get("auto_pad")
    auto_pad = "NOTSET" if auto_pad is None else auto_pad.as_string()
    pads = _graph.attr_ints(conv, "pads", []) or []
    if auto_pad not in ("NOTSET", "VALID") or any(pads):
        return (
            f"the following {_describe(conv)} pads its input (pads {pads}, auto_pad {auto_pad}); "
            "a padded zero would become BatchNormalization's shift"
        )
    found = _conv_parameters(conv)
    if isinstance(found, str):
        return found
    weight, bias, group = found
    if weight.ndim < 3 or weight.shape[1] * group != bn.channels:
        return f"the following {_describe(conv)} has {weight.shape[1] * group} input channels, BatchNormalization {bn.channels}"

    def rewrite(rw: Rewriter) -> str:
        a, c = bn.affine()
        new_weight, new_bias = kernels.fold_batchnorm_into_following_weight(weight, bias, a, c, group=group)
        conv.replace_input_with(0, bn.node.inputs[0])
        _replace_weight_and_bias(rw, conv, new_weight, 2, new_bias)
        rw.remove(bn.node)
        return f"{_describe(conv)} (input channels)"

    return rewrite


def _batchnorm_rank(bn: _BatchNorm) -> int | None:
    rank = _first_rank(bn.node.inputs[0], bn.node.outputs[0])
    producer = bn.node.inputs[0].producer()
    if rank is None and _is_op(producer, "Conv", "ConvTranspose"):
        # Without shape information a Conv's output rank is its weight's rank (Constant
        # node outputs, e.g. in functions, carry no shape: read the constant).
        rank = _first_rank(producer.inputs[1])
        weight = _graph.constant_array(producer.inputs[1]) if rank is None else None
        rank = rank if weight is None else weight.ndim
    return rank


def _match_affine(bn: _BatchNorm) -> Rewrite | str:
    rank = _batchnorm_rank(bn)
    if rank is None:
        return "its input rank is unknown, so per-channel Mul/Add constants cannot be shaped (run shape inference)"
    x = bn.node.inputs[0]
    dtype = x.dtype.numpy() if x.dtype is not None else bn.gamma.dtype

    def rewrite(rw: Rewriter) -> str:
        a, c = bn.affine()
        shape = kernels.broadcast_shape(rank, 1)[1:]
        graph = bn.node.graph
        base = bn.node.name or "batchnorm"
        mul = rw.new_node("Mul", [x, rw.constant(graph, f"{base}.scale_affine", a.astype(dtype).reshape(shape))],
                          like=x, base=f"{base}_scaled")
        add = rw.new_node("Add", [mul.outputs[0], rw.constant(graph, f"{base}.shift_affine", c.astype(dtype).reshape(shape))],
                          like=bn.node.outputs[0], base=f"{base}_shifted")
        graph.insert_before(bn.node, [mul, add])
        rw.bypass(bn.node, add.outputs[0])
        return "Mul+Add"

    return rewrite


# ---------------------------------------------------------------- the pass


@register("fold_batchnorm")
class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul next to it, else into Mul+Add."""

    def __init__(self) -> None:
        super().__init__()
        self.report: list[FoldRecord] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = []
        rw = Rewriter(model)
        for container in _graph.all_graphs(model):
            # all_graphs yields a function before its subgraphs and the main graph's
            # subgraphs before any function, so the scope is the last function seen.
            if isinstance(container, ir.Function):
                rw.scope = container
            for node in list(container):
                if _is_op(node, "BatchNormalization"):
                    self.report.append(self._fold(node, rw, _container_label(rw.scope or container)))
        logger.info("%s", self._count_line())
        return ir.passes.PassResult(model, any(r.action != LEFT for r in self.report))

    @staticmethod
    def _fold(node: ir.Node, rw: Rewriter, where: str) -> FoldRecord:
        record = functools.partial(FoldRecord, node.name or "", node.outputs[0].name or "", where)
        name = _label(node.name, node.outputs[0].name)
        bn = _check_batchnorm(node)
        if isinstance(bn, str):
            logger.debug("BatchNormalization %s left: %s", name, bn)
            return record(LEFT, "", bn)
        reasons = []
        for match in (_match_producer, _match_following_conv):
            rewrite = match(bn)
            if not isinstance(rewrite, str):
                target = rewrite(rw)
                logger.debug("BatchNormalization %s folded into %s", name, target)
                return record(FOLDED, target, "")
            reasons.append(rewrite)
        reason = f"not folded into its producer: {reasons[0]}; nor into its consumer: {reasons[1]}"
        rewrite = _match_affine(bn)
        if isinstance(rewrite, str):
            reason = f"{reason}; {rewrite}"
            logger.debug("BatchNormalization %s left: %s", name, reason)
            return record(LEFT, "", reason)
        target = rewrite(rw)
        logger.debug("BatchNormalization %s converted to %s: %s", name, target, reason)
        return record(CONVERTED, target, reason)

    def report_lines(self) -> list[str]:
        """A count line, then each BatchNormalization that was not folded and why."""
        return [self._count_line(), *("  " + r.format() for r in self.report if r.action != FOLDED)]

    def _count_line(self) -> str:
        counts = {action: sum(r.action == action for r in self.report) for action in (FOLDED, CONVERTED, LEFT)}
        return (
            f"fold_batchnorm: {len(self.report)} BatchNormalization: {counts[FOLDED]} folded, "
            f"{counts[CONVERTED]} converted to Mul+Add, {counts[LEFT]} left"
        )
