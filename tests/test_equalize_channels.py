"""equalize_channels: Conv -> Relu -> depthwise Conv chains get equal channel ranges
(exact: relu(k x) = k relu(x) for k > 0; both weights are quantized per channel).

The model (chain_models.py): x -> Conv_a (3x3) -> Relu -> Conv_b (1x1) -> Relu -> t ->
Conv_c (3x3 depthwise) -> y, channels 0-7 of ``t`` 200x larger than channels 8-15 (Conv_c
scales them back). Float tolerance: 1e-5
relative (the factors are rounded once into each weight).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from chain_models import chain_feeds, chain_model

from zenith_onnx import runtime
from zenith_onnx.passes._graph import constant_array
from zenith_onnx.passes.equalize_channels import MAX_GAIN, EqualizeChannelsPass, equalizing_gains
from zenith_onnx.passes.split_channels import channel_stats, find_chains
from zenith_onnx.quantize import quantize
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import relative_error

C = 16
BIG = 200.0


def _model(activation: str = "Relu") -> ir.Model:
    return chain_model(C, activation, BIG)


_feeds = chain_feeds


def test_gains_lift_every_live_channel_to_the_largest_peak_within_the_bound():
    gains = equalizing_gains(np.array([10.0, 5.0, 0.01, 0.0]), max_gain=32.0)
    np.testing.assert_allclose(gains, [1.0, 2.0, 32.0, 1.0])  # dead channel: 1


def test_equalize_keeps_the_float_function_and_evens_the_peaks():
    model = _model()
    before = [runtime.run(runtime.session(model, "disable_all"), f)["y"] for f in _feeds(4)]
    chains = find_chains(model)
    stats = channel_stats(model, [c.observe for c in chains], _feeds())
    equalize = EqualizeChannelsPass(stats, max_gain=1e4)
    equalize(model)
    assert [r["depthwise"] for r in equalize.report] == ["Conv_c"] and equalize.report[0]["largest_gain"] > 50
    assert op_counts(model) == {"Conv": 3, "Relu": 2}
    after = [runtime.run(runtime.session(model, "disable_all"), f)["y"] for f in _feeds(4)]
    for a, b in zip(before, after):
        assert relative_error(a, b) <= 1e-5
    peaks = channel_stats(model, ["t"], _feeds())["t"].peaks
    assert peaks.max() / peaks.min() < 1.01  # every channel now spans the same range
    bias = constant_array(next(n for n in model.graph if n.name == "Conv_c").inputs[2])
    np.testing.assert_array_equal(bias, np.linspace(-0.1, 0.1, C).astype(np.float32))


def test_a_chain_through_hard_swish_is_not_equalized():
    model = _model("HardSwish")
    chains = find_chains(model)
    assert len(chains) == 1  # a chain, but not homogeneous: split_channels' work
    equalize = EqualizeChannelsPass(channel_stats(model, [c.observe for c in chains], _feeds()))
    equalize(model)
    assert equalize.report == []


def test_quantize_equalizes_and_gains_accuracy():
    feeds = _feeds()
    plain = quantize(_model(), feeds, report_samples=4, split_channels=False)
    result = quantize(_model(), feeds, report_samples=4)
    assert any("equalized the channel ranges of 1" in n for n in result.report["notes"])
    assert result.report["accuracy"]["sqnr_db"] > plain.report["accuracy"]["sqnr_db"] + 10.0
    assert result.report["fusion"]["integer_ops"]["QLinearConv"] == 3


@pytest.mark.parametrize("max_gain", [4.0, MAX_GAIN])
def test_the_gain_is_bounded(max_gain):
    model = _model()
    chains = find_chains(model)
    stats = channel_stats(model, [c.observe for c in chains], _feeds())
    spread = stats["t"].peaks.max() / stats["t"].peaks.min()
    EqualizeChannelsPass(stats, max_gain=max_gain)(model)
    peaks = channel_stats(model, ["t"], _feeds())["t"].peaks
    # The quietest channel gains max_gain exactly (its peak is far below max / max_gain).
    assert spread > 4 * max_gain
    assert peaks.max() / peaks.min() == pytest.approx(spread / max_gain, rel=1e-4)
