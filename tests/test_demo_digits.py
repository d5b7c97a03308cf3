"""The digits demo end to end (quick mode): accuracy targets, fused kernels, files written."""

from __future__ import annotations

import json

import onnx
import pytest

from zenith_onnx.demo import _common, digits
from zenith_onnx.errors import ModelError


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    results = digits.run_demo(out_dir=out, quick=True)
    return out, results, {v["name"]: v for v in results["variants"]}


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_float_model_is_accurate_and_folding_keeps_it(demo):
    out, _, by_name = demo
    assert by_name["float"]["accuracy"] > 0.9
    assert by_name["float, BN folded"]["accuracy"] == by_name["float"]["accuracy"]
    assert _ops(out / "float.onnx").count("BatchNormalization") == 4
    assert "BatchNormalization" not in _ops(out / "float_folded.onnx")


def test_int8_ptq_within_half_a_point_and_fused(demo):
    out, results, by_name = demo
    loss = 100 * (by_name["float"]["accuracy"] - by_name["int8 PTQ"]["accuracy"])
    assert loss <= 0.5
    assert results["targets"]["int8_ptq_met"]
    # The model really is quantized (a no-op would pass the accuracy check): integer
    # kernels fused by onnxruntime for the 3 convolutions after the 1-channel stem (kept
    # float on purpose: faster there) and the head, logits no longer identical.
    assert by_name["int8 PTQ"]["integer_ops"].get("QLinearConv") == 3
    assert by_name["int8 PTQ"]["integer_ops"].get("com.microsoft::QGemm") == 1
    assert sum(by_name["int8 PTQ"]["integer_ops"].values()) > 0
    assert by_name["float"]["integer_ops"] == {}
    assert by_name["int8 PTQ"]["sqnr_db"] < 80
    assert _ops(out / "int8_ptq.onnx").count("QuantizeLinear") >= 1
    assert by_name["int8 PTQ"]["size_bytes"] < by_name["float"]["size_bytes"] / 2


def test_files_written(demo):
    out, results, by_name = demo
    for name in ("digits.png", "results.json", "ranges.json", *(v["file"] for v in by_name.values())):
        assert (out / name).stat().st_size > 0, name
    assert (out / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for v in by_name.values():
        assert v["latency"]["runs"] >= 50 and 0 < v["latency"]["median_ms"] <= v["latency"]["p90_ms"]
        assert v["size_bytes"] == (out / v["file"]).stat().st_size


def test_qat_w4_within_one_point_and_fused(demo):
    _, results, by_name = demo
    loss = 100 * (by_name["float"]["accuracy"] - by_name["w4 QAT"]["accuracy"])
    assert loss <= 1.0
    assert results["targets"]["w4_qat_met"]
    assert by_name["w4 QAT"]["integer_ops"].get("QLinearConv") == 4


def test_missing_qat_model_is_reported_not_faked(tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "QAT_MODEL", "no_such_qat.onnx")
    results = digits.run_demo(out_dir=tmp_path, quick=True)
    assert "w4 QAT" not in {v["name"] for v in results["variants"]}
    assert "w4_qat_met" not in results["targets"]
    assert any("no_such_qat.onnx is missing" in note for note in results["missing"])


def test_missing_models_folder_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "MODELS_DIR", tmp_path)
    with pytest.raises(ModelError, match=r"digits_cnn\.onnx.*not found"):
        digits.run_demo(out_dir=tmp_path / "out", quick=True)
