"""Calibration data in: `.npz` files, iterables of feeds, onnxruntime data readers.

Every source becomes `Feeds`: an iterator of ``{input name: array}`` feeds ready for
onnxruntime, one batch at a time, with ``count`` (samples, when known). Nothing reads
all samples at once: an iterable is consumed feed by feed, and an `.npz` file is read
row by row straight from its zip members (stored or deflated), so calibration memory
does not grow with the data.

Sources (`as_feeds`):

- a path to an ``.npz`` (or `load_npz`'s `CalibrationData`): one array per model input,
  keyed by the input's name, samples on axis 0. For an input of shape ``D`` an array
  of shape ``(N, *D)`` holds N samples; when ``D[0]`` is 1 or symbolic, ``(N, *D[1:])``
  is accepted too (each row gets the batch axis of 1). Read with
  ``np.load(allow_pickle=False)``; object arrays are refused.
- a mapping ``{name: stacked array}`` (e.g. an opened npz): the same layout, in memory.
- any iterable of ``dict[str, np.ndarray]``: each dict is one feed (a missing batch
  axis of 1 is added).
- anything with ``get_next()`` (onnxruntime's ``CalibrationDataReader``): called until
  it returns None or an empty dict.

Validation names the input and the problem in one `DataError` line: a missing or an
extra key, a wrong rank or static dimension (symbolic dimensions take any size), an
array of Python objects, NaN or Inf values, no samples at all. Types: a lossless cast is
done silently (int8 -> float32, float16 -> float32, int32 -> int64, integers whose values
are exactly representable); float64 -> float32 (what numpy produces by default) is cast
with a warning; float -> integer and anything lossy between integers is refused.

With ``batch_size > 1`` consecutive samples are concatenated along axis 0, which must be
symbolic on every input; otherwise a warning says so and samples go one at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from zenith_onnx.errors import DataError, UsageError

__all__ = ["InputSpec", "model_inputs", "CalibrationData", "Feeds", "load_npz", "as_feeds"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What the model expects on one graph input."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...] | None  # None: unknown rank; a None dim is symbolic
    optional: bool = False  # backed by an initializer (a feed may override it)

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] is None

    @property
    def batch_of_one(self) -> bool:
        """Axis 0 exists and may be 1 (it is 1 or symbolic)."""
        return bool(self.shape) and self.shape[0] in (None, 1)

    def describe(self) -> str:
        if self.shape is None:
            return "any shape"
        return "(" + ", ".join("?" if d is None else str(d) for d in self.shape) + (",)" if len(self.shape) == 1 else ")")


def model_inputs(model: ir.Model) -> list[InputSpec]:
    """The model's graph inputs as `InputSpec` (initializer-backed ones are optional)."""
    specs = []
    for value in model.graph.inputs:
        dtype = None
        if value.dtype is not None:
            try:
                dtype = np.dtype(value.dtype.numpy())
            except (TypeError, ValueError):
                dtype = None
        # Some exporters (Paddle) write -1 for a dynamic dim: it is symbolic too.
        shape = None if value.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
        specs.append(InputSpec(value.name, dtype, shape, value.is_initializer()))
    return specs


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")


def _check_keys(keys: Iterable[str], specs: list[InputSpec], where: str) -> None:
    known = {s.name for s in specs}
    keys = list(keys)
    extra = [k for k in keys if k not in known]
    if extra:
        raise DataError(
            f"{where}: key '{extra[0]}' is not an input of the model (inputs: {', '.join(sorted(known)) or 'none'})"
        )
    missing = [s.name for s in specs if not s.optional and s.name not in keys]
    if missing:
        raise DataError(
            f"{where}: no data for model input '{missing[0]}' (keys present: {', '.join(sorted(keys)) or 'none'})"
        )


def _fits(shape: tuple[int, ...], dims: tuple[int | None, ...]) -> bool:
    """Same rank, and every static dim equal (symbolic dims take any size)."""
    return len(shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, shape))


def _check_sample_shape(name: str, shape: tuple[int, ...], spec: InputSpec, where: str) -> None:
    """``shape`` of one feed must match the input's rank and static dims."""
    if spec.shape is not None and not _fits(shape, spec.shape):
        raise DataError(f"{where}: input '{name}' has shape {_shape_text(shape)}, the model expects {spec.describe()}")


class _Caster:
    """Type checks and casts for one input; warns once per input."""

    def __init__(self, spec: InputSpec, where: str):
        self.spec = spec
        self.where = where
        self.warned = False

    def check_dtype(self, dtype: np.dtype) -> None:
        """Refuse what can never be cast; called on file headers before reading data."""
        want = self.spec.dtype
        name = self.spec.name
        if dtype.hasobject:
            raise DataError(f"{self.where}: input '{name}' holds Python objects (pickle); refused")
        if dtype.kind not in "biuf":
            raise DataError(f"{self.where}: input '{name}' has dtype {dtype}, not a numeric array")
        if want is None or dtype == want:
            return
        if dtype.kind == "f" and want.kind in "biu":
            raise DataError(f"{self.where}: input '{name}' is {dtype} but the model wants {want}; refusing to round floats")
        if want.kind not in "biuf":
            raise DataError(f"{self.where}: input '{name}' is {dtype} but the model wants {want}")

    def __call__(self, array: np.ndarray, first_sample: int, rows_are_samples: bool) -> np.ndarray:
        """Cast and check ``array``; ``rows_are_samples``: axis 0 counts samples from
        ``first_sample`` (else the whole array is that one sample)."""
        want = self.spec.dtype
        self.check_dtype(array.dtype)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            self._report_non_finite(array, first_sample, rows_are_samples, None)
        if want is not None and array.dtype != want:
            source = array.dtype
            array = self._cast(array, want)
            if want.kind == "f" and not np.isfinite(array).all():
                self._report_non_finite(array, first_sample, rows_are_samples, f"values too large for {want}")
            if source.kind == "f" and not np.can_cast(source, want, "safe") and not self.warned:
                # only now: data that cannot be cast gets the error alone, not a warning first
                logger.warning("%s: input '%s' is %s, cast to the model's %s", self.where, self.spec.name, source, want)
                self.warned = True
        return array

    def _cast(self, array: np.ndarray, want: np.dtype) -> np.ndarray:
        name = self.spec.name
        if np.can_cast(array.dtype, want, "safe"):
            return array.astype(want)
        if array.dtype.kind == "f":  # narrower float, customary for float64 numpy data (warned by the caller)
            with np.errstate(over="ignore"):
                return array.astype(want)
        cast = array.astype(want)
        with np.errstate(invalid="ignore"):  # a value past the round trip's range is not exact either
            exact = np.array_equal(cast.astype(array.dtype), array)
        if not exact:
            raise DataError(f"{self.where}: input '{name}' is {array.dtype} with values that {want} cannot hold exactly")
        return cast

    def _report_non_finite(self, array: np.ndarray, first_sample: int, rows_are_samples: bool, what: str | None):
        sample, part = first_sample, array
        if rows_are_samples and array.ndim:
            row = int(np.argmax(~np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)))
            sample, part = first_sample + row, array[row]
        what = what or ("NaN values" if np.isnan(part).any() else "Inf values")
        raise DataError(f"{self.where}: input '{self.spec.name}' has {what} in sample {sample}")


# ------------------------------------------------------------------ stacked arrays (npz)


class _StackedArray:
    """Samples on axis 0 of an in-memory array."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def open(self):
        return _MemoryCursor(self.array)


class _MemoryCursor:
    def __init__(self, array: np.ndarray):
        self.array = array
        self.at = 0

    def read(self, rows: int) -> np.ndarray:
        part = self.array[self.at : self.at + rows]
        self.at += rows
        return part

    def close(self) -> None:
        pass


class _NpyMember:
    """One ``.npy`` member of an ``.npz`` zip, read row by row without loading it."""

    def __init__(self, npz: np.lib.npyio.NpzFile, member: str, path: Path):
        self.npz = npz
        self.member = member
        self.key = member[: -len(".npy")]
        self.where = f"{path}: array '{self.key}'"
        with npz.zip.open(member) as f:
            self.shape, self.fortran, self.dtype = _read_npy_header(f, self.where)

    def open(self):
        if self.fortran:  # rows are not contiguous on disk: load this one array
            return _MemoryCursor(self.npz[self.key])
        return _MemberCursor(self)


def _read_npy_header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise DataError(f"{where}: unsupported .npy format version {version}")
    except (ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{where}: not a valid .npy array ({_first_line(e)})") from None
    return tuple(shape), fortran, np.dtype(dtype)


class _MemberCursor:
    def __init__(self, member: _NpyMember):
        self.member = member
        self.file = member.npz.zip.open(member.member)
        _read_npy_header(self.file, member.where)
        self.row_bytes = math.prod(member.shape[1:]) * member.dtype.itemsize

    def read(self, rows: int) -> np.ndarray:
        m = self.member
        want = rows * self.row_bytes
        try:
            data = self.file.read(want)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise DataError(f"{m.where} cannot be read ({_first_line(e)})") from None
        if len(data) != want:
            raise DataError(f"{m.where} is truncated")
        return np.frombuffer(data, dtype=m.dtype).reshape(rows, *m.shape[1:])

    def close(self) -> None:
        self.file.close()


class CalibrationData:
    """Stacked calibration arrays (samples on axis 0), validated against a model's
    inputs from their shapes and types; values are checked while streaming."""

    def __init__(self, arrays: Mapping[str, _StackedArray | _NpyMember], model: ir.Model, where: str, closer=None):
        self.where = where
        self._arrays = dict(arrays)
        self._closer = closer
        specs = model_inputs(model)
        _check_keys(self._arrays, specs, where)
        self.specs = [s for s in specs if s.name in self._arrays]
        self._casters = {s.name: _Caster(s, where) for s in self.specs}
        # per input: True when a row is one feed (array rank = input rank + 1)
        self._row_is_feed: dict[str, bool] = {}
        counts = {}
        for spec in self.specs:
            stacked = self._arrays[spec.name]
            self._casters[spec.name].check_dtype(stacked.dtype)
            shape = stacked.shape
            if len(shape) == 0:
                raise DataError(f"{where}: input '{spec.name}' is a scalar; samples must be stacked on axis 0")
            counts[spec.name] = shape[0]
            self._row_is_feed[spec.name] = self._layout(spec, shape)
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"'{k}' {v}" for k, v in counts.items())
            raise DataError(f"{where}: inputs have different numbers of samples ({listing})")
        self.count = next(iter(counts.values()), 0)
        if self.count == 0:
            raise DataError(f"{where}: no samples (axis 0 has length 0)")

    def _layout(self, spec: InputSpec, shape: tuple[int, ...]) -> bool:
        """True when a row is one feed, False when a row lacks the batch axis of 1."""
        row = shape[1:]
        if spec.shape is None:
            return True
        if len(row) == len(spec.shape) and _fits(row, spec.shape):
            return True
        if spec.batch_of_one and len(row) == len(spec.shape) - 1 and _fits(row, spec.shape[1:]):
            return False
        dims = ["?" if d is None else str(d) for d in spec.shape]
        stacked = f"(N, {', '.join(dims)})" + (f" or (N, {', '.join(dims[1:])})" if spec.batch_of_one else "")
        raise DataError(
            f"{self.where}: input '{spec.name}' has shape {_shape_text(shape)}; the model expects "
            f"{spec.describe()}, so the array should be {stacked}"
        )

    def feeds(self, batch_size: int = 1) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """``(first sample, stop, feed)`` for consecutive batches of samples."""
        cursors = {name: self._arrays[name].open() for name in self._casters}
        try:
            for start in range(0, self.count, batch_size):
                rows = min(batch_size, self.count - start)
                feed = {}
                for name, cursor in cursors.items():
                    block = self._casters[name](cursor.read(rows), start, rows_are_samples=True)
                    if self._row_is_feed[name]:
                        block = block[0] if rows == 1 else block.reshape(-1, *block.shape[2:])
                    feed[name] = block
                yield start, start + rows, feed
        finally:
            for cursor in cursors.values():
                cursor.close()

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


def load_npz(path: str | os.PathLike, model: ir.Model) -> CalibrationData:
    """Open an ``.npz`` of calibration data and validate it against ``model``'s inputs
    (keys, ranks, static dims, types, sample counts) without reading the arrays."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an .npz file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a valid .npz file ({_first_line(e)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single .npy array, not an .npz of named arrays")
    try:
        members = {}
        for member in npz.zip.namelist():
            if not member.endswith(".npy"):
                raise DataError(f"{path}: member '{member}' is not a .npy array")
            array = _NpyMember(npz, member, path)
            members[array.key] = array
        return CalibrationData(members, _model_of(model), str(path), closer=npz.close)
    except BaseException:
        npz.close()
        raise


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _model_of(model: ir.Model) -> ir.Model:
    if not isinstance(model, ir.Model):
        raise TypeError(f"expected an onnx_ir.Model, got {type(model).__name__}")
    return model


# ------------------------------------------------------------------ feeds


class Feeds(Iterator[dict[str, np.ndarray]]):
    """Feeds one batch at a time. ``count``: samples in total (None when unknown);
    ``batch_size``: samples per feed actually used; ``span``: ``(first, stop)`` sample
    indices of the feed last returned."""

    def __init__(self, batches: Iterator[tuple[int, int, dict[str, np.ndarray]]], count: int | None,
                 batch_size: int, where: str, close=None):
        self._batches = batches
        self.count = count
        self.batch_size = batch_size
        self.span = (0, 0)
        self.where = where
        self._close = close

    def __iter__(self) -> Feeds:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        try:
            start, stop, feed = next(self._batches)
        except StopIteration:
            self.close()
            if self.span[1] == 0:
                raise DataError(f"{self.where}: no samples") from None
            raise
        self.span = (start, stop)
        return feed

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


def _effective_batch(batch_size: int, specs: list[InputSpec], where: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer, got {batch_size!r}")
    if batch_size == 1:
        return 1
    fixed = [s for s in specs if not s.dynamic_batch]
    if fixed:
        logger.warning(
            "%s: batch size %d needs a symbolic axis 0 on every input; input '%s' has shape %s, "
            "so samples go one at a time",
            where, batch_size, fixed[0].name, fixed[0].describe(),
        )
        return 1
    return batch_size


def _reader_items(reader) -> Iterator:
    while True:
        item = reader.get_next()
        if item is None or (isinstance(item, Mapping) and not item):
            return
        yield item


def _iterable_batches(items: Iterable, specs_all: list[InputSpec], batch_size: int, where: str):
    specs = {s.name: s for s in specs_all}
    casters = {s.name: _Caster(s, where) for s in specs_all}
    pending: list[dict[str, np.ndarray]] = []

    def shaped(name: str, value, sample: int) -> np.ndarray:
        array = np.asarray(value)
        spec = specs[name]
        casters[name].check_dtype(array.dtype)
        if spec.shape is not None and array.ndim == len(spec.shape) - 1 and spec.batch_of_one:
            array = array[None]
        _check_sample_shape(name, array.shape, spec, f"{where} sample {sample}")
        return casters[name](array, sample, rows_are_samples=False)

    def flush(first: int):
        if len(pending) == 1:
            return first, first + 1, pending[0]
        feed = {}
        for name in pending[0]:
            try:
                feed[name] = np.concatenate([p[name] for p in pending], axis=0)
            except ValueError:
                shapes = sorted({_shape_text(p[name].shape) for p in pending})
                raise DataError(
                    f"{where}: samples {first}..{first + len(pending) - 1} of input '{name}' have different "
                    f"shapes {', '.join(shapes)} and cannot be batched; use batch size 1"
                ) from None
        return first, first + len(pending), feed

    first = 0
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise DataError(f"{where}: item {index} is a {type(item).__name__}, expected a dict of input name -> array")
        _check_keys(item.keys(), specs_all, f"{where} sample {index}")
        pending.append({name: shaped(name, value, index) for name, value in item.items()})
        if len(pending) == batch_size:
            yield flush(first)
            first = index + 1
            pending = []
    if pending:
        yield flush(first)


def _len_or_none(source) -> int | None:
    try:
        return len(source)
    except (TypeError, NotImplementedError):
        return None


def as_feeds(source, model: ir.Model, batch_size: int = 1) -> Feeds:
    """Turn any supported calibration source into validated `Feeds` for ``model``."""
    model = _model_of(model)
    close = None
    if isinstance(source, (str, os.PathLike)):
        source = load_npz(source, model)
        close = source.close
    elif isinstance(source, Mapping):
        arrays = {name: _StackedArray(np.asarray(value)) for name, value in source.items()}
        source = CalibrationData(arrays, model, "calibration data")
    if isinstance(source, CalibrationData):
        batch = _effective_batch(batch_size, source.specs, source.where)
        return Feeds(source.feeds(batch), source.count, batch, source.where, close=close)
    specs = model_inputs(model)
    where = "calibration data"
    if hasattr(source, "get_next"):
        items, count = _reader_items(source), None
        where = f"calibration reader {type(source).__name__}"
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, np.ndarray)):
        items, count = iter(source), _len_or_none(source)
    else:
        raise UsageError(
            f"calibration data must be an .npz path, a dict of stacked arrays, an iterable of dicts "
            f"or an object with get_next(); got {type(source).__name__}"
        )
    batch = _effective_batch(batch_size, [s for s in specs if not s.optional], where)
    return Feeds(_iterable_batches(items, specs, batch, where), count, batch, where)
