"""split_channels: Conv -> activation -> depthwise Conv chains cut into channel groups of
similar range, each with its own 8-bit scale.

The model (chain_models.py): x -> Conv_a (3x3) -> Relu -> Conv_b (1x1) -> hard-swish
written as b * HardSigmoid(b) -> t -> Conv_c (3x3 depthwise) -> y, channels 0-15 of ``t``
200x larger than channels 16-31 (the zoo models' pattern before depthwise convs, 50x and
more). Float folding tolerance: 1e-5 relative
(the split computes the same sums per channel; only the order of channels in memory
changes).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from chain_models import chain_feeds, chain_model

from zenith_onnx import runtime
from zenith_onnx.fusion import fused_counts
from zenith_onnx.passes.split_channels import (
    ALIGN,
    ChannelStats,
    SplitChannelsPass,
    channel_groups,
    channel_stats,
    find_chains,
    split_noise_db,
    starved_channels,
)
from zenith_onnx.quantize import quantize
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import relative_error, sqnr_db

C = 32
BIG = 200.0


def _model(extra_reader: bool = False, big: float = BIG) -> ir.Model:
    return chain_model(C, "hardswish_written", big, extra_reader)


_feeds = chain_feeds


def _split(model: ir.Model) -> SplitChannelsPass:
    chains = find_chains(model)
    split = SplitChannelsPass(channel_stats(model, [c.observe for c in chains], _feeds()))
    split(model)
    return split


# ------------------------------------------------------------------ kernels


def test_channel_groups_cut_at_the_ratio_and_round_to_the_alignment():
    peaks = np.r_[np.full(20, 100.0), np.full(30, 5.0), np.full(14, 0.1)]
    groups = channel_groups(peaks, ratio=16.0, max_groups=3, align=16)
    # 20 big channels rounded up to 32 (12 of the 5.0 ones join); rounding the next 18 x
    # 5.0 up would swallow the 0.1 ones: 16 of them, then 2 x 5.0 + 14 x 0.1.
    assert [len(g) for g in groups] == [32, 16, 16]
    assert set(range(20)) <= set(groups[0]) and set(range(50, 64)) <= set(groups[2])
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(64))
    # 250 channels within the ratio: 240 of them, the last 16 take the 6 small ones.
    assert [len(g) for g in channel_groups(np.r_[np.full(250, 9.0), np.full(6, 0.1)])] == [240, 16]
    # Two groups at most: the rest goes to the last one; within the ratio: one group.
    assert [len(g) for g in channel_groups(peaks, ratio=16.0, max_groups=2, align=1)] == [20, 44]
    assert len(channel_groups(np.full(32, 3.0), ratio=16.0, max_groups=2, align=16)) == 1


def test_split_noise_db_is_the_mean_relative_step_noise_of_the_live_channels():
    low = np.zeros(4)
    high = np.array([255.0, 255.0, 2.55, 0.0])  # channel 3 is dead: left out of the mean
    stats = ChannelStats(low, high, mean_square=np.array([100.0, 100.0, 0.01, 0.0]))
    whole, grouped = split_noise_db(stats, [np.array([0, 1]), np.array([2, 3])])
    # One scale: step 1, noise 1/12 over 100, 100 and 0.01; two scales: steps 1 and 0.01.
    assert whole == pytest.approx(10 * np.log10((1 / 12 / 100 * 2 + 1 / 12 / 0.01) / 3))
    assert grouped == pytest.approx(10 * np.log10((1 / 12 / 100 * 2 + 1e-4 / 12 / 0.01) / 3))


def test_one_near_dead_channel_does_not_pay_for_a_split():
    """The MobileNetV2 bench net's case: 127 channels well served by one scale and one
    peaking at 1/1150 of them. Its relative noise alone lifts the chain's mean above the
    noise bar, but one starved channel is not worth a split (MIN_STARVED is 4)."""
    peaks = np.r_[np.linspace(0.5, 6.0, 127), 0.0052]
    stats = ChannelStats(np.zeros(128), peaks, mean_square=(peaks / 3) ** 2)
    groups = channel_groups(peaks)
    whole, grouped = split_noise_db(stats, groups)
    assert whole > -16 and whole - grouped > 6  # the noise rule alone would split
    assert starved_channels(stats) == 1
    peaks[:8] = 0.05  # 8 channels below 4 steps of 6/255: now the split pays
    assert starved_channels(ChannelStats(np.zeros(128), peaks, (peaks / 3) ** 2)) == 9


# ------------------------------------------------------------------ the pass


def test_split_keeps_the_float_function_and_cuts_the_chain_in_two():
    model = _model()
    before = [runtime.run(runtime.session(model, "disable_all"), f)["y"] for f in _feeds(4)]
    split = _split(model)
    assert [(r["depthwise"], r["groups"]) for r in split.report] == [("Conv_c", [C // 2, C // 2])]
    counts = op_counts(model)
    assert counts["Conv"] == 1 + 2 + 2 and counts["HardSigmoid"] == 2 and counts["Mul"] == 2
    assert counts["Concat"] == 1 and counts["Gather"] == 1
    depthwise = [n for n in model.graph if n.op_type == "Conv" and n.attributes.get("group") is not None
                 and n.attributes["group"].as_int() > 1]
    assert sorted(n.attributes["group"].as_int() for n in depthwise) == [C // 2, C // 2]
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.outputs[0].name == "y" and gather.outputs[0].is_graph_output()
    after = [runtime.run(runtime.session(model, "disable_all"), f)["y"] for f in _feeds(4)]
    for a, b in zip(before, after):
        assert relative_error(a, b) <= 1e-5


def test_a_chain_read_from_outside_or_well_scaled_is_left_whole(caplog):
    model = _model(extra_reader=True)
    with caplog.at_level("DEBUG", logger="zenith_onnx.passes.split_channels"):
        assert find_chains(model) == []
    assert "t has a reader outside the chain" in caplog.text
    model = _model(big=2.0)  # ranges within 16x: one scale serves all channels
    assert _split(model).report == [] and "Concat" not in op_counts(model)


def test_quantize_splits_the_chain_and_onnxruntime_runs_it_on_integers():
    """The depthwise input loses ~1 step per small channel with one scale; split, each half
    gets its own, and the output SQNR rises by far more than 10 dB."""
    feeds = _feeds()
    plain = quantize(_model(), feeds, report_samples=4, split_channels=False)
    split = quantize(_model(), feeds, report_samples=4)
    assert any("split 1 Conv -> activation -> depthwise Conv chain(s)" in n for n in split.report["notes"])
    assert split.report["accuracy"]["sqnr_db"] > plain.report["accuracy"]["sqnr_db"] + 10.0
    counts = fused_counts(split.model)
    # Conv_a, both halves of Conv_b and of Conv_c on integers; the Concat too, and the
    # Gather moves 8-bit values (no float op reads a DequantizeLinear).
    assert counts["QLinearConv"] == 5 and counts["QLinearConcat"] == 1 and counts["Gather"] == 1
    assert counts["float_ops_fed_by_dq"] == {}
    # What deploys (ORT_ENABLE_ALL) agrees with the QDQ graph's own report.
    ref = [runtime.run(runtime.session(split.float_model, "disable_all"), f)["y"] for f in feeds]
    got = [runtime.run(runtime.session(split.model, "all"), f)["y"] for f in feeds]
    assert sqnr_db(ref, got) > plain.report["accuracy"]["sqnr_db"] + 10.0


def test_data_read_once_is_not_read_twice_for_splitting():
    result = quantize(_model(), (f for f in _feeds()), report_samples=0, check_fusion=False)
    assert any("channel splitting skipped" in n for n in result.report["notes"])
    assert "Concat" not in op_counts(result.model)


def test_alignment_leaves_narrow_chains_whole():
    assert ALIGN == 16  # onnxruntime's QLinearConv is slow on channel counts off a multiple of 16
    peaks = np.r_[np.full(8, 100.0), np.full(8, 0.1)]
    assert len(channel_groups(peaks)) == 1
