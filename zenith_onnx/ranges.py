"""Activation ranges: the result of calibration and its JSON file.

Format (DESIGN.md)::

    {"format": "zenith-onnx-ranges/1",
     "method": "entropy",
     "tensors": {"<tensor name>": {"min": -1.5, "max": 6.0}, ...},
     "scales": {"<tensor name>": 0.0235, ...}}          # optional, ranges learned in QAT

`Ranges.save` writes atomically (temporary file + rename); `Ranges.load` checks every
field and turns a bad file into one `DataError` line naming the file and the entry.
`safe_range` is the one place that decides what a degenerate range becomes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from zenith_onnx.errors import DataError
from zenith_onnx.modelio import atomic_output

__all__ = ["FORMAT", "MIN_RANGE_WIDTH", "TensorRange", "Ranges", "safe_range"]

FORMAT = "zenith-onnx-ranges/1"
# A range narrower than this (after including 0) is widened to it: the scale of a
# 16-bit grid on it stays a normal float32, and 0 stays exactly representable.
MIN_RANGE_WIDTH = 1e-6
# Bounds past the float32 range would give an infinite float32 scale.
_FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class TensorRange:
    min: float
    max: float


def safe_range(lo: float, hi: float) -> tuple[TensorRange, bool]:
    """``(range, widened)``: ``[lo, hi]`` itself, or for a degenerate range (constant
    values, min == max, or narrower than `MIN_RANGE_WIDTH`) the range widened to
    include 0 and to at least `MIN_RANGE_WIDTH`, with ``widened`` True."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"not a range: [{lo}, {hi}]")
    if lo < hi and hi - lo >= MIN_RANGE_WIDTH:
        return TensorRange(float(lo), float(hi)), False
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < MIN_RANGE_WIDTH:
        if hi > 0.0 or lo == 0.0:
            hi = lo + MIN_RANGE_WIDTH
        else:
            lo = hi - MIN_RANGE_WIDTH
    return TensorRange(float(lo), float(hi)), True


@dataclasses.dataclass
class Ranges:
    """Calibrated ``[min, max]`` per tensor name (``tensors[name].min / .max``).

    ``skipped`` (not saved): tensors that were asked for but could not be observed,
    with the reason (e.g. inside a subgraph).
    """

    method: str
    tensors: dict[str, TensorRange] = dataclasses.field(default_factory=dict)
    scales: dict[str, float] | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        data = {
            "format": FORMAT,
            "method": self.method,
            "tensors": {name: {"min": r.min, "max": r.max} for name, r in self.tensors.items()},
        }
        if self.scales is not None:
            data["scales"] = dict(self.scales)
        return data

    @classmethod
    def from_dict(cls, data, source: str = "ranges") -> Ranges:
        """Validate a parsed ranges document; ``source`` names it in errors."""
        if not isinstance(data, Mapping):
            raise DataError(f"{source}: not a ranges file (expected a JSON object)")
        if data.get("format") != FORMAT:
            raise DataError(f"{source}: format is {data.get('format')!r}, expected {FORMAT!r}")
        method = data.get("method")
        if not isinstance(method, str) or not method:
            raise DataError(f"{source}: 'method' must be a non-empty string")
        entries = data.get("tensors")
        if not isinstance(entries, Mapping):
            raise DataError(f"{source}: 'tensors' must be an object of {{name: {{min, max}}}}")
        tensors = {}
        for name, entry in entries.items():
            if not isinstance(entry, Mapping) or set(entry) != {"min", "max"}:
                raise DataError(f"{source}: tensor '{name}' must be {{\"min\": number, \"max\": number}}")
            lo, hi = (_finite(entry[k], source, f"tensor '{name}' {k}") for k in ("min", "max"))
            if lo > hi:
                raise DataError(f"{source}: tensor '{name}' has min {lo} > max {hi}")
            tensors[name] = TensorRange(lo, hi)
        scales = data.get("scales")
        if scales is not None:
            if not isinstance(scales, Mapping):
                raise DataError(f"{source}: 'scales' must be an object of {{name: scale}}")
            scales = {name: _finite(v, source, f"scale of '{name}'") for name, v in scales.items()}
            bad = next((name for name, v in scales.items() if v <= 0), None)
            if bad is not None:
                raise DataError(f"{source}: scale of '{bad}' must be positive, got {scales[bad]}")
        return cls(method, tensors, scales)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON file atomically (a failure leaves no partial file)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        with atomic_output(path) as tmp:
            Path(tmp).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Ranges:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read ranges file ({getattr(e, 'strerror', None) or e})") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}: not valid JSON ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
        return cls.from_dict(data, str(path))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite(value, source: str, what: str) -> float:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= _FLOAT32_MAX else math.nan
    if not math.isfinite(number):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise DataError(f"{source}: {what} must be a finite number (float32, |x| <= 3.4e38), got {shown}")
    return number
