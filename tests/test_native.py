"""The compiled counting loop of the histogram observers (`zenith_onnx/_native.c`).

The observers' own tests (tests/test_observers.py) run with it and with the numpy fallback.
"""

from __future__ import annotations

import numpy as np
import pytest

from zenith_onnx import observers

_native = observers._native
pytestmark = pytest.mark.skipif(_native is None, reason="zenith_onnx._native was not built (no C compiler)")


@pytest.mark.parametrize("n", [1, 100, 4095, 4096, 4099, 70_000])
def test_native_count_equals_float64_floor_and_clip(n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    x[::7] = 0.0  # runs of equal values (a ReLU's zeros)
    x[:3] = [-9.0, 9.0, 0.25][:n]  # below the window, above it, on an edge
    slots = np.zeros(129, np.int64)
    origin, inverse = -2.0, 32.0  # 128 bins of 1/32 over [-2, 2) plus the spare slot
    _native.count(x, slots, origin, inverse)
    index = np.clip(np.floor((x.astype(np.float64) - origin) * inverse), 0, 128).astype(np.intp)
    assert np.array_equal(slots, np.bincount(index, minlength=129))
    _native.count(x, slots, origin, inverse)  # adds to what is there
    assert slots.sum() == 2 * n


def test_native_count_refuses_other_buffers():
    slots = np.zeros(16, np.int64)
    with pytest.raises(TypeError, match="values"):
        _native.count(np.zeros(4, np.float64), slots, 0.0, 1.0)
    with pytest.raises(TypeError, match="slots"):
        _native.count(np.zeros(4, np.float32), np.zeros(16, np.int32), 0.0, 1.0)
    with pytest.raises((TypeError, ValueError, BufferError)):
        _native.count(np.zeros(4, np.float32), np.zeros(16, np.int64)[::2], 0.0, 1.0)
