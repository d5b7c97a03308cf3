"""Reading and writing models safely.

`load_model` turns every way a file can be wrong into a `ModelError` with one line naming
the file and the problem, before any pass sees the model:

- the file: missing, a folder, not a regular file, empty, larger than one protobuf can be;
- the bytes: not protobuf, truncated, protobuf of another message (a TensorProto parses as
  a ModelProto without a graph), a name or other text field that is not valid UTF-8;
- the versions: ir_version or ai.onnx opset older or newer than we (and onnxruntime) handle;
- the graph (main graph, subgraphs, local functions): no graph output, a tensor defined
  twice, a node or graph output reading a name nothing defines, a cycle, an ai.onnx op
  that does not exist at the model's opset, a node of a domain the model does not import;
- the tensors: dims that do not match the data held, external data outside the model's
  folder (``..``, absolute paths, symlinks leaving it) or shorter than the tensor.

Ops of other (imported) domains (custom ops) are accepted untouched: passes leave them alone and
`inspect` lists them. Nodes stored out of topological order (legal for onnxruntime, not for
the ONNX checker) are sorted on load.

`save_model` writes atomically: the model and its external data are written into a staging
folder beside the output and renamed into place only when both are complete, so a failure
never leaves a partial output and an existing output is replaced only by a whole new one.
(Between the two renames a crash could pair new weights with the old model file; the data
file is renamed first and the window is one system call.) Input files are only ever read.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from zenith_onnx.errors import ModelError, UsageError

__all__ = [
    "MIN_OPSET",
    "needs_external_data",
    "MAX_OPSET",
    "MIN_IR_VERSION",
    "MAX_IR_VERSION",
    "PROTOBUF_LIMIT",
    "load_model",
    "check_model_proto",
    "save_model",
    "atomic_output",
    "default_opset",
]

logger = logging.getLogger(__name__)

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
MIN_IR_VERSION = 3  # the first version with opset imports
MAX_IR_VERSION = onnx.IR_VERSION
# A single protobuf cannot exceed 2 GiB; stay clear of it and move weights out.
PROTOBUF_LIMIT = 1_800_000_000
_PROTOBUF_HARD_LIMIT = 2**31 - 1
_DEFAULT_DOMAINS = ("", "ai.onnx")
_ATTRIBUTE_TYPES = frozenset(onnx.AttributeProto.AttributeType.values()) - {onnx.AttributeProto.UNDEFINED}


def default_opset(model: ir.Model) -> int:
    """The model's default-domain ("" / ai.onnx) opset version."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


# ---------------------------------------------------------------------- loading


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load and validate an ONNX model; raise `ModelError` with one clear line if it is bad."""
    path = Path(path)
    proto = _read_proto(path)
    check_model_proto(proto, name=str(path), base_dir=path.parent)
    try:
        model = ir.serde.deserialize_model(proto)
        ir.external_data.set_base_dir(model.graph, path.parent)
    except Exception as e:  # the checks above should leave nothing for the IR to reject
        raise ModelError(f"{path}: malformed ONNX graph ({_first_line(e)})") from None
    _sort_if_needed(model, path)
    _normalize_default_domain(model)
    return model


def _normalize_default_domain(model: ir.Model) -> None:
    # onnx_ir writes default-domain nodes with domain "", so an opset imported as
    # "ai.onnx" must become "" too (else onnx shape inference and onnxruntime find no
    # opset for them).
    for owner in (model, *model.functions.values()):
        if "ai.onnx" in owner.opset_imports:
            version = owner.opset_imports.pop("ai.onnx")
            owner.opset_imports.setdefault("", version)


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not an ONNX file")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path}: file is empty, not an ONNX model")
    if size > _PROTOBUF_HARD_LIMIT:
        raise ModelError(
            f"{path}: {size:,} bytes is more than one protobuf can hold (2 GiB); "
            "save the weights as external data"
        )
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, EOFError, UnicodeDecodeError) as e:
        raise ModelError(
            f"{path}: not a valid ONNX model (protobuf could not be parsed: {_first_line(e)})"
        ) from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read file ({e.strerror or e})") from None
    if not proto.HasField("graph"):
        raise ModelError(f"{path}: not an ONNX model (parses as protobuf but holds no graph)")
    return proto


def check_model_proto(proto: onnx.ModelProto, *, name: str = "model", base_dir: str | os.PathLike | None = None) -> None:
    """Raise `ModelError` (naming ``name`` and the tensor or node) if ``proto`` is not a
    model we can work on. ``base_dir`` is the model's folder, for external data."""
    if proto.ir_version == 0:
        raise ModelError(f"{name}: not an ONNX model (no ir_version)")
    bad_text = _invalid_text_field(proto)
    if bad_text:
        raise ModelError(f"{name}: text field {bad_text} is not valid UTF-8")
    if not MIN_IR_VERSION <= proto.ir_version <= MAX_IR_VERSION:
        raise ModelError(
            f"{name}: ir_version {proto.ir_version} is not supported "
            f"(supported: {MIN_IR_VERSION} to {MAX_IR_VERSION})"
        )
    opsets = {o.domain or "": o.version for o in proto.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx", 0))
    if opset and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"{name}: opset {opset} is not supported (supported: {MIN_OPSET} to {MAX_OPSET})")
    if not proto.graph.output:
        raise ModelError(f"{name}: the main graph has no outputs")
    checker = _StructureChecker(name, opset, {(f.domain, f.name) for f in proto.functions}, set(opsets))
    checker.check_graph(proto.graph, "main graph", scopes=[])
    seen_functions = set()
    for function in proto.functions:
        key = (function.domain, function.name, getattr(function, "overload", ""))
        if key in seen_functions:
            raise ModelError(f"{name}: local function '{function.domain}::{function.name}' is defined twice")
        seen_functions.add(key)
        f_opsets = {o.domain or "": o.version for o in function.opset_import}
        checker.opset = f_opsets.get("", f_opsets.get("ai.onnx", opset))
        checker.domains = set(f_opsets)
        checker.check_function(function)
    base = Path(base_dir).resolve() if base_dir is not None else None
    for tensor, where in checker.tensors:
        _check_tensor(tensor, where, name, base)


class _StructureChecker:
    """Name-level checks on the protobuf: one definition per tensor, every read defined,
    no cycles, ai.onnx ops that exist. Linear in the number of nodes and names."""

    def __init__(self, name: str, opset: int, functions: set[tuple[str, str]], domains: set[str]):
        self.name = name
        self.opset = opset
        self.functions = functions
        self.domains = domains  # the opset_import domains in force
        self.tensors: list[tuple[onnx.TensorProto, str]] = []
        self.unsorted = False
        self._schema_ok: dict[tuple[str, int], bool] = {}

    def fail(self, message: str):
        raise ModelError(f"{self.name}: {message}")

    def check_function(self, function: onnx.FunctionProto) -> None:
        where = f"function '{function.domain}::{function.name}'"
        defined = {}
        for value in function.input:
            self._define(defined, value, "an input", where)
        self._check_body(function.node, defined, [], where, list(function.output))

    def check_graph(self, graph: onnx.GraphProto, where: str, scopes: list[dict]) -> set[str]:
        """Check ``graph``; return the names it reads from enclosing scopes."""
        defined: dict[str, str] = {}
        for value in graph.input:
            self._define(defined, value.name, "an input", where)
        for tensor in graph.initializer:
            if defined.get(tensor.name, "an input") != "an input":
                self.fail(f"initializer '{tensor.name}' is defined twice in the {where}")
            defined[tensor.name] = "an initializer"
            self.tensors.append((tensor, f"initializer '{tensor.name}'"))
        for sparse in graph.sparse_initializer:
            self._define(defined, sparse.values.name, "a sparse initializer", where)
        return self._check_body(graph.node, defined, scopes, where, [o.name for o in graph.output])

    def _define(self, defined: dict[str, str], value: str, what: str, where: str) -> None:
        if value in defined:
            self.fail(f"tensor '{value}' is defined twice in the {where} ({defined[value]} and {what})")
        defined[value] = what

    def _check_body(self, nodes, defined: dict[str, str], scopes: list[dict], where: str, outputs: list[str]) -> set[str]:
        producer: dict[str, int] = {}
        for k, node in enumerate(nodes):
            for out in node.output:
                if not out:
                    continue
                if out in producer:
                    self.fail(
                        f"tensor '{out}' is produced by two nodes in the {where}: "
                        f"{_label(nodes[producer[out]])} and {_label(node)}"
                    )
                if out in defined:
                    self.fail(f"tensor '{out}' produced by {_label(node)} is also {defined[out]} of the {where}")
                producer[out] = k
        local = [defined, producer]
        outer: set[str] = set()
        preds: list[set[int]] = [set() for _ in nodes]

        def read(name: str, k: int | None, reader: str) -> None:
            if name in producer:
                if k is not None:
                    preds[k].add(producer[name])
            elif name in defined:
                pass
            elif any(name in scope for scope in scopes):
                outer.add(name)
            else:
                self.fail(f"{reader} in the {where} reads '{name}', which no node, input or initializer defines")

        for k, node in enumerate(nodes):
            self._check_op(node, where)
            for name in node.input:
                if name:
                    read(name, k, _label(node))
            for attr in node.attribute:
                if attr.type not in _ATTRIBUTE_TYPES:
                    self.fail(f"attribute '{attr.name}' of {_label(node)} in the {where} has no valid type ({attr.type})")
                if attr.type == onnx.AttributeProto.TENSOR:
                    self.tensors.append((attr.t, f"attribute '{attr.name}' of {_label(node)}"))
                elif attr.type == onnx.AttributeProto.TENSORS:
                    self.tensors.extend((t, f"attribute '{attr.name}' of {_label(node)}") for t in attr.tensors)
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    label = f"subgraph '{attr.name}' of {_label(node)}"
                    for name in self.check_graph(sub, label, [*local, *scopes]):
                        read(name, k, label)
        for name in outputs:
            if name not in producer and name not in defined and not any(name in s for s in scopes):
                self.fail(f"output '{name}' of the {where} is not produced by any node or input")
            if name not in producer and name not in defined:
                outer.add(name)
        self._check_acyclic(nodes, preds, where)
        return outer

    def _check_acyclic(self, nodes, preds: list[set[int]], where: str) -> None:
        if all(p < k for k, ps in enumerate(preds) for p in ps):
            return
        self.unsorted = True
        succs: list[list[int]] = [[] for _ in nodes]
        indegree = [len(ps) for ps in preds]
        for k, ps in enumerate(preds):
            for p in ps:
                succs[p].append(k)
        ready = [k for k, d in enumerate(indegree) if d == 0]
        done = 0
        while ready:
            k = ready.pop()
            done += 1
            for s in succs[k]:
                indegree[s] -= 1
                if indegree[s] == 0:
                    ready.append(s)
        if done == len(nodes):
            return
        # Walk predecessors among the unsorted nodes until one repeats: that is a cycle.
        k = next(i for i, d in enumerate(indegree) if d > 0)
        seen: dict[int, int] = {}
        path: list[int] = []
        while k not in seen:
            seen[k] = len(path)
            path.append(k)
            k = next(p for p in preds[k] if indegree[p] > 0)
        cycle = list(reversed(path[seen[k]:]))
        names = " -> ".join(_label(nodes[i]) for i in [*cycle, cycle[0]])
        self.fail(f"the {where} has a cycle: {names}")

    def _check_op(self, node, where: str) -> None:
        domain = node.domain or ""
        if (domain, node.op_type) in self.functions:
            return
        if domain not in _DEFAULT_DOMAINS:
            if domain not in self.domains:
                self.fail(f"{_label(node)} in the {where} uses domain '{domain}', which the model does not import (no opset_import entry)")
            return
        if not self.opset:
            self.fail(f"{_label(node)} in the {where} uses the ai.onnx domain but the model imports no ai.onnx opset")
        key = (node.op_type, self.opset)
        if key not in self._schema_ok:
            try:
                onnx.defs.get_schema(node.op_type, self.opset, "")
                self._schema_ok[key] = True
            except onnx.defs.SchemaError:
                self._schema_ok[key] = False
        if not self._schema_ok[key]:
            known = onnx.defs.has(node.op_type)
            why = f"does not exist in ai.onnx opset {self.opset}" if known else "is not an ONNX operator"
            self.fail(f"{_label(node)} in the {where}: op '{node.op_type}' {why} (custom ops need their own domain)")


def _invalid_text_field(message) -> str | None:
    """Path of the first string field that is not valid UTF-8, else None. ONNX is proto2,
    whose parser keeps such a string as bytes: it would fail later, deep in a pass or in
    serialization."""
    for field, value in message.ListFields():
        if field.type not in (field.TYPE_STRING, field.TYPE_MESSAGE):
            continue
        repeated = _repeated(field)
        for index, item in enumerate(value if repeated else [value]):
            found = isinstance(item, bytes) if field.type == field.TYPE_STRING else _invalid_text_field(item)
            if found:
                where = f"{field.name}[{index}]" if repeated else field.name
                return where if found is True else f"{where}.{found}"
    return None


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6; `label` before
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _label(node) -> str:
    return f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"


def _check_tensor(tensor: onnx.TensorProto, where: str, name: str, base: Path | None) -> None:
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{name}: {where} has negative dims {list(tensor.dims)}")
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        raise ModelError(f"{name}: {where} has unknown data type {tensor.data_type}") from None
    if dtype == ir.DataType.UNDEFINED:
        raise ModelError(f"{name}: {where} has no data type")
    count = math.prod(tensor.dims)
    shape = "x".join(map(str, tensor.dims)) or "scalar"
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        _check_external(tensor, where, name, base, dtype, count)
        return
    if dtype == ir.DataType.STRING:
        held, expected, unit = len(tensor.string_data), count, "strings"
    elif tensor.HasField("raw_data"):
        held, expected, unit = len(tensor.raw_data), math.ceil(count * dtype.bitwidth / 8), "bytes"
    else:
        try:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
        except (KeyError, ValueError):
            raise ModelError(f"{name}: {where} has data type {dtype.name} that cannot hold inline data") from None
        per_value = 2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1
        packing = max(1, 8 // dtype.bitwidth) if dtype.bitwidth < 8 else 1
        held, expected, unit = len(getattr(tensor, field)), math.ceil(count * per_value / packing), f"{field} values"
    if held != expected:
        raise ModelError(
            f"{name}: {where} has shape {shape} ({count} {dtype.name.lower()} values, "
            f"{expected} {unit}) but holds {held} {unit}"
        )


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _check_external(tensor, where: str, name: str, base: Path | None, dtype: ir.DataType, count: int) -> None:
    """Refuse external data that escapes the model's folder (``..``, absolute, symlinks)
    or is shorter than the tensor."""
    info = _external_info(tensor)
    location = info.get("location", "")
    if not location:
        raise ModelError(f"{name}: {where} has external data without a location")
    if os.path.isabs(location) or Path(location).drive:
        raise ModelError(
            f"{name}: {where} has external data at an absolute path '{location}'; "
            "only paths inside the model's folder are allowed"
        )
    if base is None:
        raise ModelError(f"{name}: {where} has external data '{location}' but the model has no folder")
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise ModelError(f"{name}: {where} has external data '{location}' outside the model's folder; refused")
    if not target.is_file():
        raise ModelError(f"{name}: external data file '{location}' of {where} is missing")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelError(f"{name}: {where} has a malformed external data offset or length") from None
    size = target.stat().st_size
    if dtype != ir.DataType.STRING:
        expected = math.ceil(count * dtype.bitwidth / 8)
        if length is not None and length != expected:
            raise ModelError(
                f"{name}: {where} needs {expected} bytes but its external data length is {length}"
            )
        if offset < 0 or offset + expected > size:
            raise ModelError(
                f"{name}: external data file '{location}' ({size} bytes) is too short for {where} "
                f"({expected} bytes at offset {offset})"
            )


def _sort_if_needed(model: ir.Model, path: Path) -> None:
    def unsorted(graph) -> bool:
        seen: set[ir.Node] = set()
        for node in graph:
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and producer.graph is graph and producer not in seen:
                    return True
            seen.add(node)
        return False

    graphs = [model.graph, *model.graph.subgraphs()]
    if any(unsorted(g) for g in graphs):
        logger.info("%s: nodes were not in topological order; sorted", path)
        model.graph.sort()
    for function in model.functions.values():
        if unsorted(function):
            function.sort()


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------- saving


def needs_external_data(model: ir.Model) -> bool:
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


def _output_folder(path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{path}: output folder '{folder}' does not exist")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name for the output")
    return folder


def _cannot_write(path: Path, folder: Path, e: OSError) -> UsageError:
    return UsageError(f"{path}: cannot write to folder '{folder}' ({e.strerror or e})")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the folder of ``path``; rename it to ``path`` on success.

    On any exception the temporary file is removed and ``path`` is untouched. A folder
    that cannot be written raises `UsageError`.
    """
    path = Path(path)
    folder = _output_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=folder)
    except OSError as e:
        raise _cannot_write(path, folder, e) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs get normal permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _staging_folder(path: Path) -> Iterator[Path]:
    folder = _output_folder(path)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as e:
        raise _cannot_write(path, folder, e) from None
    try:
        yield stage  # files written inside get the usual permissions; only the folder is private
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _refuse_replacing_weights(model: ir.Model, path: Path, data_name: str | None) -> None:
    """The files written must not be the external data the model reads its weights from:
    another model (the input) reads them too, and would be left pointing at new bytes."""
    read = {
        Path(tensor.path).resolve()
        for graph in (model.graph, *model.graph.subgraphs())
        for value in graph.initializers.values()
        if isinstance(tensor := value.const_value, ir.ExternalTensor)
    }
    for written in (path, path.with_name(data_name) if data_name else None):
        if written is not None and written.resolve() in read:
            raise UsageError(
                f"{path}: saving would overwrite '{written.name}', the external data file the model's "
                "weights are read from (another model reads it too); choose another output name"
            )


def save_model(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Save ``model`` atomically. Models too large for one protobuf (or when
    ``external_data`` is true) keep their weights in ``<name>.data`` beside the file."""
    path = Path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    data_name = path.name + ".data" if external_data else None
    _refuse_replacing_weights(model, path, data_name)
    with _staging_folder(path) as stage:
        staged = stage / path.name
        try:
            ir.save(model, staged, external_data=data_name)
            if data_name is not None:
                os.replace(stage / data_name, path.with_name(data_name))
            os.replace(staged, path)
        except OSError as e:
            raise _cannot_write(path, stage.parent, e) from None
