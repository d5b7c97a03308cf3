"""Recognise hard-swish and hard-sigmoid written out with Add/Clip/Mul/Div and replace them
by the ONNX ops.

Exporters (PaddlePaddle, older PyTorch) write hard-swish as ``x * Clip(x + 3, 0, 6) / 6``
and hard-sigmoid as ``Clip(x + 3, 0, 6) / 6``: four ops, each a quantization point when
the model is quantized (the Add, the product and the quotient get their own scales, the
Div runs in float). As one op the activation has one input and one output range.
Before/After::

    Before:  X -> Add(3) -> Clip(0, 6) -> Mul(X) -> Div(6) -> Y     (or Mul(1/6); operands in any order)
    After:   X -> HardSwish -> Y                                    (opset >= 14)
             X -> HardSigmoid(1/6, 1/2) -> Mul(X) -> Y              (opset < 14)

    Before:  X -> Add(3) -> Clip(0, 6) -> Div(6) -> Y               (or Mul(1/6))
    After:   X -> HardSigmoid(alpha=1/6, beta=1/2) -> Y

Math: ``HardSigmoid(x) = max(0, min(1, x/6 + 1/2)) = Clip(x + 3, 0, 6) / 6`` and
``HardSwish(x) = x * HardSigmoid(x)``: equal in exact arithmetic, within a few float32
roundings (2^-22 relative) of the written-out form. The Clip bounds may be inputs
(opset >= 11) or attributes; the constants must be 3, 0, 6 and 6 (or 1/6) exactly up to
float32 rounding.

onnxruntime has no integer kernel for either op: a quantized model runs them in float
between DequantizeLinear and QuantizeLinear (`qdq_rules`), onnxruntime inlines HardSwish
as HardSigmoid + Mul, and a float model fuses both into the Conv before them. Refused
(debug line): a constant that differs, an intermediate value read by anything else or
being a graph output, the Add reading two different tensors.
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
from zenith_onnx.passes._match import other_operand as _other_operand
from zenith_onnx.passes._match import scalar as _scalar
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["FuseHardSwishPass", "HardActivation", "match_hard_activation"]

logger = logging.getLogger(__name__)

HARDSWISH_OPSET = 14  # the first opset with HardSwish


def _close(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 4e-7 * abs(b)


def _only_reader(value: ir.Value) -> ir.Node | None:
    return _graph.single_consumer(value)


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11
        return _graph.attr_float(clip, "min", -np.inf), _graph.attr_float(clip, "max", np.inf)
    lo = _scalar(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1] is not None else None
    hi = _scalar(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2] is not None else None
    return lo, hi


def _scaled_by_one_sixth(node: ir.Node | None, value: ir.Value) -> bool:
    """``node`` computes ``value / 6`` or ``value * (1/6)``."""
    if _is(node, "Div"):
        return node.inputs[0] is value and _close(_scalar(node.inputs[1]), 6.0)
    if _is(node, "Mul"):
        other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
        return value in node.inputs and _close(_scalar(other), 1.0 / 6.0)
    return False


@dataclasses.dataclass(frozen=True)
class HardActivation:
    """A written-out activation: its input, the nodes to remove (in order) and the last one."""

    kind: str  # "HardSwish" or "HardSigmoid"
    x: ir.Value
    nodes: tuple[ir.Node, ...]

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


def match_hard_activation(clip: ir.Node) -> HardActivation | str:
    """Match the pattern around ``clip`` (the anchor); the activation or why not."""
    lo, hi = _clip_bounds(clip)
    if lo != 0.0 or not _close(hi, 6.0):
        return f"Clip bounds are ({lo}, {hi}), not (0, 6)"
    add = clip.inputs[0].producer() if clip.inputs[0] is not None else None
    if not _is(add, "Add") or len(add.inputs) != 2:
        return "the Clip does not read an Add"
    three = [i for i, v in enumerate(add.inputs) if _close(_scalar(v), 3.0)]
    if not three:
        return f"Add '{add.name}' does not add the constant 3"
    x = add.inputs[1 - three[0]]
    if _only_reader(add.outputs[0]) is not clip:
        return f"Add '{add.name}' output has other readers"
    after = _only_reader(clip.outputs[0])
    if after is None:
        return "the Clip output has several readers or is a graph output"
    if _scaled_by_one_sixth(after, clip.outputs[0]):
        # hard-sigmoid; a following Mul(x, .) makes it hard-swish
        product = _only_reader(after.outputs[0])
        if _is(product, "Mul") and _other_operand(product, after.outputs[0]) is x:
            return HardActivation("HardSwish", x, (add, clip, after, product))
        return HardActivation("HardSigmoid", x, (add, clip, after))
    if _is(after, "Mul") and _other_operand(after, clip.outputs[0]) is x:
        scale = _only_reader(after.outputs[0])
        if _scaled_by_one_sixth(scale, after.outputs[0]):
            return HardActivation("HardSwish", x, (add, clip, after, scale))
        return f"the product x * Clip(x + 3, 0, 6) ('{after.name}') is not divided by 6 alone"
    return f"the Clip output feeds {after.op_type} '{after.name}', not / 6 nor x * ."


@register("fuse_hardswish")
class FuseHardSwishPass(ir.passes.InPlacePass):
    """Written-out hard-swish / hard-sigmoid (Add 3, Clip 0..6, Mul, Div 6) become HardSwish / HardSigmoid ops."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.counts = {}
        rw = Rewriter(model)
        hardswish_op = default_opset(model) >= HARDSWISH_OPSET
        for clip in nodes_to_rewrite(model, rw, ("Clip",)):
            found = match_hard_activation(clip)
            if isinstance(found, str):
                logger.debug("Clip '%s' is not a hard activation: %s", clip.name, found)
                continue
            self._replace(rw, found, hardswish_op)
        if self.counts:
            logger.info("fuse_hardswish: %s", ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items())))
        return ir.passes.PassResult(model, bool(self.counts))

    def _replace(self, rw: Rewriter, act: HardActivation, hardswish_op: bool) -> None:
        graph = act.nodes[-1].graph
        base = act.nodes[0].name or "hard_activation"
        last = act.nodes[-1]
        if act.kind == "HardSwish" and hardswish_op:
            new = [rw.new_node("HardSwish", [act.x], like=act.output, base=f"{base}_hardswish")]
        else:
            sigmoid = rw.new_node("HardSigmoid", [act.x], like=act.output, base=f"{base}_hardsigmoid")
            sigmoid.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0 / 6.0)
            sigmoid.attributes["beta"] = ir.AttrFloat32("beta", 0.5)
            new = [sigmoid]
            if act.kind == "HardSwish":
                new.append(rw.new_node("Mul", [act.x, sigmoid.outputs[0]], like=act.output, base=f"{base}_hardswish"))
        graph.insert_before(last, new)
        rw.bypass(last, new[-1].outputs[0])
        for node in reversed(act.nodes[:-1]):
            rw.remove(node)
        kind = new[-1].op_type if len(new) == 1 else "HardSigmoid+Mul"
        self.counts[kind] = self.counts.get(kind, 0) + 1
