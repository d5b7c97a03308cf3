"""Errors a user can cause.

Every failure that comes from the user's input (a file, a flag, calibration data) is a
`ZenithError` with one clear message naming the file, tensor or node. The CLI turns
them into one line on stderr and exit code 2; anything else is a programming error and
keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ZenithError",
    "ModelError",
    "DataError",
    "UsageError",
    "PassFailedError",
]


class ZenithError(Exception):
    """Base class for errors caused by the user's input."""


class ModelError(ZenithError):
    """The model file is missing, malformed, unsafe or unsupported."""


class DataError(ZenithError):
    """Calibration or evaluation data does not fit the model."""


class UsageError(ZenithError):
    """Options that do not make sense together, or unknown names."""


class PassFailedError(ZenithError):
    """A graph pass rejected the model; the message names the pass."""
