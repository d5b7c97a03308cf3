"""Fake quantization for torch QAT: one custom op that trains with STE/LSQ gradients and
exports as standard ONNX QuantizeLinear/DequantizeLinear.

``torch.ops.zenith.fake_quant(x, scale, zero_point, axis, quant_min, quant_max)``::

    forward   y = (clamp(round_half_even(x / s) + zp, quant_min, quant_max) - zp) * s
    backward  dy/dx = 1 where round(x / s) + zp lies in [quant_min, quant_max], else 0   (STE)
              dy/ds = round(x/s) - x/s inside, quant_min - zp below, quant_max - zp above,
                      times LSQ's gradient scale 1 / sqrt(N * (quant_max - quant_min))
                      (N = elements per scale), summed per channel                   (LSQ)
    ONNX      x -> QuantizeLinear(s, zp) -> DequantizeLinear(s, zp)   (opset 21)

``quant_min``/``quant_max`` are always the full range of the ONNX type (INT8 -128..127,
UINT8 0..255, INT4 -8..7, UINT4 0..15, INT16, UINT16) because QuantizeLinear saturates
to that range; a narrower range (symmetric weights, -127..127) comes from the scale:
``s = max|w| / 127`` never produces -128. The op computes in float32 exactly like
`zenith_onnx.kernels.fake_quantize` and onnxruntime's QuantizeLinear/DequantizeLinear.

Why a custom op (measured, see QAT-EXPORT-NOTES): torch's aten fake-quant ops export only
8-bit full ranges; float STE math exports as Div/Round/Clip/Mul that the exporter's
optimizer folds off-grid. `torch.library.custom_op` plus a translation function is the
only route that gives 4-bit, a learnable scale and real Q/DQ.

The quantizer modules hold the state: `WeightFakeQuantize` computes its scale from the
current weight at every step (frozen only for export), `ActivationFakeQuantize` records a
range, then freezes it (or learns the scale, LSQ). Scales and zero points always come
from `zenith_onnx.kernels.scale_zero_point`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from zenith_onnx import kernels
from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.qat.config import QATConfig

__all__ = [
    "fake_quantize",
    "fake_quant_onnx",
    "onnx_quant_type",
    "WeightFakeQuantize",
    "ActivationFakeQuantize",
]

logger = logging.getLogger(__name__)


def _broadcast(x: torch.Tensor, scale: torch.Tensor, zero_point: list[int], axis: int | None):
    if axis is None:
        return scale.reshape(()), float(zero_point[0])
    shape = kernels.broadcast_shape(x.dim(), axis)
    zp = torch.tensor(zero_point, dtype=x.dtype, device=x.device).reshape(shape)
    return scale.reshape(shape), zp


@torch.library.custom_op("zenith::fake_quant", mutates_args=())
def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: list[int],
    axis: Optional[int],  # noqa: UP045 (torch.library parses the annotation)
    quant_min: int,
    quant_max: int,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` (see the module docstring)."""
    s, zp = _broadcast(x, scale, zero_point, axis)
    return (torch.clamp(torch.round(x / s) + zp, quant_min, quant_max) - zp) * s


@fake_quantize.register_fake
def _fake_quantize_meta(x, scale, zero_point, axis, quant_min, quant_max):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, axis, quant_min, quant_max = inputs
    ctx.save_for_backward(x, scale)
    ctx.args = (zero_point, axis, quant_min, quant_max)


def _backward(ctx, grad):
    x, scale = ctx.saved_tensors
    zero_point, axis, quant_min, quant_max = ctx.args
    s, zp = _broadcast(x, scale, zero_point, axis)
    v = x / s
    q = torch.round(v) + zp
    below, above = q < quant_min, q > quant_max
    grad_x = grad * ~(below | above) if ctx.needs_input_grad[0] else None
    grad_scale = None
    if ctx.needs_input_grad[1]:
        d = torch.where(below, quant_min - zp, torch.where(above, quant_max - zp, torch.round(v) - v))
        per_scale = max(x.numel() // max(scale.numel(), 1), 1)
        g = grad * d / float(np.sqrt(per_scale * (quant_max - quant_min)))
        if axis is None:
            grad_scale = g.sum().reshape(scale.shape)
        else:
            other = [dim for dim in range(x.dim()) if dim != axis]
            grad_scale = g.sum(dim=other).reshape(scale.shape)
    return grad_x, grad_scale, None, None, None, None


fake_quantize.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ ONNX translation


_ONNX_TYPES = {
    (-128, 127): ir.DataType.INT8,
    (0, 255): ir.DataType.UINT8,
    (-8, 7): ir.DataType.INT4,
    (0, 15): ir.DataType.UINT4,
    (-32768, 32767): ir.DataType.INT16,
    (0, 65535): ir.DataType.UINT16,
}


def onnx_quant_type(qmin: int, qmax: int) -> ir.DataType:
    """The ONNX integer type whose full range is ``[qmin, qmax]``."""
    if (qmin, qmax) not in _ONNX_TYPES:
        raise UsageError(f"no ONNX quantized type has the range [{qmin}, {qmax}]")
    return _ONNX_TYPES[(qmin, qmax)]


def fake_quant_onnx(x, scale, zero_point, axis, quant_min, quant_max):
    """Translation of ``zenith::fake_quant`` for ``torch.onnx.export(custom_translation_table=...)``:
    QuantizeLinear -> DequantizeLinear sharing one typed zero-point constant."""
    from onnxscript import opset21 as op

    dtype = onnx_quant_type(quant_min, quant_max)
    zp = np.asarray(zero_point[0] if axis is None else zero_point).astype(dtype.numpy())
    zp_value = op.Constant(value=ir.tensor(zp, dtype=dtype))
    per_axis = {} if axis is None else {"axis": axis}
    quantized = op.QuantizeLinear(x, scale, zp_value, **per_axis)
    return op.DequantizeLinear(quantized, scale, zp_value, **per_axis)


# ------------------------------------------------------------------ quantizer modules


class _FakeQuantizeBase(nn.Module):
    """State shared by weight and activation quantizers: the effective integer range
    ``qrange`` (for the scale), the ONNX type range ``container`` (for the clamp), the
    per-channel ``axis``, the zero points (Python ints, so export sees constants) and
    whether the scale is frozen."""

    def __init__(self, qrange: kernels.IntRange, bits: int, symmetric: bool, axis: int | None, channels: int):
        super().__init__()
        self.qrange = qrange
        self.bits = bits
        self.container = kernels.int_range(bits, signed=qrange.signed)
        self.symmetric = symmetric
        self.axis = axis
        self.frozen = False
        self.zero_point: list[int] = [0] * channels
        self.register_buffer("scale", torch.ones(channels if axis is not None else ()))

    def _set_qparams(self, rmin: torch.Tensor, rmax: torch.Tensor) -> torch.Tensor:
        """Set scale and zero point from a range with the kernel; returns the scale as a
        new tensor (the op saves that one for backward, so a later update of the buffer
        cannot invalidate a pending backward)."""
        scale, zero_point = kernels.scale_zero_point(
            rmin.detach().cpu().numpy(), rmax.detach().cpu().numpy(), self.qrange, self.symmetric
        )
        scale = torch.from_numpy(np.asarray(scale)).reshape(self.scale.shape).to(self.scale.device)
        with torch.no_grad():
            self.scale.copy_(scale)
        self.zero_point = [int(v) for v in np.ravel(zero_point)]
        return scale

    def _apply(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, scale, self.zero_point, self.axis, self.container.qmin, self.container.qmax)

    def get_extra_state(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "zero_point": list(self.zero_point)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state["frozen"])
        self.zero_point = [int(v) for v in state["zero_point"]]

    def describe(self) -> dict[str, Any]:
        """What this quantizer exports (for the model's metadata and the handoff doc)."""
        return {
            "bits": self.bits,
            "onnx_type": onnx_quant_type(*self.container).name,
            "qmin": self.qrange.qmin,
            "qmax": self.qrange.qmax,
            "symmetric": self.symmetric,
            "axis": self.axis,
        }

    def extra_repr(self) -> str:
        where = "per tensor" if self.axis is None else f"axis={self.axis}"
        return f"bits={self.bits}, range=[{self.qrange.qmin}, {self.qrange.qmax}], {where}, frozen={self.frozen}"


class WeightFakeQuantize(_FakeQuantizeBase):
    """Fake-quantizes a weight with the scale of its current range (per output channel on
    ``axis`` 0, or per tensor), recomputed at every call; `freeze` pins it for export."""

    def __init__(self, config: QATConfig, channels: int):
        axis = config.weight_axis
        super().__init__(config.weight_range, config.weight_bits, config.symmetric_weights, axis, channels)

    def update(self, weight: torch.Tensor) -> torch.Tensor:
        """Set the scale and zero point from ``weight``'s current range; returns the scale."""
        w = weight.detach()
        if self.axis is None:
            return self._set_qparams(w.amin(), w.amax())
        other = [d for d in range(w.dim()) if d != self.axis]
        return self._set_qparams(w.amin(dim=other), w.amax(dim=other))

    def freeze(self, weight: torch.Tensor) -> None:
        self.update(weight)
        self.frozen = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self._apply(weight, self.scale if self.frozen else self.update(weight))

    def describe(self) -> dict[str, Any]:
        return {"kind": "weight", **super().describe(), "learned": False}


class ActivationFakeQuantize(_FakeQuantizeBase):
    """Fake-quantizes an activation (per tensor, asymmetric) with a range recorded by a
    min/max observer, then frozen.

    States: *observing* (training forwards, or any forward inside `calibrate_qat`, record
    the min/max and pass the tensor through unchanged) and *frozen* (scale and zero point
    fixed by `zenith_onnx.kernels.scale_zero_point`; with LSQ the scale keeps training).
    It freezes after ``config.observe_steps`` training forwards, or when
    `freeze_activation_ranges`, `calibrate_qat` or `export_qat` freezes it.
    """

    def __init__(self, config: QATConfig, label: str):
        super().__init__(config.activation_range, config.activation_bits, False, None, 1)
        self.label = label
        self.learn_scale = config.learn_activation_scales
        self.observe_steps = config.observe_steps
        self.calibrating = False
        self.steps = 0
        self._warned = False
        # LSQ learns the scale in the log domain, s = s0 * exp(log_gain), as TQT does: it
        # stays positive whatever the step size, steps are relative to the scale, and
        # s == s0 (the kernel's value) exactly until training moves it. A Parameter from
        # the start, so an optimizer built after prepare_qat sees it.
        self.log_gain = nn.Parameter(torch.zeros(())) if self.learn_scale else None
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def seen(self) -> bool:
        return bool(self.min_val <= self.max_val)

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not bool(torch.isfinite(x).all()):
            raise DataError(f"activation '{self.label}': non-finite values while recording ranges")
        with torch.no_grad():
            self.min_val.copy_(torch.minimum(self.min_val, x.min().float()))
            self.max_val.copy_(torch.maximum(self.max_val, x.max().float()))
        self.steps += 1

    def freeze(self) -> None:
        """Fix the scale and zero point from the recorded range."""
        if not self.seen:
            raise UsageError(
                f"activation quantizer '{self.label}' has recorded no data: run calibrate_qat "
                "or a few training steps before freezing or exporting"
            )
        self._set_qparams(self.min_val, self.max_val)
        self.frozen = True
        logger.debug("froze %s: range [%g, %g] -> scale %g zero point %d", self.label,
                     float(self.min_val), float(self.max_val), float(self.scale), self.zero_point[0])

    def effective_scale(self) -> torch.Tensor:
        """The scale the op uses (with LSQ, the calibrated scale times the learned gain)."""
        return self.scale if self.log_gain is None else self.scale * torch.exp(self.log_gain)

    def make_constant(self) -> None:
        """Fold a learned gain into the ``scale`` buffer (for export: the scale becomes a
        plain initializer holding exactly the value the op used)."""
        if self.log_gain is not None:
            with torch.no_grad():
                self.scale.copy_(self.effective_scale())
            self.log_gain = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return self._apply(x, self.effective_scale())
        if self.training or self.calibrating:
            self.observe(x)
            if self.training and not self.calibrating and self.observe_steps and self.steps >= self.observe_steps:
                self.freeze()
        elif not self._warned:
            warnings.warn(
                f"activation quantizer '{self.label}' has no frozen range yet, so this eval "
                "forward is not quantized there: run calibrate_qat or training steps first",
                UserWarning,
                stacklevel=2,
            )
            self._warned = True
        return x

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.steps = int(state.get("steps", 0))

    def describe(self) -> dict[str, Any]:
        return {"kind": "activation", **super().describe(), "learned": self.learn_scale}

    def extra_repr(self) -> str:
        return f"'{self.label}', {super().extra_repr()}" + (", lsq" if self.learn_scale else "")
