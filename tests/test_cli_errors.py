"""Bad input through the real command line (`python -m zenith_onnx`): every command that
reads a model exits 2 with exactly one line on stderr naming the file and the problem, no
traceback, no output file, and the input unchanged byte for byte. Custom-domain ops are
not an error. A read-only output folder fails the same way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import read_only_folder
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def model(nodes=None, initializers=None, opset: int = OPSET, extra_opsets=(), ir_version: int = 8) -> onnx.ModelProto:
    """x[1,4] -> MatMul(w) -> t -> Relu -> y, unless ``nodes`` replaces the body."""
    if nodes is None:
        nodes = [
            helper.make_node("MatMul", ["x", "w"], ["t"], name="matmul"),
            helper.make_node("Relu", ["t"], ["y"], name="relu"),
        ]
    if initializers is None:
        initializers = [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializers,
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)


def _bytes(proto) -> bytes:
    return proto.SerializeToString()


def _bad_dims() -> bytes:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    w.dims[:] = [4, 5]  # 20 floats claimed, 16 held
    return _bytes(model(initializers=[w]))


def _tensor_proto() -> bytes:
    # Parses as a ModelProto (field numbers overlap) but holds no graph.
    return numpy_helper.from_array(np.arange(10, dtype=np.float32)).SerializeToString()


# name -> (file content, words the one stderr line must contain)
BAD_MODELS = {
    "empty": (b"", "file is empty"),
    "random_bytes": (np.random.default_rng(0).bytes(1000), "not a valid ONNX model"),
    "truncated": (_bytes(model())[: len(_bytes(model())) // 2], "not a valid ONNX model"),
    "tensor_proto": (_tensor_proto(), "holds no graph"),
    "float_tensor_proto": (numpy_helper.from_array(np.ones(3, np.float32), "t").SerializeToString(), "not a valid ONNX model"),
    "opset_too_old": (_bytes(model(opset=5)), "opset 5 is not supported"),
    "opset_too_new": (_bytes(model(opset=99)), "opset 99 is not supported"),
    "ir_version_too_new": (_bytes(model(ir_version=99)), "ir_version 99 is not supported"),
    "cycle": (
        _bytes(model(nodes=[
            helper.make_node("Relu", ["u"], ["t"], name="a"),
            helper.make_node("Relu", ["t"], ["u"], name="b"),
            helper.make_node("Add", ["x", "t"], ["y"], name="c"),
        ])),
        "has a cycle: node 'b' (Relu) -> node 'a' (Relu) -> node 'b' (Relu)",
    ),
    "undefined_tensor": (
        _bytes(model(nodes=[
            helper.make_node("MatMul", ["x", "nowhere"], ["t"], name="matmul"),
            helper.make_node("Relu", ["t"], ["y"], name="relu"),
        ])),
        "node 'matmul' (MatMul) in the main graph reads 'nowhere', which no node, input or initializer defines",
    ),
    "duplicate_output": (
        _bytes(model(nodes=[
            helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
            helper.make_node("Relu", ["x"], ["y"], name="relu"),
        ])),
        "tensor 'y' is produced by two nodes in the main graph: node 'matmul' (MatMul) and node 'relu' (Relu)",
    ),
    "dims_do_not_match_data": (_bad_dims(), "initializer 'w' has shape 4x5 (20 float values, 80 bytes) but holds 64 bytes"),
    "unknown_default_domain_op": (
        _bytes(model(nodes=[
            helper.make_node("MatMul", ["x", "w"], ["t"], name="matmul"),
            helper.make_node("Frobnicate", ["t"], ["y"], name="frob"),
        ])),
        "op 'Frobnicate' is not an ONNX operator",
    ),
}


def _commands(bad: str, good: str, out: str, data: str) -> dict[str, list[str]]:
    return {
        "optimize": ["optimize", bad, "-o", out],
        "inspect": ["inspect", bad],
        "inspect_fusion": ["inspect", bad, "--fusion"],
        "diff": ["diff", bad, good],
        "diff_second": ["diff", good, bad],
        "quantize": ["quantize", bad, "-o", out, "--data", data],
    }


def _cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "zenith_onnx", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def workdir(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(model(), good)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 1, 4)).astype(np.float32))
    return tmp_path


def _assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zenith-onnx: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _check_bad_input(workdir: Path, bad: Path, words: tuple[str, ...]) -> None:
    before = bad.read_bytes() if bad.is_file() else None
    listing = sorted(p.name for p in workdir.iterdir())
    out = workdir / "out.onnx"
    commands = _commands(str(bad), str(workdir / "good.onnx"), str(out), str(workdir / "calib.npz"))
    for name, args in commands.items():
        result = _cli(*args)
        _assert_one_line_error(result, str(bad), *words)
        assert not out.exists(), name
        assert sorted(p.name for p in workdir.iterdir()) == listing, f"{name} left files behind"
        if before is not None:
            assert bad.read_bytes() == before, f"{name} modified the input"


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_file(workdir, case):
    content, words = BAD_MODELS[case]
    bad = workdir / f"{case}.onnx"
    bad.write_bytes(content)
    _check_bad_input(workdir, bad, (words,))


def test_missing_file(workdir):
    _check_bad_input(workdir, workdir / "missing.onnx", ("no such file",))


def test_folder_instead_of_file(workdir):
    folder = workdir / "folder.onnx"
    folder.mkdir()
    _check_bad_input(workdir, folder, ("is a folder",))


def test_external_data_outside_the_folder_is_refused(workdir):
    proto = model()
    (weight,) = proto.graph.initializer
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="../../etc/passwd")
    bad = workdir / "escape.onnx"
    onnx.save(proto, bad)
    _check_bad_input(workdir, bad, ("initializer 'w'", "'../../etc/passwd' outside the model's folder"))


def test_custom_domain_op_is_handled(workdir):
    proto = model(
        nodes=[
            helper.make_node("MatMul", ["x", "w"], ["t"], name="matmul"),
            helper.make_node("Frobnicate", ["t"], ["y"], name="frob", domain="my.ops"),
        ],
        extra_opsets=["my.ops"],
    )
    path = workdir / "custom.onnx"
    onnx.save(proto, path)
    before = path.read_bytes()
    out = workdir / "out.onnx"

    result = _cli("optimize", str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    optimized = onnx.load(out)
    assert [(n.domain, n.op_type) for n in optimized.graph.node] == [("", "MatMul"), ("my.ops", "Frobnicate")]

    result = _cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert "my.ops::Frobnicate" in result.stdout

    result = _cli("diff", str(path), str(out))
    assert result.returncode == 0, result.stdout + result.stderr

    # onnxruntime has no kernel for it: --fusion says so in one line.
    result = _cli("inspect", str(path), "--fusion")
    _assert_one_line_error(result, str(path), "onnxruntime cannot load the model")
    assert path.read_bytes() == before


def test_read_only_output_folder(workdir):
    folder = workdir / "readonly"
    with read_only_folder(folder) as prefix:
        out = folder / "out.onnx"
        for args in (
            ["optimize", str(workdir / "good.onnx"), "-o", str(out)],
            ["quantize", str(workdir / "good.onnx"), "-o", str(out), "--data", str(workdir / "calib.npz")],
        ):
            result = _cli(*args, prefix=prefix)
            _assert_one_line_error(result, str(out), "cannot write to folder", "Permission denied")
            assert list(folder.iterdir()) == []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_bad_thread_count_is_refused_before_anything_is_written(workdir, how):
    out = workdir / "out.onnx"
    ranges = workdir / "ranges.json"
    extra, prefix = (["--threads", "-1"], ()) if how == "flag" else ([], ("env", "ZENITH_ONNX_THREADS=many"))
    for args, target in (
        (["quantize", str(workdir / "good.onnx"), "-o", str(out), "--data", str(workdir / "calib.npz")], out),
        (["calibrate", str(workdir / "good.onnx"), "--data", str(workdir / "calib.npz"), "-o", str(ranges)], ranges),
    ):
        _assert_one_line_error(_cli(*args, *extra, prefix=prefix), "thread")
        assert not target.exists()


def test_threads_flag_and_env_give_the_same_model(workdir):
    """Sessions on 2 threads (the flag) or onnxruntime's default count (the environment)
    calibrate the same ranges as on 1: the written models are byte for byte equal."""
    outputs = []
    for name, extra, prefix in (("one", [], ()), ("two", ["--threads", "2"], ()),
                                ("auto", [], ("env", "ZENITH_ONNX_THREADS=0"))):
        out = workdir / f"{name}.onnx"
        result = _cli("quantize", str(workdir / "good.onnx"), "-o", str(out), "--data", str(workdir / "calib.npz"),
                      *extra, prefix=prefix)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
