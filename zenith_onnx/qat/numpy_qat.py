"""The numpy QAT API (the seed API of the Zenith QAT documentation).

For training loops that are not torch (JAX, numpy) or that only need the numbers: a
trainer holds one weight and one activation range observer per named layer,
`convert_qat_to_quantized` turns trained weights into integer tensors, and
`fold_bn_into_conv` folds a BatchNorm into the conv before it. Every number comes from
`zenith_onnx.kernels` (the same functions the ONNX passes call), so these results agree
bit for bit with the PTQ pass and with the torch QAT stage.

Example (from the documentation)::

    trainer = prepare_model_for_qat(["fc1", "fc2"], QATConfig())
    trainer.calibrate("fc1", weights, activations)
    quantized = convert_qat_to_quantized(trainer, {"fc1": w1, "fc2": w2})
    quantized["fc1"].values, quantized["fc1"].scale, quantized["fc1"].dequantize()
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from zenith_onnx import kernels
from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.qat.config import QATConfig

__all__ = [
    "RangeObserver",
    "QuantizedTensor",
    "QATTrainer",
    "prepare_model_for_qat",
    "convert_qat_to_quantized",
    "fold_bn_into_conv",
    "container_dtype",
]

logger = logging.getLogger(__name__)


def container_dtype(qrange: kernels.IntRange) -> np.dtype:
    """The smallest numpy integer type that holds ``qrange`` (int4 values live in int8)."""
    if qrange.signed:
        return np.dtype(np.int8 if qrange.qmin >= -128 else np.int16)
    return np.dtype(np.uint8 if qrange.qmax <= 255 else np.uint16)


class RangeObserver:
    """Running minimum and maximum of every tensor shown to it, per tensor or per channel
    (``axis``)."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    @property
    def seen(self) -> bool:
        return self.min is not None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        if self.axis is None:
            lo, hi = np.min(x), np.max(x)
        else:
            other = tuple(d for d in range(x.ndim) if d != self.axis)
            lo, hi = np.min(x, axis=other), np.max(x, axis=other)
        if self.min is None:
            self.min, self.max = np.asarray(lo), np.asarray(hi)
        elif self.min.shape != np.shape(lo):
            raise DataError(f"channel count changed from {self.min.shape} to {np.shape(lo)}")
        else:
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)


@dataclasses.dataclass(frozen=True, repr=False)
class QuantizedTensor:
    """An integer tensor with its quantization parameters (ONNX QuantizeLinear semantics:
    ``real = (values - zero_point) * scale``, scale/zero point per ``axis`` or per tensor)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    bits: int
    qrange: kernels.IntRange

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    def dequantize(self) -> np.ndarray:
        """The float32 tensor the integers stand for."""
        return kernels.dequantize(self.values, self.scale, self.zero_point, self.axis)

    def __repr__(self) -> str:
        where = "per tensor" if self.axis is None else f"per channel (axis {self.axis})"
        return (
            f"QuantizedTensor(shape={self.shape}, bits={self.bits}, {self.values.dtype} "
            f"in [{self.qrange.qmin}, {self.qrange.qmax}], {where}, "
            f"scale {float(np.min(self.scale)):.4g}..{float(np.max(self.scale)):.4g})"
        )


def _quantize_from_range(
    x: np.ndarray, rmin, rmax, qrange: kernels.IntRange, symmetric: bool, axis: int | None, bits: int
) -> QuantizedTensor:
    scale, zero_point = kernels.scale_zero_point(rmin, rmax, qrange, symmetric)
    dtype = container_dtype(qrange)
    values = kernels.quantize(x, scale, zero_point, qrange, axis).astype(dtype)
    return QuantizedTensor(values, scale, zero_point.astype(dtype), axis, bits, qrange)


def _check_weights(layer: str, weights) -> np.ndarray:
    w = np.asarray(weights)
    if w.ndim not in (2, 4):
        raise DataError(
            f"layer '{layer}': weights must be (out, in) or (out, in, kh, kw), got shape {w.shape}"
        )
    if w.size == 0 or not np.all(np.isfinite(w)):
        raise DataError(f"layer '{layer}': weights are empty or not finite")
    return w


class QATTrainer:
    """Range observers for named layers: one per-channel weight observer (axis 0, per tensor
    when the config says so) and one per-tensor activation observer per layer."""

    def __init__(self, layer_names: Iterable[str], config: QATConfig | None = None):
        if isinstance(layer_names, str):
            raise UsageError("layer_names must be a list of names, not one string")
        names = list(layer_names)
        for name in names:
            if not isinstance(name, str) or not name:
                raise UsageError(f"layer names must be non-empty strings, got {name!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UsageError(f"layer names must be unique; repeated: {', '.join(duplicates)}")
        if config is not None and not isinstance(config, QATConfig):
            raise UsageError(f"config must be a QATConfig, got {type(config).__name__}")
        self.config = config or QATConfig()
        self.weight_observers = {n: RangeObserver(self.config.weight_axis) for n in names}
        self.activation_observers = {n: RangeObserver(None) for n in names}

    @property
    def layer_names(self) -> list[str]:
        return list(self.weight_observers)

    def __repr__(self) -> str:
        seen = [n for n in self.layer_names if self.activation_observers[n].seen]
        return f"QATTrainer(layers={self.layer_names}, calibrated={seen}, config={self.config!r})"

    def _layer(self, name: str) -> str:
        if name not in self.weight_observers:
            known = ", ".join(self.layer_names) or "none"
            raise UsageError(f"unknown layer '{name}' (layers: {known})")
        return name

    def calibrate(self, name: str, weights, activations=None) -> None:
        """Record the ranges of a layer's weights and of its input activations."""
        self._layer(name)
        w = _check_weights(name, weights)
        try:
            self.weight_observers[name].update(w)
        except DataError as e:
            raise DataError(f"layer '{name}': weights {e}") from None
        if activations is not None:
            a = np.asarray(activations)
            if a.size == 0 or not np.all(np.isfinite(a)):
                raise DataError(f"layer '{name}': activations are empty or not finite")
            self.activation_observers[name].update(a)

    def activation_quantization(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scale, zero_point)`` of the layer's input from the calibrated range, or None
        when the layer was never calibrated with activations."""
        obs = self.activation_observers[self._layer(name)]
        if not obs.seen:
            return None
        return kernels.scale_zero_point(obs.min, obs.max, self.config.activation_range, symmetric=False)

    def fake_quantize(self, name: str, weights) -> np.ndarray:
        """What the layer's weights become after quantization (quantize then dequantize),
        for the forward pass of a training loop outside torch."""
        return self.quantize_weights(name, weights).dequantize()

    def quantize_weights(self, name: str, weights) -> QuantizedTensor:
        """Quantize a layer's weights with the scale computed from their own range (what
        fake quantization uses at every training step and what the PTQ pass computes)."""
        self._layer(name)
        w = _check_weights(name, weights)
        recorded = self.weight_observers[name].min
        axis = self.config.weight_axis
        if recorded is not None and axis is not None and recorded.shape != (w.shape[axis],):
            raise DataError(
                f"layer '{name}': weights have {w.shape[axis]} output channels but the layer "
                f"was calibrated with {recorded.shape[0]}"
            )
        other = None if axis is None else tuple(d for d in range(w.ndim) if d != axis)
        cfg = self.config
        return _quantize_from_range(
            w, np.min(w, axis=other), np.max(w, axis=other), cfg.weight_range,
            cfg.symmetric_weights, axis, cfg.weight_bits,
        )


def prepare_model_for_qat(layer_names: Iterable[str], config: QATConfig | None = None) -> QATTrainer:
    """A trainer with one weight and one activation observer per layer name."""
    return QATTrainer(layer_names, config)


def convert_qat_to_quantized(
    trainer: QATTrainer, layer_weights: Mapping[str, np.ndarray]
) -> dict[str, QuantizedTensor]:
    """Quantize each layer's trained weights; returns ``{layer: QuantizedTensor}``.

    Weights are quantized from their own (per-channel) range. A layer whose input
    activations were never calibrated is still converted, with a warning: its activation
    range is unknown, so a runtime cannot quantize its input yet.
    """
    if not isinstance(trainer, QATTrainer):
        raise UsageError(f"expected the trainer from prepare_model_for_qat, got {type(trainer).__name__}")
    result = {}
    for name, weights in layer_weights.items():
        result[name] = trainer.quantize_weights(name, weights)
        if trainer.activation_quantization(name) is None:
            warnings.warn(
                f"layer '{name}' was never calibrated: its weights are quantized from their "
                "own range, but its activation range is unknown",
                UserWarning,
                stacklevel=2,
            )
    return result


def fold_bn_into_conv(weight, bias, mean, var, gamma, beta, eps: float = 1e-5):
    """Fold a BatchNorm (inference statistics) into the conv or linear layer before it.

    ``W' = W * gamma / sqrt(var + eps)`` per output channel and
    ``b' = gamma * (b - mean) / sqrt(var + eps) + beta``; a missing bias counts as zero.
    Returns ``(weight, bias)`` in the weight's dtype whatever the dtype of the statistics.
    Calls `zenith_onnx.kernels.fold_batchnorm_into_weight`, the kernel of the ONNX
    BatchNorm-folding pass.
    """
    w = np.asarray(weight)
    if w.ndim < 2 or not np.issubdtype(w.dtype, np.floating):
        raise DataError(f"fold_bn_into_conv: weight must be a float array of rank >= 2, got {w.dtype} {w.shape}")
    channels = w.shape[0]
    named = {"mean": mean, "var": var, "gamma": gamma, "beta": beta}
    if bias is not None:
        named = {"bias": bias, **named}
    for label, value in named.items():
        shape = np.shape(value)
        if shape != (channels,):
            raise DataError(
                f"fold_bn_into_conv: {label} has shape {shape}, expected ({channels},) "
                f"(one value per output channel of the weight {w.shape})"
            )
    if np.any(np.asarray(var, dtype=np.float64) + float(eps) <= 0):
        raise DataError("fold_bn_into_conv: var + eps must be positive")
    return kernels.fold_batchnorm_into_weight(w, bias, gamma, beta, mean, var, eps, axis=0)
