"""Calibration: observe activation ranges on sample data, one batch at a time.

`calibrate` copies the model, runs the ``observe`` pass on the copy (the tensors to
observe become graph outputs), runs the copy in onnxruntime at ``ORT_ENABLE_ALL`` and
feeds each returned activation to its observer before dropping it. Memory holds at most
two batches of activations plus a fixed-size state per tensor (see
`zenith_onnx.observers`), whatever the number of samples.

Why ``ORT_ENABLE_ALL``: an observed tensor is a graph output, so onnxruntime keeps it
under its name (no fusion removes it), and its values are those of the optimized graph,
which the float parts of the quantized model run too. They differ from an
``ORT_DISABLE_ALL`` run by float rounding only (other kernels, e.g. blocked-layout
convolutions), and the run takes about half the time.

Time: onnxruntime runs the next batch in a worker thread while this thread bins the
previous one (onnxruntime releases the GIL; its intra-op thread count is ``threads``);
reading the batches goes to the thread with less to do (`_run_observed`).
Tensors whose values follow from another observed tensor are not fetched nor binned,
nor made graph outputs (each output blocks a fusion or costs a layout conversion):
outputs of Reshape/Flatten/Squeeze/Unsqueeze/Transpose/Identity hold the same values as
their input, and a Relu output's state is derived from its input's (`Observer.relu`).

The result is `Ranges` (`zenith_onnx.ranges`): ``ranges.tensors[name].min / .max``.
Tensors that never received a value, or whose values were all equal, get a safe range
(`ranges.safe_range`) and a warning naming them. NaN or Inf in an activation stops
calibration with a `DataError` naming the tensor, its producer and the samples.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from zenith_onnx import runtime
from zenith_onnx.calibration_data import Feeds, as_feeds
from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.observers import HistogramObserver, NonFiniteValuesError, Observer, observer_for
from zenith_onnx.passes._graph import is_default_domain
from zenith_onnx.passes.observe import ObservePass
from zenith_onnx.qconfig import CALIBRATION_METHODS, DEFAULT_METHOD
from zenith_onnx.ranges import Ranges, safe_range

__all__ = ["calibrate", "calibrate_file", "observer_for"]

logger = logging.getLogger(__name__)

_FLOAT_ORT_TYPES = {"tensor(float)", "tensor(float16)", "tensor(double)"}
_ORT_RUN_ERRORS = (
    ort.capi.onnxruntime_pybind11_state.Fail,
    ort.capi.onnxruntime_pybind11_state.InvalidArgument,
    ort.capi.onnxruntime_pybind11_state.RuntimeException,
)


def _check_options(method: str, percentile: float, activation_bits: int) -> None:
    if method not in CALIBRATION_METHODS:
        raise UsageError(f"unknown calibration method '{method}' (choose from {', '.join(CALIBRATION_METHODS)})")
    if not 50.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (50, 100], got {percentile}")
    if isinstance(activation_bits, bool) or not isinstance(activation_bits, int) or not 2 <= activation_bits <= 16:
        raise UsageError(f"activation bits must be an integer from 2 to 16, got {activation_bits!r}")


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def _progress_bar(total: int | None, enabled: bool | None):
    """A tqdm bar on stderr when it is a terminal (or when asked); a no-op otherwise."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    bar = None
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            logger.debug("tqdm is not installed; no progress bar")
        else:
            bar = tqdm(total=total, unit="sample", desc="calibrating", file=sys.stderr, leave=False)
    try:
        yield (bar.update if bar is not None else (lambda n: None))
    finally:
        if bar is not None:
            bar.close()


# Ops whose output holds exactly the values of their first input, rearranged.
_SAME_VALUES = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})


def _derivations(graph: ir.Graph, names: Sequence[str]) -> dict[str, tuple[str, bool]]:
    """Observed tensors whose observer state follows exactly from another observed
    tensor's: ``name -> (root, through a Relu)``. A `_SAME_VALUES` op keeps the multiset
    of values; ``Relu(x) = max(x, 0)`` is derived by `Observer.relu`.
    Those tensors are neither fetched from onnxruntime nor binned."""
    wanted = set(names)
    step: dict[str, tuple[str, bool]] = {}
    for node in graph:
        if not is_default_domain(node) or not node.inputs or node.inputs[0] is None:
            continue
        relu = node.op_type == "Relu"
        if not (relu or node.op_type in _SAME_VALUES):
            continue
        source, output = node.inputs[0].name, node.outputs[0].name
        if source in wanted and output in wanted:
            step[output] = (source, relu)
    derived: dict[str, tuple[str, bool]] = {}
    for name in step:
        chain, root = [], name
        while root in step and root not in derived:
            chain.append(root)
            root = step[root][0]
        base_root, base_relu = derived.get(root, (root, False))
        for link in reversed(chain):  # from the root outwards
            base_relu = base_relu or step[link][1]
            derived[link] = (base_root, base_relu)
    return derived


class _Observation:
    """Observers by tensor name, and where each tensor comes from (for error messages).

    Only root tensors have an observer of their own; `observer` gives any tensor's final
    state (derived ones through `_derivations`)."""

    def __init__(self, graph: ir.Graph, names: Sequence[str], make_observer):
        self.names = list(names)
        self.derived = _derivations(graph, self.names)
        self.observers: dict[str, Observer] = {n: make_observer() for n in self.names if n not in self.derived}
        self._producers = {v.name: node for node in graph for v in node.outputs if v.name in self.observers}

    def state(self, name: str) -> tuple[str, bool]:
        """``(root, through a Relu)``: whose observer ``name``'s state follows from."""
        return self.derived.get(name, (name, False))

    def drop(self, names: Sequence[str]) -> None:
        """Stop observing ``names`` and the tensors derived from them."""
        gone = set(names)
        gone.update(n for n, (root, _) in self.derived.items() if root in gone)
        self.names = [n for n in self.names if n not in gone]
        for name in gone:
            self.derived.pop(name, None)
            self.observers.pop(name, None)

    def observer(self, name: str) -> Observer:
        root, relu = self.state(name)
        return self.observers[root].relu() if relu else self.observers[root]

    def feed(self, name: str, array: np.ndarray, span: tuple[int, int] | None) -> None:
        """Observe ``array`` for ``name``; ``span``: the samples it came from (None for a constant)."""
        try:
            self.observers[name].observe(array)
        except NonFiniteValuesError as e:
            if span is None:
                raise DataError(f"constant '{name}' has {e}") from None
            node = self._producers.get(name)
            origin = f" (output of node '{node.name}', {node.op_type})" if node is not None else ""
            samples = f"sample {span[0]}" if span[1] - span[0] == 1 else f"samples {span[0]}..{span[1] - 1}"
            raise DataError(
                f"activation '{name}'{origin} has {e} in {samples}; "
                "the float model produces non-finite values on this data"
            ) from None


def _run_observed(session, outputs: list[str], feeds: Feeds, observation: _Observation, inputs: list[str], progress):
    """Run every feed and observe the results; returns the number of samples.

    A worker thread runs onnxruntime on the next feed (it releases the GIL) while this
    thread bins the activations of the previous one, so observing overlaps inference;
    at most two batches of activations are alive at a time. Reading the next feed (which
    may decode images, or generate samples) goes to the thread that had less to do on the
    last batch: onnxruntime's run against this thread's observing. Histograms of a
    MobileNet-like network cost more than its inference, extremes much less; a small CNN's
    histograms, counted by the compiled loop, cost less too.
    """
    samples = 0
    batches = iter(feeds)
    # First guess, until one batch has been timed: histograms cost more than inference.
    read_in_worker = any(isinstance(o, HistogramObserver) for o in observation.observers.values())

    def run(feed, span):  # in the worker; reads the next feed itself when given none
        if feed is None:
            feed = next(batches, None)
            if feed is None:
                return None
            span = feeds.span
        start = time.perf_counter()
        try:
            values = session.run(outputs, feed)
        except _ORT_RUN_ERRORS as e:
            message = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            raise DataError(f"onnxruntime failed on calibration samples {span[0]}..{span[1] - 1}: {message}") from None
        return feed, span, values, time.perf_counter() - start

    def submit(pending):
        """Queue the next batch: ``(future, whether the worker reads it)``, or None at the end."""
        # The worker runs its tasks in order, so a read it was given is over before the
        # next task starts; this thread must not read while one may still be under way.
        if read_in_worker or (pending is not None and pending[1] and not pending[0].done()):
            return worker.submit(run, None, None), True
        feed = next(batches, None)
        return None if feed is None else (worker.submit(run, feed, feeds.span), False)

    with _progress_bar(feeds.count, progress) as advance, ThreadPoolExecutor(1, "zenith-calibrate") as worker:
        pending = submit(None)
        while pending is not None:
            # Queued before waiting, so the worker goes on without waiting for this thread.
            following = submit(pending)
            try:
                done = pending[0].result()
            except BaseException:
                if following is not None:
                    following[0].cancel()
                raise
            if done is None:
                break
            start = time.perf_counter()
            feed, span, values, inference = done
            for name, value in zip(outputs, values):
                observation.feed(name, value, span)
            for name in inputs:
                observation.feed(name, feed[name], span)
            del done, feed, values  # before the next batch is queued: two batches at most
            read_in_worker = time.perf_counter() - start > inference
            samples += span[1] - span[0]
            advance(span[1] - span[0])
            pending = following
    return samples


def _finish(observation: _Observation, method: str) -> Ranges:
    ranges = Ranges(method)
    never, constant = [], []
    found: dict[tuple[str, bool], tuple[float, float]] = {}  # tensors in one state share a search
    for name in observation.names:
        observer = observation.observer(name)
        if observer.count == 0:
            never.append(name)
            lo = hi = 0.0
        else:
            state = observation.state(name)
            if state not in found:
                found[state] = observer.compute_range()
            lo, hi = found[state]
        ranges.tensors[name], widened = safe_range(lo, hi)
        if widened and observer.count:
            constant.append(name)
    if never:
        logger.warning(
            "%d tensor(s) received no values (empty on every sample); given the safe range [%g, %g]: %s",
            len(never), ranges.tensors[never[0]].min, ranges.tensors[never[0]].max, _names(never),
        )
    if constant:
        logger.warning(
            "%d tensor(s) are constant on the calibration data; their ranges were widened to include 0: %s",
            len(constant), _names(constant),
        )
    return ranges


def _calibrate(
    model: ir.Model,
    data,
    tensors: Sequence[str] | None,
    *,
    method: str,
    percentile: float,
    activation_bits: int,
    batch_size: int,
    progress: bool | None,
    threads: int | None,
) -> tuple[Ranges, int]:
    _check_options(method, percentile, activation_bits)
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected an onnx_ir.Model, got {type(model).__name__}")
    feeds = as_feeds(data, model, batch_size)
    try:
        observed, plan, observation = _expose(
            model, tensors, lambda: observer_for(method, percentile=percentile, bits=activation_bits))
        with runtime.using_threads(threads):  # refuses a bad count
            session = runtime.session(observed, "all")
        if tensors is None:
            # A derived tensor has its root's type (Relu and the reshaping ops keep it).
            types = {v.name: v.type for v in (*session.get_inputs(), *session.get_outputs())}
            dropped = [n for n in plan.outputs if types.get(observation.state(n)[0]) not in _FLOAT_ORT_TYPES]
            if dropped:
                logger.debug("%d tensors of unknown type turned out not to be float; not observed", len(dropped))
                observation.drop(dropped)
        roots = observation.observers
        if plan.constants:
            graph = observed.graph
            values = {v.name: v for v in (*graph.initializers.values(), *(o for n in graph for o in n.outputs))}
            for name in plan.constants:
                if name in roots:
                    observation.feed(name, _constant_array(values[name]), None)
        fetch = [n for n in plan.outputs if n in roots]
        logger.info("observing %d tensors: %d fetched from onnxruntime, %d derived from others",
                    len(observation.names), len(fetch), len(observation.derived))
        inputs = [n for n in plan.inputs if n in roots]
        samples = _run_observed(session, fetch, feeds, observation, inputs, progress)
    finally:
        feeds.close()
    ranges = _finish(observation, method)
    ranges.skipped = dict(plan.skipped)
    return ranges, samples


def _expose(model: ir.Model, tensors: Sequence[str] | None, make_observer) -> tuple[ir.Model, ObservePass, _Observation]:
    """A copy of ``model`` with the tensors to observe (``tensors``, or the default
    selection) as graph outputs, except those derived from another observed tensor; the
    pass that chose them; and their observers (``make_observer()`` each)."""
    observed = model.clone()
    plan = ObservePass(tensors)
    plan(observed)
    observation = _Observation(observed.graph, [*plan.outputs, *plan.inputs, *plan.constants], make_observer)
    model_outputs = {v.name for v in model.graph.outputs}
    for value in [v for v in observed.graph.outputs if v.name in observation.derived]:
        if value.name not in model_outputs:
            observed.graph.outputs.remove(value)
    return observed, plan, observation


def _constant_array(value: ir.Value) -> np.ndarray:
    if value.const_value is not None:
        return value.const_value.numpy()
    return value.producer().attributes["value"].as_tensor().numpy()


def calibrate(
    model: ir.Model,
    data,
    tensors: Sequence[str] | None = None,
    *,
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    activation_bits: int = 8,
    batch_size: int = 1,
    progress: bool | None = None,
    threads: int | None = None,
) -> Ranges:
    """Observe activation ranges of ``model`` on ``data``; the model is not changed.

    ``data``: an ``.npz`` path, a dict of stacked arrays, an iterable of feed dicts or an
    object with ``get_next()`` (see `zenith_onnx.calibration_data`). ``tensors``: names to
    observe (default: inputs and outputs of the ops in
    `zenith_onnx.passes.observe.DEFAULT_OBSERVED_OPS`). ``method``: one of
    `qconfig.CALIBRATION_METHODS`; ``percentile`` is used by "percentile" and
    ``activation_bits`` by "entropy" and "mse". ``batch_size`` samples run per
    onnxruntime call (axis 0 must be symbolic). ``progress``: a tqdm bar (default: when
    stderr is a terminal). ``threads``: onnxruntime intra-op threads (None:
    `zenith_onnx.runtime.default_threads`, 1 unless ``$ZENITH_ONNX_THREADS`` says otherwise).
    """
    return _calibrate(
        model, data, tensors, method=method, percentile=percentile, activation_bits=activation_bits,
        batch_size=batch_size, progress=progress, threads=threads,
    )[0]


def calibrate_file(
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    method: str = DEFAULT_METHOD,
    percentile: float = 99.99,
    activation_bits: int = 8,
    batch_size: int = 1,
    threads: int | None = None,
) -> Ranges:
    """`calibrate` a model file on an ``.npz`` and write the ranges JSON atomically;
    prints a one-line summary."""
    from zenith_onnx.modelio import load_model

    out = Path(out_path).resolve()
    for given in (model_path, data_path):
        if out == Path(given).resolve():
            raise UsageError(f"{out_path}: the output would overwrite the input '{given}'; choose another path")
    _check_options(method, percentile, activation_bits)
    model = load_model(model_path)
    start = time.perf_counter()
    ranges, samples = _calibrate(
        model, data_path, None, method=method, percentile=percentile, activation_bits=activation_bits,
        batch_size=batch_size, progress=None, threads=threads,
    )
    ranges.save(out_path)
    print(
        f"{model_path}: {len(ranges.tensors)} tensor ranges ({method}) from {samples} samples "
        f"in {time.perf_counter() - start:.2f} s -> {out_path}"
    )
    return ranges
