"""The sine demo (quick mode): QAT INT4 keeps FP32's error, naive INT4 PTQ does not, and
the ONNX path (export_qat -> quantize -> onnxruntime) reproduces the torch QAT model."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from zenith_onnx.demo import _common, sine  # noqa: E402
from zenith_onnx.modelio import load_model  # noqa: E402
from zenith_onnx.qconfig import QuantConfig  # noqa: E402
from zenith_onnx.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("sine")
    return out, sine.run_demo(out_dir=out, quick=True)


def _mean(results, key):
    return results["mse"][key]["mean"]


def test_qat_int4_keeps_fp32_error(demo):
    _, results = demo
    assert _mean(results, "fp32") < 2e-3  # the float model fits the sine (noise variance is 1e-2)
    assert _mean(results, "qat") <= 2 * _mean(results, "fp32")
    assert results["relations"]["qat_within_2x_fp32"]


def test_naive_int4_ptq_is_far_worse_than_qat(demo):
    _, results = demo
    assert _mean(results, "ptq_per_tensor") >= 5 * _mean(results, "qat")
    assert results["relations"]["ptq_per_tensor_5x_qat"]
    # Per-channel PTQ is a real quantization too (worse than FP32), but its gap to QAT
    # depends on the training length (README), so only the direction is asserted.
    assert _mean(results, "ptq_per_channel") > 2 * _mean(results, "fp32")


def test_onnx_path_matches_torch_qat(demo):
    out, results = demo
    for d in results["onnx_vs_torch"]:
        assert d["rel"] <= 0.02 or d["abs"] <= 1e-4, d
    assert results["relations"]["onnx_matches_torch"]
    assert not results["calibration_data_used"]  # the export's own ranges sufficed
    # The only difference is the int32 bias of the integer kernels: with it, torch and
    # onnxruntime agree to float rounding (predictions are ~1, float32 eps 1.2e-7).
    assert results["relations"]["onnx_vs_torch_with_int32_bias_max_abs"] < 1e-5
    # The deployed model is really quantized: 8-bit activations in Q/DQ, 3 weights on
    # the 4-bit symmetric grid -7..7 (stored in int8 initializers).
    model = onnx.load(str(out / "qat_int4.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gemm") == 3 and ops.count("QuantizeLinear") == 3, ops
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    weights = [w for w in weights if w.ndim == 2]
    assert len(weights) == 3 and all(np.abs(w).max() == 7 for w in weights)
    # ... and onnxruntime runs every layer as an integer kernel.
    assert results["fusion_seed0"]["integer_ops"] == {"com.microsoft::QGemm": 3}
    assert results["fusion_seed0"]["fully_fused"]


def test_files_written(demo):
    out, results = demo
    png = out / "qat_success.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < png.stat().st_size < 100_000
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert len(results["mse"]["qat"]["per_seed"]) == 2 and results["setup"]["steps"] == 500


def test_missing_torch_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(UsageError, match=r"needs torch.*zenith-onnx\[qat\]"):
        sine.run_demo(out_dir=tmp_path, quick=True)
    assert not (tmp_path / "results.json").exists()


def test_a_model_without_ranges_is_calibrated_and_says_so():
    # The demo's QAT exports carry every range; a float model carries none, so the helper
    # falls back to the calibration data and notes it.
    src = _common.models_dir(["digits_cnn.onnx", "digits_calib.npz"])
    result = _common.quantize_qat_export(load_model(src / "digits_cnn.onnx"), src / "digits_calib.npz",
                                         QuantConfig(), "digits_calib.npz")
    assert any("calibrated those on digits_calib.npz" in n for n in result.report["notes"])
    assert result.report["calibration_data_used"]
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph) > 0
