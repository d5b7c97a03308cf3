"""Quantization-aware training (QAT).

Two layers:

- numpy (always available, no torch): `QATConfig`, `prepare_model_for_qat`,
  `convert_qat_to_quantized`, `fold_bn_into_conv` (the seed API of the Zenith QAT
  documentation; its examples run with ``from zenith_onnx.qat import ...``).
- torch (the ``qat`` extra, imported only when one of these names is used):
  `prepare_qat` wraps a module's Conv2d(+BatchNorm2d)/Linear layers with fake
  quantization, `calibrate_qat` records activation ranges, `export_qat` writes an ONNX
  model with standard QuantizeLinear/DequantizeLinear that the zenith-onnx passes and
  onnxruntime consume (see docs/qat-handoff.md).

Both layers compute scales, zero points and BatchNorm folding with `zenith_onnx.kernels`,
the functions the ONNX passes use, so PTQ and QAT agree bit for bit.
"""

from __future__ import annotations

import importlib

from zenith_onnx.qat.config import EXPORTABLE_BITS, QATConfig
from zenith_onnx.qat.numpy_qat import (
    QATTrainer,
    QuantizedTensor,
    RangeObserver,
    convert_qat_to_quantized,
    fold_bn_into_conv,
    prepare_model_for_qat,
)

# torch names -> the submodule that defines them (imported on first use).
_TORCH_NAMES = {
    "prepare_qat": "zenith_onnx.qat.torch_qat",
    "calibrate_qat": "zenith_onnx.qat.torch_qat",
    "freeze_activation_ranges": "zenith_onnx.qat.torch_qat",
    "freeze_bn_stats": "zenith_onnx.qat.torch_qat",
    "quantizers": "zenith_onnx.qat.torch_qat",
    "QATConv2d": "zenith_onnx.qat.torch_qat",
    "QATLinear": "zenith_onnx.qat.torch_qat",
    "WeightFakeQuantize": "zenith_onnx.qat.fake_quant",
    "ActivationFakeQuantize": "zenith_onnx.qat.fake_quant",
    "fake_quantize": "zenith_onnx.qat.fake_quant",
    "export_qat": "zenith_onnx.qat.export",
    "to_deploy": "zenith_onnx.qat.export",
    "verify_export": "zenith_onnx.qat.export",
}

__all__ = [
    "QATConfig",
    "EXPORTABLE_BITS",
    "QATTrainer",
    "QuantizedTensor",
    "RangeObserver",
    "prepare_model_for_qat",
    "convert_qat_to_quantized",
    "fold_bn_into_conv",
]  # the torch names stay out of __all__ so `import *` works without torch


def require_qat_extra(what: str, hint: str = ""):
    """Import torch (and onnxscript, which the export needs) or raise a `UsageError`
    saying that ``what`` needs the qat extra (``hint`` is added). Returns torch."""
    try:
        import onnxscript  # noqa: F401
        import torch
    except ModuleNotFoundError as e:
        if e.name not in ("torch", "onnxscript"):
            raise
        from zenith_onnx.errors import UsageError

        raise UsageError(
            f"{what} needs {e.name}: install the qat extra "
            f"(pip install 'zenith-onnx[qat]', which pins torch==2.13.0){hint}"
        ) from None
    return torch


def __getattr__(name: str):
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'zenith_onnx.qat' has no attribute '{name}'")
    require_qat_extra(f"zenith_onnx.qat.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*__all__, *_TORCH_NAMES])
