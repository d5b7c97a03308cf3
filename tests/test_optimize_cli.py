"""`zenith-onnx optimize`: folds, prints the op table and every BatchNormalization it
left with the reason, lists passes, takes --passes, and fails cleanly (exit 2, one line,
no output file, input untouched)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import onnx
import pytest
from bn_models import GraphBuilder, make_model

from zenith_onnx import cli
from zenith_onnx.modelio import load_model
from zenith_onnx.passes import DEFAULT_OPTIMIZE
from zenith_onnx.passes.fold_batchnorm import FoldBatchNormPass
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import assert_outputs_close

C = 4


@pytest.fixture
def model_path(tmp_path):
    """One BN that folds into a Conv, one that becomes Mul+Add (after the graph input),
    one that is left (rank unknown: no shape information after an Add)."""
    b = GraphBuilder(constants_as_nodes=True)
    x = b.input("x", [1, C, 5, 5])
    r = b.node("Relu", [b.bn(b.conv(x, C, C, "conv", pads=[1, 1, 1, 1]), C, "bn_fold")], "r", "relu")
    s = b.node("Add", [r, b.bn(x, C, "bn_input")], "s", "add")
    b.node("Relu", [b.bn(s, C, "bn_left")], "y", "relu_out")
    b.output("y", None)
    path = tmp_path / "in.onnx"
    onnx.save(make_model(b.graph()), path)
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_python_m_optimize_folds_and_reports(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    digest = _digest(model_path)
    proc = subprocess.run(
        [sys.executable, "-m", "zenith_onnx", "optimize", str(model_path), "-o", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    table = {op: [before, after] for op, before, after in (line.split() for line in lines if len(line.split()) == 3)}
    assert lines[0].split() == ["op", "before", "after"]
    assert table["BatchNormalization"] == ["3", "1"]
    assert table["Mul"] == ["0", "1"]
    assert table["Constant"] == ["14", "0"]  # lifted to initializers, then folded
    assert "fold_batchnorm: 3 BatchNormalization: 1 folded, 1 converted to Mul+Add, 1 left" in lines
    left = [line for line in lines if "BatchNormalization 'bn_left'" in line]
    assert len(left) == 1 and "left (" in left[0] and "input rank is unknown" in left[0]
    assert any("BatchNormalization 'bn_input'" in line and "converted to Mul+Add" in line for line in lines)
    assert _digest(model_path) == digest
    assert op_counts(load_model(out)) == {"Add": 2, "BatchNormalization": 1, "Conv": 1, "Mul": 1, "Relu": 2}
    assert_outputs_close(str(model_path), str(out))


def test_list_passes_shows_fold_batchnorm(capsys):
    assert cli.main(["optimize", "--list-passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("fold_batchnorm "))
    assert row.split(None, 1)[1] == FoldBatchNormPass.__doc__.splitlines()[0]
    assert "default pipeline: " + ",".join(DEFAULT_OPTIMIZE) in lines


def test_passes_option_runs_only_those(model_path, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    assert cli.main(["optimize", str(model_path), "-o", str(out), "--passes", "fold_batchnorm,cleanup"]) == 0
    text = capsys.readouterr().out
    assert "passes fold_batchnorm,cleanup" in text
    model = load_model(out)
    # No lift_constants: folded weights are new initializers, the BN and the unfolded
    # layers keep their Constant nodes, the ones nothing reads are gone.
    assert op_counts(model)["BatchNormalization"] == 1
    assert op_counts(model)["Constant"] == 4  # bn_left's statistics
    assert_outputs_close(str(model_path), str(out))


def _assert_failed_cleanly(capsys, tmp_path, model_path, digest: str, *needles: str) -> None:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # no output, no temp file
    assert _digest(model_path) == digest


def test_unknown_pass_is_a_usage_error(model_path, tmp_path, capsys):
    digest = _digest(model_path)
    code = cli.main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx"), "--passes", "fold_batchnorm,nope"])
    assert code == 2
    _assert_failed_cleanly(capsys, tmp_path, model_path, digest, "unknown pass 'nope'", "fold_batchnorm")


def test_failing_pass_is_named_and_writes_nothing(model_path, tmp_path, capsys, monkeypatch):
    def boom(self, model):
        raise RuntimeError("weights exploded")

    monkeypatch.setattr(FoldBatchNormPass, "call", boom)
    digest = _digest(model_path)
    code = cli.main(["optimize", str(model_path), "-o", str(tmp_path / "out.onnx")])
    assert code == 2
    _assert_failed_cleanly(
        capsys, tmp_path, model_path, digest,
        "pass 'fold_batchnorm' failed (passes run before it: lift_constants, fuse_bias_add)", "weights exploded",
    )
