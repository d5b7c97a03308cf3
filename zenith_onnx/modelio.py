"""Reading and writing models safely.

`load_model` turns every way a file can be wrong (missing, not ONNX, truncated, an opset
we cannot handle, external data that points outside the model's folder) into a
`ModelError` naming the file and the problem. `save_model` writes atomically: the model
(and its external data) go to temporary files in the output folder and are renamed into
place only when complete, so a failure never leaves a partial output and an existing
output is replaced only by a whole new one. Input files are only ever read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from zenith_onnx.errors import ModelError, UsageError

__all__ = [
    "MIN_OPSET",
    "MAX_OPSET",
    "PROTOBUF_LIMIT",
    "load_model",
    "save_model",
    "atomic_output",
    "default_opset",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
# A single protobuf cannot exceed 2 GiB; stay clear of it and move weights out.
PROTOBUF_LIMIT = 1_800_000_000


def default_opset(model: ir.Model) -> int:
    """The model's default-domain ("" / ai.onnx) opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _check_external_locations(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that escapes the model's folder (``..``, absolute, symlinks)."""
    base = path.parent.resolve()
    for tensor in _external_tensors(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location:
            raise ModelError(f"{path}: tensor '{tensor.name}' has external data without a location")
        if os.path.isabs(location) or Path(location).drive:
            raise ModelError(
                f"{path}: tensor '{tensor.name}' has external data at an absolute path "
                f"'{location}'; only paths inside the model's folder are allowed"
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ModelError(
                f"{path}: tensor '{tensor.name}' has external data '{location}' outside the "
                "model's folder; refused"
            )
        if not target.is_file():
            raise ModelError(
                f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing"
            )


def _external_tensors(proto: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(proto):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX model; raise `ModelError` with one clear line if it is bad."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty, not an ONNX model")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, EOFError) as e:
        raise ModelError(f"{path}: not a valid ONNX model (protobuf could not be parsed: {_first_line(e)})") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read file ({e.strerror or e})") from None
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelError(f"{path}: not an ONNX model (no graph or no ir_version)")
    _check_external_locations(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # the IR rejects structurally broken graphs
        raise ModelError(f"{path}: malformed ONNX graph ({_first_line(e)})") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    opset = default_opset(model)
    if opset and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(
            f"{path}: opset {opset} is not supported (supported: {MIN_OPSET} to {MAX_OPSET})"
        )
    return model


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _needs_external_data(model: ir.Model) -> bool:
    """True when the weights exceed one protobuf, or some already live in external files
    (those must be rewritten beside the output, not referenced relative to it)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if isinstance(tensor, ir.ExternalTensor):
                return True
            total += tensor.nbytes
    return total > PROTOBUF_LIMIT


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in the folder of ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{path}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path}: output folder '{folder}' is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Save ``model`` atomically. Models too large for one protobuf (or when
    ``external_data`` is true) keep their weights in ``<name>.data`` beside the file."""
    path = Path(path)
    if external_data is None:
        external_data = _needs_external_data(model)
    if not external_data:
        with atomic_output(path) as tmp:
            ir.save(model, tmp)
        return
    data_name = path.name + ".data"
    with atomic_output(path) as tmp:
        # ir.save writes the data file atomically itself (temp + replace); the model file
        # is renamed last, so a reader never sees a model whose data is missing.
        ir.save(model, tmp, external_data=data_name)
