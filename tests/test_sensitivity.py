"""layer_sensitivity and quantize_with_fallback on a model with one badly scaled tensor.

The model: x -> Conv_a (3x3) -> Relu -> Conv_b (1x1) -> Relu -> t -> Conv_c (3x3
depthwise) -> y. Channel 0 of ``t`` is 200x larger than the others and Conv_c scales it
back by 1/200, so every output channel has the same size. A per-tensor uint8 scale for
``t`` spends its 255 steps on channel 0 and leaves ~1 step for the other seven: that
tensor alone costs most of the output SQNR (the pattern of the zoo models' tensors before
depthwise convs). Keeping it float needs both Conv_b (its producer) and Conv_c (its
reader) float; then only well-scaled tensors are quantized.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import runtime
from zenith_onnx.fusion import fused_counts
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.quantize import quantize
from zenith_onnx.sensitivity import layer_sensitivity, quantize_with_fallback
from zenith_onnx.testing import sqnr_db

C = 8
BIG = 200.0


def _model(name_b: str = "Conv_b") -> ir.Model:
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((C, 4, 3, 3)).astype(np.float32) * 0.25
    wb = rng.standard_normal((C, C, 1, 1)).astype(np.float32) * 0.35
    wb[0] *= BIG
    wc = rng.standard_normal((C, 1, 3, 3)).astype(np.float32) * 0.3
    wc[0] /= BIG
    bias = np.full(C, 0.05, np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(wa, "wa"), (wb, "wb"), (wc, "wc"), (bias, "ba"), (bias, "bb")]]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="Conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="Relu_a"),
        helper.make_node("Conv", ["a_relu", "wb", "bb"], ["b"], name=name_b, kernel_shape=[1, 1]),
        helper.make_node("Relu", ["b"], ["t"], name="Relu_b"),
        helper.make_node("Conv", ["t", "wc"], ["y"], name="Conv_c", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=C),
    ]
    graph = helper.make_graph(nodes, "badly_scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto)


@pytest.fixture(autouse=True)
def _no_channel_rewrites(monkeypatch):
    """quantize would equalize t's channels through the Relu (passes/equalize_channels.py)
    and the badly scaled tensor these tests need would be gone: keep it."""
    import zenith_onnx.quantize

    monkeypatch.setattr(zenith_onnx.quantize, "_split_channels", lambda model, data: ([], []))


def _data(count: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((count, 1, 4, 8, 8)).astype(np.float32)}


def _deployed_sqnr(float_model: ir.Model, qdq_model: ir.Model, data) -> float:
    feeds = [{"x": x} for x in data["x"]]
    ref = [runtime.run(runtime.session(float_model, "disable_all"), f)["y"] for f in feeds]
    sess = runtime.session(qdq_model, "all")
    return sqnr_db(ref, [runtime.run(sess, f)["y"] for f in feeds])


def test_sensitivity_names_the_badly_scaled_tensor_and_its_nodes():
    units = layer_sensitivity(_model(), _data())
    worst = units[0]
    assert (worst.kind, worst.name, worst.op) == ("activation", "b", "Conv")  # Relu_b absorbed: Q sits on b
    assert set(worst.keep_float) == {"Conv_b", "Conv_c"}
    # Alone it costs far more than anything else.
    assert worst.sqnr_db < 15.0
    assert units[1].sqnr_db > worst.sqnr_db + 15.0
    assert {(u.kind, u.name) for u in units} == {("activation", "x"), ("activation", "a"), ("activation", "b"), ("activation", "y"),
                                                ("constants", "Conv_a"), ("constants", "Conv_b"), ("constants", "Conv_c")}


def test_one_unit_sensitivity_matches_a_real_single_tensor_quantization():
    """The injected Q/DQ equals the QDQ model's: quantizing everything adds (roughly) the
    units' noise powers, so the estimate from the units is within 1 dB of the measurement."""
    model, data = _model(), _data()
    result = quantize(model, data, report_samples=0, check_fusion=False)
    units = layer_sensitivity(model, data, quantized=result)
    estimate = -10.0 * np.log10(sum(u.noise for u in units))
    measured = sqnr_db(*_float_and_qdq_outputs(result, data))
    assert abs(estimate - measured) < 1.0, (estimate, measured)


def _float_and_qdq_outputs(result, data):
    feeds = [{"x": x} for x in data["x"]]
    f = runtime.session(result.float_model, "disable_all")
    q = runtime.session(result.model, "disable_all")
    return [runtime.run(f, x)["y"] for x in feeds], [runtime.run(q, x)["y"] for x in feeds]


def test_fallback_keeps_the_tensor_float_and_reaches_the_goal():
    model, data = _model(), _data()
    result = quantize_with_fallback(model, data, goal_sqnr_db=30.0, max_float_nodes=4, latency_runs=0)
    r = result.report
    assert sorted(r["kept_float"]) == ["Conv_b", "Conv_c"]
    assert r["sqnr_db_before"] < 15.0
    assert r["sqnr_db_after"] >= 30.0 and r["goal_met"]
    assert r["sqnr_db_after"] == pytest.approx(_deployed_sqnr(result.float_model, result.model, data), abs=1e-6)
    left = {item["node"]: item["reason"] for item in r["quantize_report"]["left_float"]}
    assert left["Conv_b"] == left["Conv_c"] == "excluded by the user"
    # onnxruntime really runs them in float: one QLinearConv (Conv_a), two float Convs.
    counts = fused_counts(result.model)
    assert counts.get("QLinearConv") == 1 and counts.get("Conv", 0) + counts.get("FusedConv", 0) == 2
    assert "latency_ms" not in r


def test_budget_too_small_changes_nothing():
    model, data = _model(), _data()
    result = quantize_with_fallback(model, data, goal_sqnr_db=30.0, max_float_nodes=0, latency_runs=0)
    r = result.report
    assert r["kept_float"] == [] and r["rounds"] == []
    assert r["sqnr_db_after"] == r["sqnr_db_before"] and not r["goal_met"]


def test_a_unit_that_does_not_fit_the_budget_is_skipped():
    """One node cannot keep ``b`` float (that needs Conv_b and Conv_c): the goal is missed."""
    result = quantize_with_fallback(_model(), _data(), goal_sqnr_db=30.0, max_float_nodes=1, latency_runs=0)
    r = result.report
    assert "Conv_b" not in r["kept_float"] and len(r["kept_float"]) <= 1
    assert r["sqnr_db_after"] < 20.0 and not r["goal_met"]


def test_user_exclusions_are_kept_and_not_counted():
    model, data = _model(), _data()
    result = quantize_with_fallback(model, data, QuantConfig(exclude=("Conv_a",)), goal_sqnr_db=30.0,
                                    max_float_nodes=2, latency_runs=0)
    r = result.report
    assert sorted(r["kept_float"]) == ["Conv_b", "Conv_c"]
    assert list(r["quantize_report"]["config"]["exclude"]) == ["Conv_a", "Conv_b", "Conv_c"]


def test_goal_already_met_quantizes_once_and_reports_latency():
    model, data = _model(), _data()
    result = quantize_with_fallback(model, data, goal_sqnr_db=0.0, latency_runs=3)
    r = result.report
    assert r["kept_float"] == [] and r["goal_met"]
    assert set(r["latency_ms"]) == {"float", "int8", "fallback"}
    assert all(v["median_ms"] > 0 for v in r["latency_ms"].values())
    assert r["latency_ratio"]["float"] == 1.0
    assert "kept float: 0 node(s)" in result.format()


def test_a_generator_of_feeds_is_read_once_and_reused():
    model, data = _model(), _data()
    feeds = ({"x": x} for x in data["x"])
    result = quantize_with_fallback(model, feeds, goal_sqnr_db=30.0, max_float_nodes=4, latency_runs=0)
    assert result.report["samples"] == 8 and result.report["goal_met"]


def test_a_unit_touching_an_unnamed_node_is_never_chosen():
    """Exclusion works by node name: the tensor after an unnamed Conv cannot be kept float."""
    model, data = _model(name_b=""), _data()
    units = layer_sensitivity(model, data)
    assert (units[0].name, units[0].keep_float) == ("b", ())
    result = quantize_with_fallback(model, data, goal_sqnr_db=30.0, max_float_nodes=4, latency_runs=0,
                                    sensitivity=units)
    assert "" not in result.report["kept_float"] and not result.report["goal_met"]


def test_a_round_that_does_not_raise_the_sqnr_is_undone():
    """A unit ranked first that buys nothing (Conv_a alone: onnxruntime quantizes its float
    weight again) is undone; the next round keeps the real culprit float."""
    from zenith_onnx.sensitivity import Sensitivity

    model, data = _model(), _data()
    units = layer_sensitivity(model, data)
    useless = Sensitivity("activation", "decoy", "Conv", -50.0, ("Conv_a",))
    result = quantize_with_fallback(model, data, goal_sqnr_db=30.0, max_float_nodes=4, latency_runs=0,
                                    sensitivity=[useless, *units])
    r = result.report
    assert [x["accepted"] for x in r["rounds"]] == [False, True]
    assert r["rounds"][0]["added"][0]["name"] == "decoy"
    assert sorted(r["kept_float"]) == ["Conv_b", "Conv_c"] and r["goal_met"]


def test_fallback_keeps_float_by_noise_removed_per_node():
    """Greedy by noise per node newly kept float: two one-node units before a three-node
    unit that removes more noise in all; once their nodes are float, the big unit costs
    one node more and fits too (the budget is three nodes)."""
    from zenith_onnx.sensitivity import Sensitivity

    units = [
        Sensitivity("activation", "t", "Conv", 0.0, ("Conv_a", "Conv_b", "Conv_c")),  # noise 1.0, 3 nodes
        Sensitivity("constants", "Conv_c", "Conv", 1.0, ("Conv_c",)),  # noise 0.79, 1 node
        Sensitivity("constants", "Conv_a", "Conv", 2.0, ("Conv_a",)),  # noise 0.63, 1 node
    ]
    data = _data()
    result = quantize_with_fallback(_model(), data, goal_sqnr_db=200.0, max_float_nodes=3, max_rounds=1,
                                    latency_runs=0, sensitivity=units)
    (first,) = result.report["rounds"]
    assert [u["name"] for u in first["added"]] == ["Conv_c", "Conv_a", "t"]
    assert first["float_nodes"] == 3
    tight = quantize_with_fallback(_model(), data, goal_sqnr_db=200.0, max_float_nodes=2, max_rounds=1,
                                   latency_runs=0, sensitivity=units)
    assert [u["name"] for u in tight.report["rounds"][0]["added"]] == ["Conv_c", "Conv_a"]
