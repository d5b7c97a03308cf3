"""zenith_onnx.modelio: validation on load, external data (sibling files yes; paths leaving
the folder no), weights moved out past the protobuf limit, atomic saves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import modelio, runtime
from zenith_onnx.errors import ModelError, UsageError
from zenith_onnx.modelio import atomic_output, load_model, save_model

N = 16
X = np.random.default_rng(5).standard_normal((1, N)).astype(np.float32)


def small_model(seed: int = 0) -> onnx.ModelProto:
    """x[1,N] -> MatMul(w NxN) -> Add(b) -> y, random weights."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="matmul"), helper.make_node("Add", ["t", "b"], ["y"], name="add")],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [
            numpy_helper.from_array(rng.standard_normal((N, N)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run(model) -> np.ndarray:
    model = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return runtime.session(model if not isinstance(model, Path) else str(model)).run(None, {"x": X})[0]


def save_external(proto: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save_model(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def locations(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        entry.value
        for tensor in proto.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


# ------------------------------------------------------------------ external data


def test_external_data_in_a_sibling_file_loads_and_saves_beside_the_output(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    save_external(small_model(), src / "model.onnx", "model.weights")
    before = snapshot(src)
    model = load_model(src / "model.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in small_model().graph.initializer}
    for name, array in weights.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    expected = run(small_model())

    save_model(model, dst / "out.onnx")
    assert sorted(p.name for p in dst.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert locations(dst / "out.onnx") == {"out.onnx.data"}
    np.testing.assert_array_equal(run(dst / "out.onnx"), expected)
    assert snapshot(src) == before  # the input and its data are only read


def _external_reference(tmp_path: Path, location: str) -> Path:
    proto = small_model()
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        tensor.external_data.add(key="location", value=location)
    path = tmp_path / "model.onnx"
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("../../etc/passwd", "'../../etc/passwd' outside the model's folder; refused"),
        ("/etc/passwd", "at an absolute path '/etc/passwd'"),
        ("sub/../../x.bin", "outside the model's folder"),
        ("nothing_here.bin", "external data file 'nothing_here.bin' of initializer 'w' is missing"),
    ],
)
def test_external_data_location_is_refused(tmp_path, location, words):
    path = _external_reference(tmp_path, location)
    with pytest.raises(ModelError) as info:
        load_model(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_symlink_leaving_the_folder_is_refused_and_one_inside_is_fine(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "model"
    inside.mkdir()
    save_external(small_model(), outside / "real.onnx", "real.weights")
    (inside / "weights.bin").symlink_to(outside / "real.weights")
    proto = onnx.load(str(outside / "real.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "weights.bin"
    onnx.save(proto, str(inside / "model.onnx"))
    with pytest.raises(ModelError, match="'weights.bin' outside the model's folder; refused"):
        load_model(inside / "model.onnx")

    (inside / "weights.bin").unlink()
    (inside / "copy.weights").write_bytes((outside / "real.weights").read_bytes())
    (inside / "weights.bin").symlink_to("copy.weights")
    model = load_model(inside / "model.onnx")
    np.testing.assert_array_equal(model.graph.initializers["b"].const_value.numpy(), numpy_helper.to_array(small_model().graph.initializer[1]))


def test_external_data_shorter_than_the_tensor_is_refused(tmp_path):
    save_external(small_model(), tmp_path / "model.onnx", "model.weights")
    data = tmp_path / "model.weights"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelError, match="'model.weights' .* is too short for initializer"):
        load_model(tmp_path / "model.onnx")


def test_weights_past_the_protobuf_limit_go_to_a_data_file(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(small_model())
    save_model(model, tmp_path / "inline.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inline.onnx"]

    # Pretend one protobuf holds 1 kB: the 1 kB weight must move out.
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 1000)
    save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert locations(tmp_path / "big.onnx") == {"big.onnx.data"}
    assert (tmp_path / "big.onnx").stat().st_size < 1000 < (tmp_path / "big.onnx.data").stat().st_size
    np.testing.assert_array_equal(run(tmp_path / "big.onnx"), run(small_model()))
    # The in-memory model still holds its weights (ir.save restores them).
    assert not isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)


# ------------------------------------------------------------------ atomic output


def _failing_save(model, path, external_data=None, **_):
    """Writes part of the output (and of its data file) and then fails, like a full disk."""
    Path(path).write_bytes(b"partial")
    if external_data:
        (Path(path).parent / external_data).write_bytes(b"partial data")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_keeps_the_old_output_whole(tmp_path, monkeypatch, external):
    out = tmp_path / "out.onnx"
    save_model(ir.serde.deserialize_model(small_model(seed=1)), out, external_data=external)
    before = snapshot(tmp_path)
    monkeypatch.setattr(ir, "save", _failing_save)
    with pytest.raises(UsageError, match=r"out\.onnx: cannot write to folder .*No space left on device"):
        save_model(ir.serde.deserialize_model(small_model(seed=2)), out, external_data=external)
    assert snapshot(tmp_path) == before  # old model (and data) intact, no temp files left
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    np.testing.assert_array_equal(run(out), run(small_model(seed=1)))


def test_output_folder_problems_are_usage_errors(tmp_path, monkeypatch):
    model = ir.serde.deserialize_model(small_model())
    with pytest.raises(UsageError, match="output folder .* does not exist"):
        save_model(model, tmp_path / "missing" / "out.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        save_model(model, tmp_path / "dir.onnx")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UsageError, match="cannot write to folder .*Permission denied"):
        save_model(model, tmp_path / "out.onnx")
    with pytest.raises(UsageError, match="cannot write to folder .*Permission denied"):
        with atomic_output(tmp_path / "ranges.json"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx"]


def test_atomic_output_replaces_only_on_success_with_normal_permissions(tmp_path):
    target = tmp_path / "ranges.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ranges.json"]
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    save_model(ir.serde.deserialize_model(small_model()), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------ validation on load


def test_unsorted_nodes_are_sorted_on_load(tmp_path):
    proto = small_model()
    proto.graph.node.reverse()  # Add before the MatMul that feeds it
    path = tmp_path / "unsorted.onnx"
    onnx.save(proto, path)
    before = path.read_bytes()
    model = load_model(path)
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert path.read_bytes() == before
    np.testing.assert_array_equal(run(model), run(small_model()))


def _if_model(then_reads: str) -> onnx.ModelProto:
    then = helper.make_graph(
        [helper.make_node("Relu", [then_reads], ["t"], name="inner")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, N])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, N])]
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="branch"),
            helper.make_node("Sigmoid", ["y"], ["late"], name="late"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_subgraphs_are_checked_with_their_outer_scope():
    modelio.check_model_proto(_if_model("x"))  # reads the outer graph's input: fine
    with pytest.raises(ModelError, match="node 'inner' \\(Relu\\) in the subgraph 'then_branch' of node 'branch' \\(If\\) reads 'ghost'"):
        modelio.check_model_proto(_if_model("ghost"))
    # The If reads, through its subgraph, a value computed from the If's own output.
    with pytest.raises(ModelError, match="cycle: node 'late' \\(Sigmoid\\) -> node 'branch' \\(If\\) -> node 'late'"):
        modelio.check_model_proto(_if_model("late"))


def test_function_bodies_are_checked():
    proto = small_model()
    proto.functions.append(
        helper.make_function("my.fn", "Broken", ["a"], ["b"], [helper.make_node("Add", ["a", "ghost"], ["b"])], [helper.make_opsetid("", 17)])
    )
    with pytest.raises(ModelError, match="function 'my.fn::Broken' reads 'ghost'"):
        modelio.check_model_proto(proto)


def test_op_newer_than_the_models_opset_is_refused():
    proto = small_model()
    proto.graph.node[1].op_type = "Gelu"  # ai.onnx since opset 20; the model is opset 17
    with pytest.raises(ModelError, match="op 'Gelu' does not exist in ai.onnx opset 17"):
        modelio.check_model_proto(proto)


def test_files_protobuf_cannot_hold_or_that_are_not_files(tmp_path):
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as f:
        f.truncate(2**31)  # sparse: no disk used
    with pytest.raises(ModelError, match="more than one protobuf can hold"):
        load_model(huge)
    with pytest.raises(ModelError, match="not a regular file"):
        load_model("/dev/null")
