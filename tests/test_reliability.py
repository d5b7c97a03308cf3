"""Reliability (issue 9): bad input of every kind ends in exit 2 with one line, no traceback
and no output; outputs are atomic; quantized models never carry a NaN, infinite, zero or
denormal scale.

This extends tests/test_cli_errors.py (which runs optimize, inspect, diff and quantize --data
on its `BAD_MODELS`): here `calibrate` and `quantize --ranges` run on those files, every
command runs on more malformed models, and malformed ranges JSON, calibration data, external
data locations and failures injected into a pass or a save are added.

Command lines run as separate processes. Most go through `_run_cli_batch`: one Python
process imports zenith-onnx once and forks a child per command line, whose stdout and stderr
(file descriptors 1 and 2, so onnxruntime's C++ logging counts too) are captured apart; each
child runs ``zenith_onnx.cli.main(argv)`` like the console script. Failures injected into a
pass or a save use ``python -c`` (`_run_patched_cli`), as a user would see them.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import read_only_folder
from onnx import TensorProto, helper, numpy_helper

from test_cli_errors import BAD_MODELS
from test_cli_errors import model as tiny_model  # x[1,4] -> MatMul(eye) -> t -> Relu -> y
from zenith_onnx import runtime
from zenith_onnx.calibration import calibrate_file
from zenith_onnx.errors import DataError, ModelError, UsageError, ZenithError
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.quantize import quantize, quantize_file
from zenith_onnx.ranges import MIN_RANGE_WIDTH, Ranges

# A numpy warning would be one more stderr line in the CLI: each is a failure here.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32

# ------------------------------------------------------------------ running the CLI

_DRIVER = r"""
import json, os, sys, traceback
import zenith_onnx.cli
# Import what the commands use once; each command line then runs in a forked child.
import zenith_onnx.calibration, zenith_onnx.diff, zenith_onnx.fusion, zenith_onnx.quantize, zenith_onnx.summary
jobs = json.load(sys.stdin)
results = []
for k, job in enumerate(jobs):
    logs = [os.path.join(job["logs"], f"{k}.{s}") for s in ("out", "err")]
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            for fd, log in zip((1, 2), logs):
                os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(job["cwd"])
            code = zenith_onnx.cli.main(job["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    out, err = (open(log, encoding="utf-8", errors="replace").read() for log in logs)
    results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": out, "stderr": err})
print(json.dumps(results))
"""


def _run_cli_batch(jobs: list[tuple[Path, list[str]]], prefix: tuple[str, ...] = ()) -> list[subprocess.CompletedProcess]:
    """Run each ``(cwd, argv)`` as its own process (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="zenith-cli-logs-") as logs:
        payload = json.dumps([{"cwd": str(cwd), "argv": [str(a) for a in argv], "logs": logs} for cwd, argv in jobs])
        done = subprocess.run([*prefix, sys.executable, "-c", _DRIVER], input=payload, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [
        subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
        for (_, argv), r in zip(jobs, json.loads(done.stdout))
    ]


def _run_patched_cli(patch: str, *argv, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c``: apply ``patch`` (Python source), then run the CLI on ``argv``."""
    code = f"import sys\n{patch}\nfrom zenith_onnx.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _assert_one_line(result: subprocess.CompletedProcess, code: int, prefix: str, *words: str) -> str:
    """Exit ``code``, exactly one line on stderr starting with ``prefix`` and holding ``words``."""
    context = (result.args, result.returncode, result.stdout[-500:], result.stderr[-2000:])
    assert result.returncode == code, context
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr, context
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), context
    for word in words:
        assert word in lines[0], (word, context)
    return lines[0]


def _assert_error(result: subprocess.CompletedProcess, *words: str) -> str:
    return _assert_one_line(result, 2, "zenith-onnx: error: ", *words)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*")) if not p.is_symlink() or p.exists()
    }


# ------------------------------------------------------------------ models and scales


def _tiny_bytes(edit=None, **kwargs) -> bytes:
    proto = tiny_model(**kwargs)
    if edit is not None:
        edit(proto)
    return proto.SerializeToString()


def _cnn_gemm(seed: int = 0, weight_scale: float = 1.0) -> onnx.ModelProto:
    """x[1,8,6,6] -> Conv(b) -> BN -> Relu -> Conv(b) -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm(B) -> y[1,5]: two int32 Conv biases (one from folding) and an int32 Gemm bias."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (8, 8, 3, 3), 0.15 * weight_scale), init("b1", (8,), 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "gamma"), init("beta", (8,), 0.1),
        init("mean", (8,), 0.1), numpy_helper.from_array(rng.uniform(0.5, 2.0, 8).astype(np.float32), "var"),
        init("w2", (8, 8, 1, 1), 0.35 * weight_scale), init("b2", (8,), 0.1),
        init("W", (5, 8), 0.35 * weight_scale), init("B", (5,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "W", "B"], ["y"], name="gemm", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "cnn_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _qdq_scales(proto: onnx.ModelProto) -> list[tuple[str, int, np.ndarray]]:
    """``(node, quantized element type, scale)`` of every QuantizeLinear/DequantizeLinear."""
    inits = {t.name: t for t in proto.graph.initializer}
    types = {t.name: t.data_type for t in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])  # every scale is an initializer
        qtype = types.get(node.input[2]) if len(node.input) > 2 and node.input[2] else types.get(node.input[0])
        found.append((node.name, qtype, scale))
    return found


def _assert_scales_sound(proto: onnx.ModelProto, int32_biases: int | None = None) -> int:
    """Every Q/DQ scale is a finite, normal, positive float32 (never NaN, Inf, 0 or a
    denormal), ``int32_biases`` int32 bias scales among them; returns the number of scales."""
    scales = _qdq_scales(proto)
    assert scales, "the model holds no QuantizeLinear/DequantizeLinear"
    for name, _, scale in scales:
        assert scale.dtype == np.float32, name
        assert np.all(np.isfinite(scale)) and np.all(scale >= FLOAT32_TINY), (name, scale)
    if int32_biases is not None:
        assert sum(qtype == TensorProto.INT32 for _, qtype, _ in scales) == int32_biases
    return len(scales)


# ------------------------------------------------------------------ 1. malformed models


def _utf8_broken_name() -> bytes:
    data = _tiny_bytes(edit=lambda p: setattr(p.graph.node[1], "name", "NAMEX1"))
    assert data.count(b"NAMEX1") == 1
    return data.replace(b"NAMEX1", b"NAME\xd0\x01")  # same length: the protobuf stays well formed


def _attribute_without_type(proto: onnx.ModelProto) -> None:
    proto.graph.node[1].attribute.append(onnx.AttributeProto(name="alpha"))  # type UNDEFINED


def _negative_dims(proto: onnx.ModelProto) -> None:
    proto.graph.initializer[0].dims[:] = [-4, -4]


def _float_data_too_short(proto: onnx.ModelProto) -> None:
    proto.graph.initializer[0].CopyFrom(helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    proto.graph.initializer[0].dims[:] = [4, 4]


def _unknown_data_type(proto: onnx.ModelProto) -> None:
    proto.graph.initializer[0].data_type = 999


def _matmul_relu(matmul_name="matmul", relu_op="Relu", relu_domain="", reads="w", out="y") -> list:
    return [
        helper.make_node("MatMul", ["x", reads], ["t"], name=matmul_name),
        helper.make_node(relu_op, ["t"], [out], name="relu", domain=relu_domain),
    ]


# name -> (file content, words the one stderr line must contain); beyond test_cli_errors.BAD_MODELS
MORE_BAD_MODELS = {
    "undeclared_domain": (
        _tiny_bytes(nodes=_matmul_relu(relu_op="Frobnicate", relu_domain="my.ops")),
        "node 'relu' (Frobnicate) in the main graph uses domain 'my.ops', which the model does not import",
    ),
    "op_newer_than_opset": (_tiny_bytes(nodes=_matmul_relu(relu_op="Gelu")), "op 'Gelu' does not exist in ai.onnx opset 17"),
    "duplicate_initializer": (
        _tiny_bytes(initializers=[numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")] * 2),
        "initializer 'w' is defined twice in the main graph",
    ),
    "duplicate_input": (
        _tiny_bytes(edit=lambda p: p.graph.input.append(p.graph.input[0])),
        "tensor 'x' is defined twice in the main graph (an input and an input)",
    ),
    "output_shadows_initializer": (
        _tiny_bytes(nodes=[*_matmul_relu(), helper.make_node("Identity", ["x"], ["w"], name="shadow")]),
        "tensor 'w' produced by node 'shadow' (Identity) is also an initializer of the main graph",
    ),
    "self_loop": (
        _tiny_bytes(nodes=[helper.make_node("MatMul", ["x", "w"], ["t"], name="matmul"),
                           helper.make_node("Add", ["t", "y"], ["y"], name="loop")]),
        "has a cycle: node 'loop' (Add) -> node 'loop' (Add)",
    ),
    "graph_output_undefined": (
        _tiny_bytes(nodes=_matmul_relu(out="z")), "output 'y' of the main graph is not produced by any node or input"
    ),
    "no_outputs": (_tiny_bytes(edit=lambda p: p.graph.ClearField("output")), "the main graph has no outputs"),
    "ir_version_too_old": (_tiny_bytes(ir_version=2), "ir_version 2 is not supported"),
    "no_ir_version": (_tiny_bytes(ir_version=0), "not an ONNX model (no ir_version)"),
    "no_default_opset": (
        _tiny_bytes(edit=lambda p: p.opset_import[0].__setattr__("domain", "my.ops")),
        "uses the ai.onnx domain but the model imports no ai.onnx opset",
    ),
    "negative_dims": (_tiny_bytes(edit=_negative_dims), "initializer 'w' has negative dims [-4, -4]"),
    "float_data_too_short": (_tiny_bytes(edit=_float_data_too_short), "initializer 'w' has shape 4x4 (16 float values, 16 float_data values) but holds 3"),
    "unknown_data_type": (_tiny_bytes(edit=_unknown_data_type), "initializer 'w' has unknown data type 999"),
    "attribute_without_type": (_tiny_bytes(edit=_attribute_without_type), "attribute 'alpha' of node 'relu' (Relu) in the main graph has no valid type"),
    "name_not_utf8": (_utf8_broken_name(), "text field graph.node[1].name is not valid UTF-8"),
    "name_with_newline": (  # the name is printed escaped, on the one line
        _tiny_bytes(nodes=_matmul_relu(matmul_name="mat\nmul\x1b[2J", reads="ghost")),
        "node 'mat\\nmul\\x1b[2J' (MatMul) in the main graph reads 'ghost'",
    ),
    "graph_proto": (tiny_model().graph.SerializeToString(), "parses as protobuf but holds no graph"),
    "onnx_text_format": (onnx.printer.to_text(tiny_model()).encode(), "not a valid ONNX model"),
    "gzip_of_a_model": (gzip.compress(_tiny_bytes(), mtime=0), "not a valid ONNX model"),
    "json": (b'{"ir_version": 8, "graph": {}}', "not a valid ONNX model"),
}

# The commands test_cli_errors does not run on BAD_MODELS; all of them on MORE_BAD_MODELS.
MISSING_COMMANDS = ("calibrate", "quantize_ranges")
ALL_COMMANDS = ("optimize", "inspect", "diff", "calibrate", "quantize_data", "quantize_ranges")


def _command(name: str, bad: str) -> list[str]:
    return {
        "optimize": ["optimize", bad, "-o", "out_optimize.onnx"],
        "inspect": ["inspect", bad],
        "diff": ["diff", bad, "good.onnx"],
        "calibrate": ["calibrate", bad, "--data", "calib.npz", "-o", "out_calibrate.json"],
        "quantize_data": ["quantize", bad, "-o", "out_quantize.onnx", "--data", "calib.npz"],
        "quantize_ranges": ["quantize", bad, "-o", "out_quantize_ranges.onnx", "--ranges", "ranges.json"],
    }[name]


def _good_files(folder: Path) -> None:
    """good.onnx (the tiny model), calib.npz (8 samples) and ranges.json for it."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_model(), folder / "good.onnx")
    np.savez(folder / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 1, 4)).astype(np.float32))
    tensors = {name: {"min": -2.0, "max": 2.0} for name in ("x", "t", "y")}
    (folder / "ranges.json").write_text(json.dumps({"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": tensors}))


MALFORMED_RUNS = [(case, cmd) for case in sorted(BAD_MODELS) for cmd in MISSING_COMMANDS] + [
    (case, cmd) for case in sorted(MORE_BAD_MODELS) for cmd in ALL_COMMANDS
]


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    """Every (malformed file, command) run, each case in a folder of its own; returns the
    results and, per case, the folder before and after all its commands."""
    root = tmp_path_factory.mktemp("malformed")
    jobs, before = [], {}
    for case, command in MALFORMED_RUNS:
        folder = root / case
        if case not in before:
            _good_files(folder)
            content = (BAD_MODELS.get(case) or MORE_BAD_MODELS[case])[0]
            (folder / "bad.onnx").write_bytes(content)
            before[case] = _snapshot(folder)
        jobs.append((folder, _command(command, "bad.onnx")))
    results = dict(zip(MALFORMED_RUNS, _run_cli_batch(jobs)))
    after = {case: _snapshot(root / case) for case in before}
    return results, before, after


@pytest.mark.parametrize("case, command", MALFORMED_RUNS, ids=[f"{c}-{m}" for c, m in MALFORMED_RUNS])
def test_malformed_model_exit_2_one_line_nothing_written(malformed, tally, case, command):
    results, before, after = malformed
    words = (BAD_MODELS.get(case) or MORE_BAD_MODELS[case])[1]
    _assert_error(results[case, command], "bad.onnx: ", words)
    assert after[case] == before[case], f"{command} wrote or changed files"  # all commands of the case ran
    tally["malformed model runs (exit 2)"] += 1


def test_malformed_model_counts(tally):
    tally["malformed model files"] += len(BAD_MODELS) + len(MORE_BAD_MODELS)
    assert len(MALFORMED_RUNS) == len(BAD_MODELS) * len(MISSING_COMMANDS) + len(MORE_BAD_MODELS) * len(ALL_COMMANDS)


def test_ai_onnx_spelling_of_the_default_opset_quantizes(tmp_path):
    """An opset imported as "ai.onnx" (not "") is the default domain: it loads, quantizes
    and the output passes the checker (onnx_ir writes its nodes in "")."""
    proto = tiny_model()
    proto.opset_import[0].domain = "ai.onnx"
    _good_files(tmp_path)
    onnx.save(proto, tmp_path / "m.onnx")
    (result,) = _run_cli_batch([(tmp_path, ["quantize", "m.onnx", "-o", "q.onnx", "--data", "calib.npz"])])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    out = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(out, full_check=True)
    assert {o.domain for o in out.opset_import} == {""}
    _assert_scales_sound(out)


@pytest.mark.parametrize("edit", ["negative_var", "zero_var_and_epsilon", "nan_gamma", "inf_mean"])
def test_batchnorm_statistics_that_compute_nan_are_left_not_folded(tmp_path, edit):
    """var + epsilon <= 0 or non-finite statistics: folding would print numpy warnings and
    make NaN weights; the BatchNormalization is left (and reported), the outputs unchanged."""
    proto = _cnn_gemm()
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    if edit == "negative_var":
        arrays["var"][3] = -2.0
    elif edit == "zero_var_and_epsilon":
        arrays["var"][3] = 0.0
        proto.graph.node[1].attribute.append(helper.make_attribute("epsilon", 0.0))
    elif edit == "nan_gamma":
        arrays["gamma"][3] = np.nan
    else:
        arrays["mean"][3] = np.inf
    for t in proto.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    onnx.save(proto, tmp_path / "m.onnx")
    (result,) = _run_cli_batch([(tmp_path, ["optimize", "m.onnx", "-o", "o.onnx"])])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "0 folded, 0 converted to Mul+Add, 1 left" in result.stdout
    assert "hold NaN or Inf, or var + epsilon is not positive" in result.stdout
    feed = {"x": _NORMAL[0]}
    ref = runtime.run(runtime.session(proto.SerializeToString()), feed)["y"]
    got = runtime.run(runtime.session(str(tmp_path / "o.onnx")), feed)["y"]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(got)], ref[~np.isnan(ref)], rtol=1e-5)


# ------------------------------------------------------------------ malformed ranges JSON

_RANGES = '{{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {{"x": {x}}}{extra}}}'


def _ranges(x: str, extra: str = "") -> str:
    return _RANGES.format(x=x, extra=extra)


# name -> (file content, words)
BAD_RANGES = {
    "empty": ("", "not valid JSON"),
    "not_json": ("{", "not valid JSON"),
    "binary": (b"\xff\xfe\x00\x01", "cannot read ranges file"),
    "array": ("[]", "expected a JSON object"),
    "wrong_format_tag": ('{"format": "other/1", "method": "minmax", "tensors": {}}', "format is 'other/1'"),
    "no_format_tag": ('{"method": "minmax", "tensors": {}}', "format is None"),
    "no_method": ('{"format": "zenith-onnx-ranges/1", "tensors": {}}', "'method' must be a non-empty string"),
    "tensors_not_object": ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": [1, 2]}', "'tensors' must be"),
    "nan_min": (_ranges('{"min": NaN, "max": 1}'), "not valid JSON (NaN is not a number"),
    "inf_max": (_ranges('{"min": 0, "max": Infinity}'), "not valid JSON (Infinity is not a number"),
    "minus_inf_min": (_ranges('{"min": -Infinity, "max": 1}'), "not valid JSON (-Infinity is not a number"),
    "overflowing_literal": (_ranges('{"min": 0, "max": 1e999}'), "tensor 'x' max must be a finite number"),
    "beyond_float32": (_ranges('{"min": -1e300, "max": 1}'), "tensor 'x' min must be a finite number (float32"),
    "huge_integer": (_ranges('{"min": 0, "max": 1' + "0" * 400 + "}"), "tensor 'x' max must be a finite number"),
    "min_above_max": (_ranges('{"min": 2, "max": 1}'), "tensor 'x' has min 2.0 > max 1.0"),
    "string_bound": (_ranges('{"min": "0", "max": 1}'), "tensor 'x' min must be a finite number"),
    "bool_bound": (_ranges('{"min": true, "max": 1}'), "tensor 'x' min must be a finite number"),
    "null_bound": (_ranges('{"min": 0, "max": null}'), "tensor 'x' max must be a finite number"),
    "missing_max": (_ranges('{"min": 0}'), "tensor 'x' must be {\"min\": number, \"max\": number}"),
    "extra_key": (_ranges('{"min": 0, "max": 1, "mean": 0.5}'), "tensor 'x' must be"),
    "negative_scale": (_ranges('{"min": 0, "max": 1}', ', "scales": {"x": -0.1}'), "scale of 'x' must be positive"),
    "zero_scale": (_ranges('{"min": 0, "max": 1}', ', "scales": {"x": 0}'), "scale of 'x' must be positive"),
    "nested_too_deep": ("[" * 100_000, "not valid JSON"),
    "model_instead_of_json": (_tiny_bytes(), "cannot read ranges file"),
}


@pytest.fixture(scope="module")
def bad_ranges_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ranges")
    _good_files(folder)
    for name, (content, _) in BAD_RANGES.items():
        path = folder / f"{name}.json"
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (folder / "folder.json").mkdir()
    cases = [*sorted(BAD_RANGES), "folder", "missing"]
    before = _snapshot(folder)
    jobs = [(folder, ["quantize", "good.onnx", "-o", f"out_{name}.onnx", "--ranges", f"{name}.json"]) for name in cases]
    results = dict(zip(cases, _run_cli_batch(jobs)))
    return results, before, _snapshot(folder)


@pytest.mark.parametrize("case", [*sorted(BAD_RANGES), "folder", "missing"])
def test_malformed_ranges_json_exit_2_one_line_no_output(bad_ranges_runs, tally, case):
    results, before, after = bad_ranges_runs
    words = {"folder": "cannot read ranges file", "missing": "no such file"}.get(case) or BAD_RANGES[case][1]
    _assert_error(results[case], f"{case}.json: ", words)
    assert after == before  # no output, the inputs untouched
    tally["malformed ranges files (exit 2)"] += 1


def test_ranges_json_that_just_fits_float32_gives_finite_scales(tmp_path):
    """The widest range the format accepts (+-3.4e38) and a zero-width one still give
    finite, normal scales."""
    _good_files(tmp_path)
    tensors = {"x": {"min": -3.4e38, "max": 3.4e38}, "t": {"min": 0.0, "max": 0.0}, "y": {"min": 5e-45, "max": 5e-45}}
    (tmp_path / "edge.json").write_text(json.dumps({"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": tensors}))
    (result,) = _run_cli_batch([(tmp_path, ["quantize", "good.onnx", "-o", "q.onnx", "--ranges", "edge.json"])])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    _assert_scales_sound(onnx.load(tmp_path / "q.onnx"))


# ------------------------------------------------------------------ 2. external data


def _external_model(folder: Path, location: str, data_file: Path) -> Path:
    """The tiny model in ``folder`` with its weight ``w`` in ``data_file``, referenced as ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    proto = tiny_model()
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_bytes(np.eye(4, dtype=np.float32).tobytes())
    (weight,) = proto.graph.initializer
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    path = folder / "bad.onnx"
    onnx.save(proto, path)
    return path


ESCAPES = {
    # name -> (location as written in the model, words)
    "dotdot": ("../outside/w.bin", "'../outside/w.bin' outside the model's folder; refused"),
    "dotdot_inside_first": ("sub/../../outside/w.bin", "outside the model's folder; refused"),
    "absolute": (None, "has external data at an absolute path"),  # filled in with the real path
    "symlink_out": ("link.bin", "'link.bin' outside the model's folder; refused"),
}


@pytest.fixture(scope="module")
def escape_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("escapes")
    outside = root / "outside" / "w.bin"
    jobs, keys, before = [], [], {}
    for name, (location, _) in ESCAPES.items():
        folder = root / name
        _good_files(folder)
        if name == "absolute":
            location = str(outside)
        _external_model(folder, location, outside)
        if name == "symlink_out":
            (folder / "link.bin").symlink_to(outside)
        before[name] = _snapshot(folder)
        for command in ("optimize", "calibrate", "quantize_data", "quantize_ranges"):
            jobs.append((folder, _command(command, "bad.onnx")))
            keys.append((name, command))
    outside_before = outside.read_bytes()
    results = dict(zip(keys, _run_cli_batch(jobs)))
    assert outside.read_bytes() == outside_before and sorted(p.name for p in outside.parent.iterdir()) == ["w.bin"]
    return results, before, {name: _snapshot(root / name) for name in ESCAPES}


@pytest.mark.parametrize("command", ["optimize", "calibrate", "quantize_data", "quantize_ranges"])
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_external_data_leaving_the_folder_is_refused(escape_runs, tally, case, command):
    results, before, after = escape_runs
    _assert_error(results[case, command], "bad.onnx: initializer 'w' ", ESCAPES[case][1])
    assert after[case] == before[case]
    tally["external data escapes refused"] += 1


def test_external_data_escape_through_the_python_api(tmp_path):
    outside = tmp_path / "outside" / "w.bin"
    path = _external_model(tmp_path / "m", "../outside/w.bin", outside)
    _good_files(tmp_path / "m")
    with pytest.raises(ModelError, match="outside the model's folder; refused"):
        quantize_file(path, tmp_path / "m" / "q.onnx", data=tmp_path / "m" / "calib.npz")
    with pytest.raises(ModelError, match="outside the model's folder; refused"):
        calibrate_file(path, tmp_path / "m" / "calib.npz", tmp_path / "m" / "r.json")
    assert not (tmp_path / "m" / "q.onnx").exists() and not (tmp_path / "m" / "r.json").exists()


def test_model_with_external_data_calibrates_quantizes_and_optimizes(tmp_path):
    """Weights beside the input are read; an output that keeps float weights puts them in
    `<output>.data` beside the output (never referencing the input's file); the input's
    folder is only read."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    proto = _cnn_gemm()
    onnx.save(_cnn_gemm(), src / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    rng = np.random.default_rng(1)
    np.savez(src / "calib.npz", x=rng.standard_normal((6, 1, 8, 6, 6)).astype(np.float32))
    before = _snapshot(src)
    results = _run_cli_batch([
        (tmp_path, ["calibrate", "src/m.onnx", "--data", "src/calib.npz", "-o", "dst/r.json"]),
        (tmp_path, ["quantize", "src/m.onnx", "-o", "dst/q.onnx", "--ranges", "dst/r.json"]),
        (tmp_path, ["quantize", "src/m.onnx", "-o", "dst/q_gemm_float.onnx", "--data", "src/calib.npz", "--exclude", "Gemm"]),
        (tmp_path, ["optimize", "src/m.onnx", "-o", "dst/o.onnx"]),
    ])
    for result in results:
        assert result.returncode == 0 and result.stderr == "", (result.args, result.stderr)
    assert _snapshot(src) == before
    # The optimized model keeps the Gemm weights of the input, in its own data file.
    assert sorted(p.name for p in dst.iterdir()) == [
        "o.onnx", "o.onnx.data", "q.onnx", "q_gemm_float.onnx", "q_gemm_float.onnx.data", "r.json"]
    for name in ("o.onnx", "q_gemm_float.onnx"):
        stored = onnx.load(dst / name, load_external_data=False)
        locations = {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{name}.data"}
    feed = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    ref = runtime.run(runtime.session(proto.SerializeToString()), feed)["y"]
    for name in ("o.onnx", "q.onnx", "q_gemm_float.onnx"):
        moved = tmp_path / "moved" / name
        moved.parent.mkdir(exist_ok=True)
        for p in dst.glob(f"{name}*"):  # the output and its data travel together
            shutil.copy(p, moved.parent / p.name)
        got = runtime.run(runtime.session(str(moved)), feed)["y"]
        assert np.max(np.abs(got - ref)) <= (1e-5 if name == "o.onnx" else 0.05) * np.max(np.abs(ref))
    _assert_scales_sound(onnx.load(dst / "q.onnx"), int32_biases=3)


def test_output_whose_data_file_is_the_inputs_weights_is_refused(tmp_path):
    """`optimize a.onnx -o q.onnx` must not replace q.onnx.data when a.onnx reads its
    weights from it."""
    _good_files(tmp_path)
    onnx.save(tiny_model(), tmp_path / "a.onnx", save_as_external_data=True, location="q.onnx.data", size_threshold=0)
    before = _snapshot(tmp_path)
    results = _run_cli_batch([
        (tmp_path, ["optimize", "a.onnx", "-o", "q.onnx"]),
        (tmp_path, ["optimize", "a.onnx", "-o", "q.onnx.data"]),
    ])
    for result in results:
        _assert_error(result, "saving would overwrite 'q.onnx.data', the external data file the model's weights are read from")
    assert _snapshot(tmp_path) == before


def test_an_output_that_is_a_symlink_is_replaced_not_written_through(tmp_path):
    _good_files(tmp_path)
    target = tmp_path / "elsewhere.onnx"
    target.write_bytes(b"not to be touched")
    (tmp_path / "q.onnx").symlink_to(target)
    (result,) = _run_cli_batch([(tmp_path, ["quantize", "good.onnx", "-o", "q.onnx", "--data", "calib.npz"])])
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == b"not to be touched"
    assert not (tmp_path / "q.onnx").is_symlink()
    onnx.checker.check_model(onnx.load(tmp_path / "q.onnx"), full_check=True)


# ------------------------------------------------------------------ 3. calibration data

_SHAPE = (4, 1, 8, 6, 6)  # 4 samples for _cnn_gemm's x[1,8,6,6]
_rng = np.random.default_rng(7)
_NORMAL = _rng.standard_normal(_SHAPE).astype(np.float32)


def _sprinkle(value: float) -> np.ndarray:
    data = _NORMAL.copy()
    data[2, 0, 3, 1, 4] = value
    return data


# name -> (arrays by key, None for success or the words of the error, words of a warning or None)
DATA_CASES = {
    "normal": ({"x": _NORMAL}, None, None),
    "nan": ({"x": _sprinkle(np.nan)}, "input 'x' has NaN values in sample 2", None),
    "inf": ({"x": _sprinkle(np.inf)}, "input 'x' has Inf values in sample 2", None),
    "minus_inf": ({"x": _sprinkle(-np.inf)}, "input 'x' has Inf values in sample 2", None),
    "1e38_overflows_in_the_model": (
        {"x": np.full(_SHAPE, 1e38, np.float32)}, "the float model produces non-finite values on this data", None),
    "1e30": ({"x": (_NORMAL * 1e30).astype(np.float32)}, None, None),
    "all_zero": ({"x": np.zeros(_SHAPE, np.float32)}, None, "constant on the calibration data"),
    "denormal": ({"x": np.full(_SHAPE, 1e-40, np.float32)}, None, "constant on the calibration data"),
    "mixed_denormal": ({"x": (np.sign(_NORMAL) * 1e-42).astype(np.float32)}, None, "constant on the calibration data"),
    "constant": ({"x": np.full(_SHAPE, 3.0, np.float32)}, None, "constant on the calibration data"),
    "one_sample": ({"x": _NORMAL[:1]}, None, None),
    "no_batch_axis": ({"x": _NORMAL[:, 0]}, None, None),
    "float64": ({"x": _NORMAL.astype(np.float64)}, None, "is float64, cast to the model's float32"),
    "float64_beyond_float32": ({"x": np.full(_SHAPE, 1e300)}, "input 'x' has values too large for float32 in sample 0", None),
    "float16": ({"x": _NORMAL.astype(np.float16)}, None, None),
    "int8": ({"x": np.clip(_NORMAL * 40, -128, 127).astype(np.int8)}, None, None),
    "int64_exact": ({"x": np.full(_SHAPE, 2**40, np.int64)}, None, "constant on the calibration data"),
    "int64_inexact": ({"x": np.full(_SHAPE, 2**40 + 1, np.int64)}, "input 'x' is int64 with values that float32 cannot hold exactly", None),
    "int64_max": ({"x": np.full(_SHAPE, 2**63 - 1, np.int64)}, "input 'x' is int64 with values that float32 cannot hold exactly", None),
    "uint64_max": ({"x": np.full(_SHAPE, 2**64 - 1, np.uint64)}, "input 'x' is uint64 with values that float32 cannot hold exactly", None),
    "bool": ({"x": _NORMAL > 0}, None, None),
    "complex": ({"x": _NORMAL.astype(np.complex64)}, "input 'x' has dtype complex64, not a numeric array", None),
    "strings": ({"x": np.full(_SHAPE[:1], "0.5")}, "input 'x' has dtype <U3, not a numeric array", None),
    "object_pickle": ({"x": np.array([_NORMAL[0], None], dtype=object)}, "input 'x' holds Python objects (pickle); refused", None),
    "wrong_shape": ({"x": _NORMAL[..., :5]}, "input 'x' has shape (4, 1, 8, 6, 5); the model expects (1, 8, 6, 6)", None),
    "wrong_rank": ({"x": _NORMAL[:, 0, 0]}, "input 'x' has shape (4, 6, 6); the model expects (1, 8, 6, 6)", None),
    "no_samples": ({"x": _NORMAL[:0]}, "no samples (axis 0 has length 0)", None),
    "scalar": ({"x": np.float32(1.0)}, "input 'x' is a scalar", None),
    "wrong_key": ({"image": _NORMAL}, "key 'image' is not an input of the model (inputs: x)", None),
    "extra_key": ({"x": _NORMAL, "mask": _NORMAL}, "key 'mask' is not an input of the model", None),
}


def _quantize_data(model_proto: onnx.ModelProto, arrays, config: QuantConfig | None = None):
    return quantize(ir.serde.deserialize_model(model_proto), arrays, config=config, report_samples=4)


CONFIGS = {
    "u8-per-channel": QuantConfig(),
    "u16": QuantConfig(activation_bits=16),
    "per-tensor": QuantConfig(per_channel=False),
    "w4-asymmetric-entropy": QuantConfig(weight_bits=4, symmetric_weights=False, method="entropy"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_calibration_data_gives_an_error_or_sound_scales(caplog, tally, case, config):
    """Through the Python API: every bad array is a one-line `DataError`, or the model is
    quantized with every scale (activations, weights, int32 biases) finite and normal, and a
    warning whenever a range had to be widened or the data cast."""
    arrays, error, warning = DATA_CASES[case]
    if error is not None:
        with pytest.raises(DataError) as info:
            _quantize_data(_cnn_gemm(), arrays, config)
        assert error in str(info.value) and "\n" not in str(info.value)
    else:
        with caplog.at_level("WARNING"):
            result = _quantize_data(_cnn_gemm(), arrays, config)
        _assert_scales_sound(ir.serde.serialize_model(result.model), int32_biases=3)
        assert result.report["accuracy"]["samples"] == min(4, len(arrays["x"]))
        assert np.isfinite(result.report["accuracy"]["sqnr_db"])
        warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        assert (warning in warned) if warning else not warned, warned
    tally["calibration data arrays tried"] += 1


@pytest.mark.parametrize("weight_scale", [1e-36, 3e-38, 1e-44, 0.0])
def test_tiny_weights_with_zero_data_keep_every_scale_normal(caplog, weight_scale):
    """The int32 bias scale is input scale x weight scale; with all-zero data (input scale
    1e-6/255) and weights near 1e-36 it used to round to 0 or a denormal float32."""
    for config in CONFIGS.values():
        result = _quantize_data(_cnn_gemm(weight_scale=weight_scale), {"x": np.zeros(_SHAPE, np.float32)}, config)
        _assert_scales_sound(ir.serde.serialize_model(result.model), int32_biases=3)
        assert np.isfinite(result.report["accuracy"]["sqnr_db"])


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "Inf")])
@pytest.mark.parametrize("tensor", ["w2", "b2", "W", "B"])
def test_non_finite_weights_are_named(tensor, value, what):
    """A NaN/Inf weight: calibration names the first activation it spoils; one that only
    reaches the (unobserved) float output of the Gemm is named by insert_qdq."""
    proto = _cnn_gemm()
    init = next(t for t in proto.graph.initializer if t.name == tensor)
    array = numpy_helper.to_array(init).copy()
    array.flat[0] = value
    init.CopyFrom(numpy_helper.from_array(array, tensor))
    if tensor in ("W", "B"):
        error, pattern = ModelError, f"constant '{tensor}' of Gemm node 'gemm' has {what} values; cannot quantize it"
    else:
        error, pattern = DataError, r"activation '\w+' \(output of node '\w+', \w+\) has (NaN|Inf|NaN and Inf) values in sample 0"
    with pytest.raises(error, match=pattern):
        _quantize_data(proto, {"x": _NORMAL})


def test_calibration_data_files_through_the_cli(tmp_path, tally):
    """The same arrays as .npz files, through `quantize --data` and `calibrate`: exit 2 with
    one line and no output, or exit 0 with sound scales (ranges: finite, min < max, at
    least `MIN_RANGE_WIDTH` wide); warnings are the only other stderr lines."""
    onnx.save(_cnn_gemm(), tmp_path / "m.onnx")
    jobs, cases = [], sorted(DATA_CASES)
    for case in cases:
        np.savez(tmp_path / f"{case}.npz", **DATA_CASES[case][0])
        jobs.append((tmp_path, ["quantize", "m.onnx", "-o", f"q_{case}.onnx", "--data", f"{case}.npz"]))
        jobs.append((tmp_path, ["calibrate", "m.onnx", "--data", f"{case}.npz", "-o", f"r_{case}.json"]))
    results = _run_cli_batch(jobs)
    for k, case in enumerate(cases):
        _, error, warning = DATA_CASES[case]
        for result, out in zip(results[2 * k: 2 * k + 2], (tmp_path / f"q_{case}.onnx", tmp_path / f"r_{case}.json")):
            tally["calibration data files tried (CLI runs)"] += 1
            if error is not None:
                _assert_error(result, f"{case}.npz: " if "model produces" not in error else "activation '", error)
                assert not out.exists()
                continue
            assert result.returncode == 0, (case, result.stderr)
            lines = result.stderr.splitlines()
            assert all(line.startswith("WARNING ") for line in lines), (case, result.stderr)
            assert (warning is not None) == bool(lines) and (warning is None or warning in result.stderr), (case, result.stderr)
            if out.suffix == ".onnx":
                _assert_scales_sound(onnx.load(out), int32_biases=3)
            else:
                for name, r in Ranges.load(out).tensors.items():
                    assert np.isfinite([r.min, r.max]).all() and r.max - r.min >= MIN_RANGE_WIDTH * (1 - 1e-9), (case, name, r)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


class _TouchWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_npz_with_a_pickle_member_is_not_unpickled(tmp_path):
    """An .npz whose member is a pickle (object array) is refused before anything loads it:
    this one creates a file when unpickled."""
    onnx.save(_cnn_gemm(), tmp_path / "m.onnx")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npz"
    np.savez(evil, x=np.array([_TouchWhenUnpickled(marker)], dtype=object))
    with np.load(evil, allow_pickle=True) as unsafe:  # the control: unpickling runs the payload
        unsafe["x"]
    assert marker.exists()
    marker.unlink()
    (result,) = _run_cli_batch([(tmp_path, ["quantize", "m.onnx", "-o", "q.onnx", "--data", "evil.npz"])])
    _assert_error(result, "evil.npz: input 'x' holds Python objects (pickle); refused")
    assert not marker.exists() and not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------ 4. atomic output

_RAISE_IN = {
    # name -> (patch source, expected exit code, words of the one stderr line)
    "insert_qdq_raises": (
        "from zenith_onnx.passes.insert_qdq import InsertQDQPass\n"
        "def boom(self, model):\n    raise RuntimeError('injected failure in insert_qdq')\n"
        "InsertQDQPass.call = boom",
        3, "zenith-onnx: internal error: RuntimeError: injected failure in insert_qdq",
    ),
    "fold_raises": (
        "from zenith_onnx.passes.fold_batchnorm import FoldBatchNormPass\n"
        "def boom(self, model):\n    raise ValueError('injected failure in fold')\n"
        "FoldBatchNormPass.call = boom",
        2, "zenith-onnx: error: pass 'fold_batchnorm' failed (passes run before it: lift_constants",
    ),
    "interrupted_in_insert_qdq": (
        "from zenith_onnx.passes.insert_qdq import InsertQDQPass\n"
        "def boom(self, model):\n    raise KeyboardInterrupt\n"
        "InsertQDQPass.call = boom",
        130, "zenith-onnx: interrupted",
    ),
    "out_of_memory_in_calibration": (
        "from zenith_onnx.observers import Observer\n"
        "def boom(self, x):\n    raise MemoryError\n"
        "Observer.observe = boom",  # every method's observers
        2, "zenith-onnx: error: out of memory",
    ),
    "save_fails_half_written": (
        "import onnx_ir\nfrom pathlib import Path\nreal_save = onnx_ir.save\n"
        "def half(model, path, **kwargs):\n"
        "    if '.out.onnx.' not in str(path):  # a temporary model for onnxruntime, not the output\n"
        "        return real_save(model, path, **kwargs)\n"
        "    Path(path).write_bytes(b'partial')\n    raise OSError(28, 'No space left on device')\n"
        "onnx_ir.save = half",
        2, "zenith-onnx: error: out.onnx: cannot write to folder",
    ),
}


@pytest.fixture
def model_dir(tmp_path):
    """m.onnx (Conv-BN-Relu-Gemm, external data) and calib.npz."""
    folder = tmp_path / "work"
    folder.mkdir()
    onnx.save(_cnn_gemm(), folder / "m.onnx", save_as_external_data=True, location="m.weights", size_threshold=0)
    np.savez(folder / "calib.npz", x=_NORMAL)
    return folder


@pytest.mark.parametrize("existing", [False, True], ids=["no-output-yet", "old-output"])
@pytest.mark.parametrize("case", sorted(_RAISE_IN))
def test_cli_failure_inside_a_step_leaves_no_output(model_dir, tally, case, existing):
    """A pass (or the save, or calibration) failing: the one line, the input byte for byte,
    no file at the output path, an old output untouched, no temporary left."""
    patch, code, words = _RAISE_IN[case]
    if existing:
        (model_dir / "out.onnx").write_bytes(b"old output")
    before = _snapshot(model_dir)
    result = _run_patched_cli(patch, "quantize", "m.onnx", "-o", "out.onnx", "--data", "calib.npz", cwd=model_dir)
    _assert_one_line(result, code, words)
    assert _snapshot(model_dir) == before
    tally["failures injected (CLI)"] += 1


def test_cli_calibrate_failure_keeps_the_old_ranges(model_dir):
    (model_dir / "r.json").write_text("old ranges")
    before = _snapshot(model_dir)
    patch = ("from zenith_onnx.passes.observe import ObservePass\n"
             "def boom(self, model):\n    raise RuntimeError('injected failure in observe')\n"
             "ObservePass.call = boom")
    result = _run_patched_cli(patch, "calibrate", "m.onnx", "--data", "calib.npz", "-o", "r.json", cwd=model_dir)
    _assert_one_line(result, 3, "zenith-onnx: internal error: RuntimeError: injected failure in observe")
    assert _snapshot(model_dir) == before


@pytest.mark.parametrize("command", ["quantize", "calibrate"])
def test_cli_killed_while_writing_leaves_the_old_output(model_dir, command):
    """SIGKILL halfway through writing: the output path still holds the old output (a
    hidden staging entry beside it is all a crash can leave)."""
    out = "out.onnx" if command == "quantize" else "r.json"
    (model_dir / out).write_bytes(b"old output")
    inputs = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    patch = f"""
import os, signal, pathlib, onnx_ir
real_save, real_write = onnx_ir.save, pathlib.Path.write_text
def half_then_die(path):
    pathlib.Path(path).write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
def save(model, path, **kwargs):  # temporary models for onnxruntime are saved normally
    return half_then_die(path) if ".{out}." in str(path) else real_save(model, path, **kwargs)
def write_text(self, *args, **kwargs):
    return half_then_die(self) if ".{out}." in str(self) else real_write(self, *args, **kwargs)
onnx_ir.save, pathlib.Path.write_text = save, write_text
"""
    argv = ["quantize", "m.onnx", "-o", out, "--data", "calib.npz"] if command == "quantize" else [
        "calibrate", "m.onnx", "--data", "calib.npz", "-o", out]
    result = _run_patched_cli(patch, *argv, cwd=model_dir)
    assert result.returncode == -9, result.stderr
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if not p.name.startswith(".")} == inputs
    assert [p.name for p in model_dir.iterdir() if p.name.startswith(".")]  # the staging entry, hidden


def test_read_only_output_folder_for_calibrate(model_dir):
    """(test_cli_errors covers optimize and quantize.)"""
    folder = model_dir / "readonly"
    with read_only_folder(folder) as prefix:
        (result,) = _run_cli_batch(
            [(model_dir, ["calibrate", "m.onnx", "--data", "calib.npz", "-o", "readonly/r.json"])],
            prefix=prefix)
        _assert_error(result, "readonly/r.json: cannot write to folder", "Permission denied")
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("argv, words", [
    (["--report", "m.onnx"], "m.onnx: this output would overwrite the input 'm.onnx'"),
    (["--report", "calib.npz"], "calib.npz: this output would overwrite the input 'calib.npz'"),
    (["--report", "out.onnx"], "out.onnx: this output would overwrite the output 'out.onnx'"),
    (["--report", "missing/report.json"], "missing/report.json: output folder 'missing' does not exist"),
    (["-o", "calib.npz"], "calib.npz: this output would overwrite the input 'calib.npz'"),
])
def test_outputs_never_overwrite_inputs_and_fail_before_any_work(model_dir, argv, words):
    """`--report` naming the model used to overwrite it with JSON after the work; a report
    folder that does not exist used to fail after the model was written."""
    before = _snapshot(model_dir)
    args = ["quantize", "m.onnx", "--data", "calib.npz", *(["-o", "out.onnx"] if "-o" not in argv else []), *argv]
    (result,) = _run_cli_batch([(model_dir, args)])
    _assert_error(result, words)
    assert _snapshot(model_dir) == before


# -- the Python API


def _boom(self, model):
    raise RuntimeError("injected failure")


@pytest.mark.parametrize("existing", [False, True], ids=["no-output-yet", "old-output"])
@pytest.mark.parametrize("where", ["insert_qdq", "fold_batchnorm", "save"])
def test_api_failure_inside_a_step_leaves_no_output(model_dir, monkeypatch, where, existing):
    from zenith_onnx.passes.fold_batchnorm import FoldBatchNormPass
    from zenith_onnx.passes.insert_qdq import InsertQDQPass

    if existing:
        (model_dir / "out.onnx").write_bytes(b"old output")
    before = _snapshot(model_dir)
    if where == "insert_qdq":
        monkeypatch.setattr(InsertQDQPass, "call", _boom)
        expected = RuntimeError
    elif where == "fold_batchnorm":
        monkeypatch.setattr(FoldBatchNormPass, "call", _boom)
        expected = ZenithError
    else:
        real_save = ir.save

        def half(model, path, **kwargs):
            if ".out.onnx." not in str(path):  # a temporary model for onnxruntime
                return real_save(model, path, **kwargs)
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ir, "save", half)
        expected = UsageError
    with pytest.raises(expected):
        quantize_file(model_dir / "m.onnx", model_dir / "out.onnx", data=model_dir / "calib.npz", report_path=model_dir / "rep.json")
    assert _snapshot(model_dir) == before


def test_api_calibrate_failure_keeps_the_old_ranges(model_dir, monkeypatch):
    from zenith_onnx.passes.observe import ObservePass

    (model_dir / "r.json").write_text("old ranges")
    before = _snapshot(model_dir)
    monkeypatch.setattr(ObservePass, "call", _boom)
    with pytest.raises(RuntimeError):
        calibrate_file(model_dir / "m.onnx", model_dir / "calib.npz", model_dir / "r.json")
    assert _snapshot(model_dir) == before


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_an_existing_output_is_replaced_only_once_the_new_one_is_whole(model_dir, monkeypatch, external):
    """While the new model (and its data file) is being written, the output path still
    holds the old model; afterwards, the new one, complete."""
    from zenith_onnx import modelio

    out = model_dir / "out.onnx"
    (model_dir / "out.onnx").write_bytes(b"old model")
    (model_dir / "out.onnx.data").write_bytes(b"old data")
    real_save = ir.save
    seen = []

    def watching_save(model, path, **kwargs):
        output = ".out.onnx." in str(path)  # else a temporary model for onnxruntime
        if output:
            seen.append((out.read_bytes(), (model_dir / "out.onnx.data").read_bytes()))
        real_save(model, path, **kwargs)
        if output:
            seen.append((out.read_bytes(), (model_dir / "out.onnx.data").read_bytes()))

    monkeypatch.setattr(ir, "save", watching_save)
    if external:
        monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", 100)  # every weight goes to out.onnx.data
    quantize_file(model_dir / "m.onnx", out, data=model_dir / "calib.npz", config=QuantConfig())
    assert seen == [(b"old model", b"old data")] * 2
    monkeypatch.undo()
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    _assert_scales_sound(written, int32_biases=3)
    assert ((model_dir / "out.onnx.data").read_bytes() != b"old data") == external
