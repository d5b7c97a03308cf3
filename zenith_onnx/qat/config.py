"""QAT settings shared by the numpy seed API and the torch stage.

`QATConfig` says how weights and activations are quantized during training and, for the
torch stage, how ranges are collected. Its integer ranges come from
`zenith_onnx.kernels.int_range` with the same conventions as the PTQ pass
(`passes/insert_qdq.py`): activations uint8 asymmetric per tensor, weights int8 symmetric
narrow range (-127..127) per output channel. The same settings therefore give the same
scales whether a model is quantized after training or trained with fake quantization.
"""

from __future__ import annotations

import dataclasses

from zenith_onnx import kernels
from zenith_onnx.errors import UsageError

__all__ = ["QATConfig", "EXPORTABLE_BITS"]

# Bit widths that have a standard ONNX (opset 21) QuantizeLinear type: INT4/UINT4,
# INT8/UINT8, INT16/UINT16. Other widths train in numpy/torch but cannot be exported.
EXPORTABLE_BITS = (4, 8, 16)


@dataclasses.dataclass(frozen=True)
class QATConfig:
    """How quantization-aware training quantizes weights and activations.

    - ``weight_bits`` / ``activation_bits``: 2..16.
    - ``symmetric_weights``: zero point 0 (and, with ``narrow_range_weights``, the range
      -127..127 for 8 bits so +/- are equal, like onnxruntime's and our PTQ quantizer).
    - ``per_channel_weights``: one scale per output channel (axis 0 of a Conv or Linear weight).
    - ``signed_activations``: int8 instead of uint8 activations. uint8 is the default:
      onnxruntime's x86 kernels fuse it everywhere, and int8 activations followed by a
      Reshape break onnxruntime 1.32 at ``ORT_ENABLE_EXTENDED`` (bug B1 in the notes).
    - ``learn_activation_scales``: LSQ: after calibration each activation scale trains as
      ``s0 * exp(log_gain)`` (``log_gain`` a parameter starting at 0, so training starts
      from the calibrated scale; zero points stay frozen). Otherwise the calibrated scales
      are frozen.
    - ``observe_steps``: the torch stage's activation observers record this many training
      forward passes, then freeze their ranges (0: record until `calibrate_qat`,
      `freeze_activation_ranges` or `export_qat` freezes them).
    """

    weight_bits: int = 8
    activation_bits: int = 8
    symmetric_weights: bool = True
    per_channel_weights: bool = True
    signed_activations: bool = False
    narrow_range_weights: bool = True
    learn_activation_scales: bool = False
    observe_steps: int = 16

    def __post_init__(self):
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise UsageError(f"QATConfig: {name} must be an integer, got {bits!r}")
            if not 2 <= bits <= 16:
                raise UsageError(f"QATConfig: {name} must be between 2 and 16, got {bits}")
        for name in (
            "symmetric_weights",
            "per_channel_weights",
            "signed_activations",
            "narrow_range_weights",
            "learn_activation_scales",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise UsageError(f"QATConfig: {name} must be True or False, got {value!r}")
        steps = self.observe_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UsageError(f"QATConfig: observe_steps must be an integer >= 0, got {steps!r}")

    @property
    def weight_range(self) -> kernels.IntRange:
        """Integer range of quantized weights (signed; narrow when symmetric and asked)."""
        narrow = self.symmetric_weights and self.narrow_range_weights
        return kernels.int_range(self.weight_bits, signed=True, narrow=narrow)

    @property
    def activation_range(self) -> kernels.IntRange:
        """Integer range of quantized activations (asymmetric, per tensor)."""
        return kernels.int_range(self.activation_bits, signed=self.signed_activations)

    @property
    def weight_axis(self) -> int | None:
        """Axis of the per-channel weight scales (the output channel), or None."""
        return 0 if self.per_channel_weights else None

    def check_exportable(self) -> None:
        """Raise `UsageError` unless both bit widths have a standard ONNX type, so a
        model is refused before training rather than at export."""
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if bits not in EXPORTABLE_BITS:
                raise UsageError(
                    f"QATConfig: {name}={bits} has no ONNX QuantizeLinear type; "
                    f"the torch QAT stage supports {', '.join(map(str, EXPORTABLE_BITS))}"
                )
