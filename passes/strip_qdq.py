"""Read the Q/DQ pairs a model already carries as frozen quantization parameters.

A model exported from QAT (or quantized by another tool) already says how its tensors
are quantized. Rather than quantizing it twice, this pass removes each pair and records
its scale and zero point on the tensor (``value.meta[FROZEN_QPARAMS]``); insert_qdq puts
the pairs back with exactly those parameters, and completes what is missing (int32 bias,
Q/DQ around ops the exporter left float, pairs onnxruntime needs for fusion).

Before::

    x -> Q(s, zp) -> DQ(s, zp) -> Conv(DQ(W_q, s_w))      W_f -> Q(s_w) -> DQ(s_w) -> Gemm

After (float, parameters on the values)::

    x{frozen s, zp} -> Conv(W{frozen s_w})                 W_f{frozen s_w} -> Gemm

int8 activations are recorded as the equivalent uint8 parameters (same scale, zero point
+ 128: ``q_u8 = q_s8 + 128`` on the same grid), which onnxruntime fuses on x86 also where a
tensor has several consumers. 4-bit parameters keep their 4-bit integer range and are
stored later in an 8-bit container.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from zenith_onnx import kernels
from zenith_onnx.passes._graph import attr_int, constant_array, is_default_domain, make_initializer
from zenith_onnx.passes.insert_qdq import FROZEN_QPARAMS, QParams
from zenith_onnx.passes.registry import register

__all__ = ["StripQDQPass", "QTYPES"]

logger = logging.getLogger(__name__)

# ONNX zero-point type -> (8-bit container type, integer range)
QTYPES = {
    ir.DataType.UINT8: (ir.DataType.UINT8, kernels.int_range(8, signed=False)),
    ir.DataType.INT8: (ir.DataType.INT8, kernels.int_range(8, signed=True)),
    ir.DataType.UINT16: (ir.DataType.UINT16, kernels.int_range(16, signed=False)),
    ir.DataType.INT16: (ir.DataType.INT16, kernels.int_range(16, signed=True)),
    ir.DataType.UINT4: (ir.DataType.UINT8, kernels.int_range(4, signed=False)),
    ir.DataType.INT4: (ir.DataType.INT8, kernels.int_range(4, signed=True)),
}


def _qparams(node: ir.Node, ndim: int | None) -> QParams | None:
    """Constant scale/zero point of a Q or DQ node, or None."""
    scale = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if scale is None:
        return None
    zp_value = node.inputs[2] if len(node.inputs) > 2 else None
    zp = constant_array(zp_value) if zp_value is not None else np.zeros(scale.shape, np.uint8)
    if zp is None:
        return None
    dtype = zp_value.dtype if zp_value is not None and zp_value.dtype is not None else ir.DataType.UINT8
    if dtype not in QTYPES:
        return None
    if attr_int(node, "block_size", 0):
        return None  # blocked quantization: not read back
    container, qrange = QTYPES[dtype]
    axis = None
    if scale.ndim > 0 and scale.size > 1:
        axis = attr_int(node, "axis", 1)
        if ndim is not None and axis < 0:
            axis += ndim
    return QParams(scale.astype(np.float32).reshape(-1) if axis is not None else scale.astype(np.float32).reshape(()),
                   zp.astype(np.int64).reshape(-1) if axis is not None else zp.astype(np.int64).reshape(()),
                   container, qrange, axis)


def _same(a: QParams, b: QParams) -> bool:
    return (a.dtype == b.dtype and a.axis == b.axis and np.array_equal(a.scale, b.scale)
            and np.array_equal(a.zero_point, b.zero_point))


def _as_uint8(qp: QParams) -> QParams:
    if qp.dtype != ir.DataType.INT8 or qp.qrange != kernels.int_range(8, signed=True):
        return qp
    return QParams(qp.scale, qp.zero_point + 128, ir.DataType.UINT8, kernels.int_range(8, signed=False), qp.axis)


@register("strip_qdq", float_preserving=False)
class StripQDQPass(ir.passes.InPlacePass):
    """Turn existing Q/DQ pairs into frozen parameters on float tensors (kept by insert_qdq)."""

    def __init__(self):
        super().__init__()
        self.report: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        activations = weights = left = 0
        for node in list(graph):
            if not is_default_domain(node) or node.graph is not graph:
                continue
            if node.op_type == "QuantizeLinear":
                done = self._strip_pair(graph, node)
                if done == "activation":
                    activations += 1
                elif done == "weight":
                    weights += 1
                elif done is None:
                    left += 1
            elif node.op_type == "DequantizeLinear" and constant_array(node.inputs[0]) is not None:
                if self._strip_constant_dq(graph, node):
                    weights += 1
                else:
                    left += 1
        self.report = {"frozen_activations": activations, "frozen_weights": weights, "left_in_place": left}
        if left:
            logger.warning("%d existing Q/DQ node(s) could not be read and are kept as they are", left)
        return ir.passes.PassResult(model, modified=bool(activations or weights))

    def _strip_pair(self, graph: ir.Graph, q: ir.Node) -> str | None:
        x = q.inputs[0]
        q_out = q.outputs[0]
        qp = _qparams(q, x.shape.rank() if x.shape is not None else None)
        dqs = q_out.consumers()
        if qp is None or q_out.is_graph_output() or not dqs:
            logger.debug("Q %s kept: non-constant parameters, graph output or no DequantizeLinear", q.name)
            return None
        for dq in dqs:
            if dq.op_type != "DequantizeLinear" or dq.inputs[0] is not q_out:
                logger.debug("Q %s kept: consumer %s is not a DequantizeLinear", q.name, dq.name)
                return None
            dq_qp = _qparams(dq, None)
            if dq_qp is None or not _same(dq_qp, qp):
                logger.debug("Q %s kept: its DequantizeLinear %s uses other parameters", q.name, dq.name)
                return None
        is_weight = constant_array(x) is not None
        x.meta[FROZEN_QPARAMS] = qp if is_weight else _as_uint8(qp)
        for dq in dqs:
            self._bypass(graph, dq.outputs[0], x)
            graph.remove(dq, safe=True)
        graph.remove(q, safe=True)
        return "weight" if is_weight else "activation"

    def _strip_constant_dq(self, graph: ir.Graph, dq: ir.Node) -> bool:
        q_values = constant_array(dq.inputs[0])
        qp = _qparams(dq, q_values.ndim)
        if qp is None:
            return False
        value = make_initializer(graph, f"{dq.inputs[0].name}_float", kernels.dequantize(q_values, qp.scale, qp.zero_point, qp.axis))
        if dq.inputs[0].dtype != ir.DataType.INT32:  # int32 biases are recomputed from the scales
            value.meta[FROZEN_QPARAMS] = qp
        self._bypass(graph, dq.outputs[0], value)
        graph.remove(dq, safe=True)
        return True

    @staticmethod
    def _bypass(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
        """Let ``new`` take the place of ``old`` (also as a graph output, keeping the name)."""
        if old.is_graph_output():
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name = f"{name}_removed"
            new.name = name
        else:
            old.replace_all_uses_with(new)
