"""Raising a model's opset, only as far as a feature needs and saying why."""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

from zenith_onnx.errors import ModelError
from zenith_onnx.modelio import default_opset

__all__ = ["ensure_opset"]

logger = logging.getLogger(__name__)


def ensure_opset(model: ir.Model, minimum: int, reason: str) -> tuple[ir.Model, str | None]:
    """Return ``model`` at default-domain opset >= ``minimum`` and a note, or the same
    model and None when it already is. Uses onnx's version converter."""
    current = default_opset(model)
    if current >= minimum:
        return model, None
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
    except Exception as e:  # the converter raises plain RuntimeError/ValueError with C++ text
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ModelError(f"cannot raise the opset from {current} to {minimum} ({reason}): {first}") from None
    note = f"raised the opset from {current} to {minimum}: {reason}"
    logger.info(note)
    raised = ir.serde.deserialize_model(converted)
    _carry_meta(model, raised)
    return raised, note


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        values.update((o.name, o) for o in node.outputs)
    return values


def _carry_meta(source: ir.Model, target: ir.Model) -> None:
    """In-memory metadata (frozen quantization parameters) follows values by name."""
    target_values = _values(target)
    for name, value in _values(source).items():
        if value.meta and name in target_values:
            target_values[name].meta.update(value.meta)
