"""Helpers for tests (ours and users'): compare models by outputs under onnxruntime.

`assert_outputs_close(a, b)` runs both models at ``ORT_DISABLE_ALL`` on the same feeds
and checks the relative error of every output (``max|a - b| / max|a|``, absolute for an
all-zero output). `assert_graphs_equal` (structure) lives beside it, backed by
`zenith_onnx.diff`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from zenith_onnx import runtime

__all__ = [
    "relative_error",
    "sqnr_db",
    "random_feeds",
    "reference_outputs",
    "assert_outputs_close",
    "assert_graphs_equal",
]

_NUMPY_OF = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT8: np.int8,
    ir.DataType.BOOL: np.bool_,
}


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``max|ref - got| / max|ref|``; absolute when ``ref`` is all zero."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if ref.shape != got.shape:
        raise AssertionError(f"shapes differ: {ref.shape} vs {got.shape}")
    err = float(np.max(np.abs(ref - got))) if ref.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err / scale if scale > 0 else err


def sqnr_db(ref: np.ndarray | Sequence[np.ndarray], got: np.ndarray | Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum ref^2 / sum (ref - got)^2)``."""
    refs = [np.asarray(r, dtype=np.float64).ravel() for r in (ref if isinstance(ref, (list, tuple)) else [ref])]
    gots = [np.asarray(g, dtype=np.float64).ravel() for g in (got if isinstance(got, (list, tuple)) else [got])]
    signal = sum(float(np.sum(r * r)) for r in refs)
    noise = sum(float(np.sum((r - g) ** 2)) for r, g in zip(refs, gots))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def random_feeds(model: ir.Model, seed: int = 0, dim: int = 1) -> dict[str, np.ndarray]:
    """One feed of standard-normal data for every graph input; symbolic dims become ``dim``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        shape = [d if isinstance(d, int) and d >= 0 else dim for d in (value.shape or [])]  # -1: dynamic (Paddle)
        dtype = _NUMPY_OF.get(value.dtype, np.float32)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds


def reference_outputs(
    model: ir.Model | str | bytes, feeds: Mapping[str, np.ndarray], level: str = "disable_all"
) -> dict[str, np.ndarray]:
    """Outputs of ``model`` in onnxruntime at ``level`` (default ``ORT_DISABLE_ALL``)."""
    return runtime.run(runtime.session(model, level), feeds)


def assert_outputs_close(
    expected: ir.Model | str,
    actual: ir.Model | str,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    rtol: float = 1e-5,
) -> dict[str, float]:
    """Assert both models give the same outputs (relative error <= ``rtol``) on ``feeds``
    (default: one random feed). Returns the worst relative error per output."""
    if feeds is None:
        model = expected if isinstance(expected, ir.Model) else ir.load(expected)
        feeds = [random_feeds(model)]
    elif isinstance(feeds, Mapping):
        feeds = [feeds]
    sess_a = runtime.session(expected, "disable_all")
    sess_b = runtime.session(actual, "disable_all")
    names_a = [o.name for o in sess_a.get_outputs()]
    names_b = [o.name for o in sess_b.get_outputs()]
    if names_a != names_b:
        raise AssertionError(f"outputs differ: {names_a} vs {names_b}")
    worst = dict.fromkeys(names_a, 0.0)
    for feed in feeds:
        out_a = runtime.run(sess_a, feed)
        out_b = runtime.run(sess_b, feed)
        for name in names_a:
            worst[name] = max(worst[name], relative_error(out_a[name], out_b[name]))
    bad = {k: v for k, v in worst.items() if not v <= rtol}
    if bad:
        raise AssertionError(f"outputs differ beyond rtol={rtol}: {bad}")
    return worst


def assert_graphs_equal(a: ir.Model | str, b: ir.Model | str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Assert two models are structurally equal (see `zenith_onnx.diff`)."""
    from zenith_onnx.diff import diff_models

    report = diff_models(a, b, rtol=rtol, atol=atol)
    if not report.same:
        raise AssertionError("graphs differ:\n" + report.format())
