"""What onnxruntime's CPU execution provider fuses, written down as data.

The insert_qdq pass places QuantizeLinear/DequantizeLinear only where these rules say an
integer kernel will run (measured with onnxruntime 1.32, see ORT-NOTES): the QDQ
selectors of its level-2 optimizer turn ``DQ -> op -> Q`` groups into QLinear* kernels,
and drop the pair around shape ops whose input and output share one scale.
"""

from __future__ import annotations

import dataclasses

__all__ = ["OpRule", "COMPUTE_RULES", "SAME_SCALE_OPS", "ABSORBED_ACTIVATIONS", "SLOW_WHEN_QUANTIZED", "rule_for"]


@dataclasses.dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    activations: input slots that carry activations (quantized per tensor, uint8).
    weight: the input slot that holds a weight when it is constant (quantized int8,
        per channel along ``weight_axis``; for Gemm the axis depends on transB).
    bias: the input slot of a bias that becomes int32 (scale = input scale x weight scale).
    fixed_output_min0: the output range starts at 0 (Sigmoid, Softmax) whatever was observed.
    float_output: the integer kernel may also write float (QGemm without y_scale,
        MatMulIntegerToFloat), so a graph output is left unquantized: no error added there.
    """

    activations: tuple[int, ...]
    weight: int | None = None
    weight_axis: int | None = None
    bias: int | None = None
    all_inputs: bool = False
    fixed_output_min0: bool = False
    float_output: bool = False


# Ops with an integer kernel (QLinear*, QGemm, ...): their activation inputs get DQ and
# their output gets Q.
COMPUTE_RULES: dict[str, OpRule] = {
    "Conv": OpRule(activations=(0,), weight=1, weight_axis=0, bias=2),
    "Gemm": OpRule(activations=(0,), weight=1, weight_axis=0, bias=2, float_output=True),
    "MatMul": OpRule(activations=(0, 1), weight=1, weight_axis=-1, float_output=True),
    "Add": OpRule(activations=(0, 1)),
    "Mul": OpRule(activations=(0, 1)),
    "Concat": OpRule(activations=(), all_inputs=True),
    "AveragePool": OpRule(activations=(0,)),
    "GlobalAveragePool": OpRule(activations=(0,)),
    "LeakyRelu": OpRule(activations=(0,)),
    "Sigmoid": OpRule(activations=(0,), fixed_output_min0=True),
    "Softmax": OpRule(activations=(0,), fixed_output_min0=True),
    "Where": OpRule(activations=(1, 2)),
}

# Ops onnxruntime runs directly on the 8-bit tensor when the DQ before and the Q after
# carry the same scale and zero point: the output joins the input's scale group. The
# value is the data input slot.
SAME_SCALE_OPS: dict[str, int] = {
    "Reshape": 0,
    "Transpose": 0,
    "Flatten": 0,
    "Squeeze": 0,
    "Unsqueeze": 0,
    "Slice": 0,
    "Gather": 0,
    "Expand": 0,
    "Tile": 0,
    "MaxPool": 0,
    "Resize": 0,
    "Identity": 0,
}

# Activations that vanish into the Q after them: Q with zero point = qmin (uint8 zp 0)
# saturates negatives exactly as Relu does, and a Q whose range lies inside [0, hi] makes
# Clip(0, hi) a no-op.
ABSORBED_ACTIVATIONS = ("Relu", "Clip")

# Quantizing these makes them slower than float on the CPU EP: there is no fused kernel,
# so DQ -> float op -> Q adds work. Left in float by default (the report says so).
SLOW_WHEN_QUANTIZED = {
    "ConvTranspose": "onnxruntime's CPU provider has no fused QDQ ConvTranspose kernel; "
    "it would run as DequantizeLinear + float ConvTranspose",
}


def rule_for(op_type: str) -> OpRule | None:
    return COMPUTE_RULES.get(op_type)
