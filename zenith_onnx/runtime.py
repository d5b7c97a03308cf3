"""onnxruntime helpers: sessions at a chosen optimization level, running feeds.

Reference outputs come from ``ORT_DISABLE_ALL`` (onnxruntime's default level folds
Conv+BatchNorm itself and would hide folding bugs); fusion is checked at
``ORT_ENABLE_EXTENDED``; latency is measured at ``ORT_ENABLE_ALL``.

Sessions use one intra-op thread unless told otherwise: results and timings then do not
depend on the machine. ``$ZENITH_ONNX_THREADS`` (or ``--threads`` on the command line)
sets the count for the sessions that name none (calibration, the accuracy report, the
fallback search); 0 is onnxruntime's own default, one thread per physical core.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from zenith_onnx.errors import ModelError, UsageError

__all__ = ["LEVELS", "THREADS_ENV", "default_threads", "using_threads", "model_bytes", "session", "run", "model_file",
           "interleaved_latency"]

LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


THREADS_ENV = "ZENITH_ONNX_THREADS"
# Set by `using_threads` (per thread and task, as a context variable); None: not set.
_threads: contextvars.ContextVar[int | None] = contextvars.ContextVar("zenith_onnx_threads", default=None)


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """Within the block, sessions that name no thread count use ``threads`` (None: no change)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise UsageError(f"threads: expected a number >= 0 (0: one per physical core), got {threads!r}")
    token = _threads.set(threads if threads is not None else _threads.get())
    try:
        yield
    finally:
        _threads.reset(token)


def default_threads() -> int:
    """Intra-op threads of a session that names none: the innermost `using_threads`, else
    ``$ZENITH_ONNX_THREADS``, else 1 (0: onnxruntime's default, one per physical core)."""
    if _threads.get() is not None:
        return _threads.get()
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    try:
        threads = int(raw)
    except ValueError:
        threads = -1
    if threads < 0:
        raise UsageError(f"{THREADS_ENV}={raw!r}: expected a number of threads >= 0 (0: one per physical core)")
    return threads


def model_bytes(model: ir.Model) -> bytes:
    """Serialize an in-memory model (weights inline)."""
    return ir.serde.serialize_model(model).SerializeToString()


@contextlib.contextmanager
def model_file(model: ir.Model | str | os.PathLike) -> Iterator[str]:
    """A path onnxruntime can load: the given path, or a temporary file for an in-memory
    model (with external data when the weights are too large for one protobuf)."""
    if not isinstance(model, ir.Model):
        yield str(model)
        return
    from zenith_onnx.modelio import needs_external_data

    with tempfile.TemporaryDirectory(prefix="zenith-") as tmp:
        path = Path(tmp) / "model.onnx"
        # Weights already in external files must be copied beside the temporary model.
        ir.save(model, path, external_data="model.onnx.data" if needs_external_data(model) else None)
        yield str(path)


def session(
    model: ir.Model | str | os.PathLike | bytes,
    level: str = "disable_all",
    *,
    threads: int | None = None,
    optimized_model_filepath: str | None = None,
    disabled_optimizers: Sequence[str] = (),
) -> ort.InferenceSession:
    """An onnxruntime CPU session at ``level`` (see `LEVELS`) with ``threads`` intra-op
    threads (None: `default_threads`)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = default_threads() if threads is None else threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: every error reaches the caller as an exception
    if optimized_model_filepath:
        options.optimized_model_filepath = optimized_model_filepath
    kwargs = {"providers": ["CPUExecutionProvider"]}
    if disabled_optimizers:
        kwargs["disabled_optimizers"] = list(disabled_optimizers)
    try:
        if isinstance(model, bytes):
            return ort.InferenceSession(model, options, **kwargs)
        if isinstance(model, ir.Model):
            with model_file(model) as path:
                return ort.InferenceSession(path, options, **kwargs)
        return ort.InferenceSession(str(model), options, **kwargs)
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.NotImplemented) as e:
        raise ModelError(f"onnxruntime cannot load the model: {_short(e)}") from None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:400]


def run(
    sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run one feed; returns ``{output name: array}``."""
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    values = sess.run(names, dict(feeds))
    return dict(zip(names, values))


def interleaved_latency(
    sessions: Mapping[str, object],
    feeds: Sequence[Mapping[str, np.ndarray]],
    runs: int = 100,
    warmup: int = 10,
) -> dict[str, dict]:
    """Time ``sessions`` (onnxruntime InferenceSessions by label) in alternating rounds.

    Every session first runs ``warmup`` times; then each of ``runs`` rounds runs every
    session once on the same feed (feeds cycle), in the order given, so slow phases of a
    shared machine hit all of them alike. Returns per label ``median_ms``, ``p90_ms``,
    ``min_ms`` and ``runs``.
    """
    labels = list(sessions)
    feeds = [dict(f) for f in feeds]
    for label in labels:
        for i in range(warmup):
            sessions[label].run(None, feeds[i % len(feeds)])
    times = {label: np.empty(runs) for label in labels}
    clock = time.perf_counter
    for r in range(runs):
        feed = feeds[r % len(feeds)]
        for label in labels:
            sess = sessions[label]
            t = clock()
            sess.run(None, feed)
            times[label][r] = clock() - t
    return {
        label: {
            "median_ms": float(np.median(t) * 1e3),
            "p90_ms": float(np.percentile(t, 90) * 1e3),
            "min_ms": float(t.min() * 1e3),
            "runs": runs,
        }
        for label, t in times.items()
    }
