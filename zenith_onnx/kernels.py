"""Numeric kernels shared by the ONNX passes and the QAT stage.

Pure numpy, no graph code: BatchNorm folding and the affine quantization math
(integer ranges, scale/zero-point, quantize, dequantize). The ONNX passes and the
torch QAT stage both call these, so a model quantized after training and one
quantized from calibration agree bit for bit.

Conventions follow ONNX QuantizeLinear/DequantizeLinear:
``q = saturate(round_half_even(x / scale) + zero_point)``, ``x' = (q - zero_point) * scale``,
computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "IntRange",
    "batchnorm_affine",
    "fold_batchnorm_into_weight",
    "fold_batchnorm_into_following_weight",
    "int_range",
    "scale_zero_point",
    "quantize",
    "dequantize",
    "fake_quantize",
    "broadcast_shape",
]


# ---------------------------------------------------------------- BatchNorm folding


def batchnorm_affine(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization (inference) as a per-channel affine map ``y = a * x + c``.

    ``a = gamma / sqrt(var + eps)``, ``c = beta - a * mean``; computed in float64 so the
    folded parameters round once, when cast back to the weight's dtype.
    """
    gamma, beta, mean, var = (np.asarray(t, dtype=np.float64) for t in (gamma, beta, mean, var))
    a = gamma / np.sqrt(var + float(eps))
    return a, beta - a * mean


def broadcast_shape(ndim: int, axis: int) -> list[int]:
    """Shape that broadcasts a 1-D per-channel vector along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def fold_batchnorm_into_weight(
    weight: np.ndarray,
    bias: np.ndarray | None,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = 1e-5,
    axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a BatchNormalization that follows a linear layer into that layer.

    ``BN(W x + b) = (a W) x + (a (b - mean) + beta)`` with ``a`` broadcast along the
    weight's output-channel ``axis`` (0 for Conv and Gemm with transB=1, 1 for
    ConvTranspose viewed per group, the last axis for MatMul). Returns ``(weight, bias)``
    in the weight's dtype; a missing bias is treated as zero.
    """
    weight = np.asarray(weight)
    dtype = weight.dtype
    a, c = batchnorm_affine(gamma, beta, mean, var, eps)
    channels = weight.shape[axis]
    if a.shape != (channels,):
        raise ValueError(
            f"BatchNormalization has {a.size} channels but the weight has {channels} on axis {axis}"
        )
    folded_w = weight.astype(np.float64) * a.reshape(broadcast_shape(weight.ndim, axis))
    b = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64)
    if b.shape != (channels,):
        raise ValueError(f"bias has shape {b.shape}, expected ({channels},)")
    folded_b = a * b + c
    return folded_w.astype(dtype), folded_b.astype(dtype)


def fold_batchnorm_into_following_weight(
    weight: np.ndarray,
    bias: np.ndarray | None,
    a: np.ndarray,
    c: np.ndarray,
    group: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an affine map ``x -> a x + c`` on the input channels into the Conv after it.

    ``Conv(a x + c) = Conv_{W a}(x) + sum_{in, k} W c``: each weight is scaled by the
    ``a`` of its input channel and the bias absorbs the constant term. This is exact only
    when the Conv reads no padding (a padded zero would have been ``c``). ``weight`` has
    shape ``(O, I/group, *k)``.
    """
    weight = np.asarray(weight)
    dtype = weight.dtype
    out_ch, in_per_group = weight.shape[:2]
    a = np.asarray(a, dtype=np.float64).reshape(group, in_per_group)
    c = np.asarray(c, dtype=np.float64).reshape(group, in_per_group)
    # Output channel o belongs to group o // (O / group) and reads that group's inputs.
    group_of_out = np.arange(out_ch) // (out_ch // group)
    a_per_out = a[group_of_out]  # (O, I/group)
    c_per_out = c[group_of_out]
    spatial = (1,) * (weight.ndim - 2)
    w64 = weight.astype(np.float64)
    folded_w = w64 * a_per_out.reshape(out_ch, in_per_group, *spatial)
    shift = (w64 * c_per_out.reshape(out_ch, in_per_group, *spatial)).reshape(out_ch, -1).sum(axis=1)
    b = np.zeros(out_ch) if bias is None else np.asarray(bias, dtype=np.float64)
    return folded_w.astype(dtype), (b + shift).astype(dtype)


# ---------------------------------------------------------------- quantization math


class IntRange(NamedTuple):
    """The integer range of a quantized type."""

    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


def int_range(bits: int, signed: bool, narrow: bool = False) -> IntRange:
    """Integer range of a ``bits``-wide type; ``narrow`` drops the most negative value
    (symmetric weights: -127..127) so that +/- ranges are equal."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    if signed:
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        if narrow:
            qmin += 1
    else:
        qmin, qmax = 0, (1 << bits) - 1
    return IntRange(qmin, qmax)


def scale_zero_point(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    qrange: IntRange,
    symmetric: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) that map ``[rmin, rmax]`` onto ``qrange``.

    The range is first widened to include 0 so that zero is exact (padding, ReLU). A
    symmetric map puts the zero point in the middle of the integer range and uses
    ``max(|rmin|, |rmax|)``. A range of width 0 (a constant tensor, or one never seen)
    gets scale 1 so no scale is ever zero, infinite or NaN. Works element-wise for
    per-channel ranges.
    """
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if not (np.all(np.isfinite(rmin)) and np.all(np.isfinite(rmax))):
        raise ValueError("range bounds must be finite")
    qmin, qmax = float(qrange.qmin), float(qrange.qmax)
    if symmetric:
        amax = np.maximum(-rmin, rmax)
        half = (qmax - qmin) / 2.0
        scale = amax / half
        zero_point = np.full(np.shape(scale), np.ceil((qmax + qmin) / 2.0))
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_point = np.where(scale > 0, np.round(qmin - rmin / np.where(scale > 0, scale, 1.0)), 0)
        zero_point = np.clip(zero_point, qmin, qmax)
    tiny = np.finfo(np.float32).tiny
    degenerate = ~(scale.astype(np.float32) >= tiny)
    scale = np.where(degenerate, 1.0, scale)
    if not symmetric:
        zero_point = np.where(degenerate, np.clip(0, qmin, qmax), zero_point)
    return scale.astype(np.float32), zero_point.astype(np.int64)


def _per_axis(v: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    v = np.asarray(v)
    if v.ndim == 0 or axis is None:
        return v
    return v.reshape(broadcast_shape(ndim, axis))


def _broadcast_qparams(ndim: int, scale, zero_point, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (int64) shaped to broadcast against an ``ndim`` array."""
    s = _per_axis(np.asarray(scale, dtype=np.float32), ndim, axis)
    zp = _per_axis(np.asarray(zero_point, dtype=np.int64), ndim, axis)
    return s, zp


def quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    qrange: IntRange,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX QuantizeLinear: ``clip(round_half_even(x / scale) + zp, qmin, qmax)`` as int64."""
    x = np.asarray(x, dtype=np.float32)
    s, zp = _broadcast_qparams(x.ndim, scale, zero_point, axis)
    q = np.rint(x / s).astype(np.int64) + zp
    return np.clip(q, qrange.qmin, qrange.qmax)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    axis: int | None = None,
) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zp) * scale`` in float32."""
    q = np.asarray(q)
    s, zp = _broadcast_qparams(q.ndim, scale, zero_point, axis)
    return ((q.astype(np.int64) - zp).astype(np.float32) * s).astype(np.float32)


def fake_quantize(
    x: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int,
    qrange: IntRange,
    axis: int | None = None,
) -> np.ndarray:
    """Quantize then dequantize: what a Q->DQ pair computes."""
    return dequantize(quantize(x, scale, zero_point, qrange, axis), scale, zero_point, axis)
