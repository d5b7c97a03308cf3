"""Quantization settings shared by the CLI, the Python API and the QAT stage."""

from __future__ import annotations

import dataclasses

from zenith_onnx.errors import UsageError

__all__ = ["QuantConfig", "CALIBRATION_METHODS", "DEFAULT_METHOD", "FALLBACK_METHOD"]

CALIBRATION_METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
# MSE: the range that minimizes the expected squared error of the uint8 quantizer itself.
# On the four zoo models (bench/zoo.py) it beat MinMax on every one (PP-OCRv3 det mask IoU
# 0.778 -> 0.805, rec agreement 0.963 -> 0.974, orientation 38.0 -> 51.3 dB, layout
# 16.2 -> 17.2 dB) and stayed within 0.2 dB on the synthetic bench models.
DEFAULT_METHOD = "mse"
# The fallback search (`zenith_onnx.sensitivity.quantize_with_fallback`) calibrates with
# MinMax unless told otherwise: with MSE it kept other layers float and landed lower (det
# 0.932 -> 0.868, layout F1 1.000 -> 0.941 with the same node budgets; bench/zoo_results_mse.md).
FALLBACK_METHOD = "minmax"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    Defaults are chosen for onnxruntime's x86 CPU kernels: uint8 asymmetric activations
    (fused on every tensor, also those with several consumers), int8 symmetric
    per-channel weights, int32 bias.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    symmetric_weights: bool = True
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weight_bits not in (4, 8):
            raise UsageError(f"weight bits must be 8 or 4, got {self.weight_bits}")
        if self.activation_bits not in (8, 16):
            raise UsageError(f"activation bits must be 8 or 16, got {self.activation_bits}")
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"unknown calibration method '{self.method}' (choose from {', '.join(CALIBRATION_METHODS)})")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"percentile must be in (50, 100], got {self.percentile}")
