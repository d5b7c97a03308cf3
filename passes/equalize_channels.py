"""Equalize the channel ranges feeding a depthwise Conv through a Relu (exact), so that one
8-bit scale serves every channel.

A depthwise Conv reads each channel alone, and ``relu(k x) = k relu(x)`` for ``k > 0``:
scaling output channel ``c`` of the Conv before by ``k_c`` and input channel ``c`` of the
depthwise Conv by ``1 / k_c`` leaves the float function unchanged. Both weights are
quantized per output channel, so the factors cost them nothing; the tensor between them
is quantized with one scale, which now fits every channel. Before/After::

    Before:  X -> Conv(W, b) -> Relu -> DwConv(V, d, group=C) -> Y
    After:   X -> Conv(k * W, k * b) -> Relu -> DwConv(V / k, d, group=C) -> Y

Math: ``k_c = min(P / p_c, MAX_GAIN)`` with ``p_c`` the channel's peak |activation| on the
calibration data and ``P`` the largest; channels whose peak is below 1e-6 P (dead) keep
``k_c = 1``; the products are computed in float64 and rounded once. `MAX_GAIN` bounds what
a channel quiet on the calibration data may be stretched by (louder data would clip).
The activation between may be empty, Relu or LeakyRelu (positively homogeneous); chains
with hard-swish (not homogeneous) are `split_channels`' work.

Refused, with the reason in a debug line: the chain has another activation, no statistics
were measured for it, every channel is within a factor 2 of the largest (nothing to gain).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes._graph import constant_array
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register
from zenith_onnx.passes.split_channels import Chain, ChannelStats, find_chains

__all__ = ["EqualizeChannelsPass", "equalizing_gains", "HOMOGENEOUS", "MAX_GAIN"]

logger = logging.getLogger(__name__)

HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})
MAX_GAIN = 32.0
MIN_GAIN = 2.0


def equalizing_gains(peaks: np.ndarray, max_gain: float = MAX_GAIN) -> np.ndarray:
    """``k_c = min(max(peaks) / peaks_c, max_gain)``; 1 for dead channels (peak below 1e-6
    of the largest)."""
    peaks = np.asarray(peaks, np.float64)
    gains = np.ones_like(peaks)
    if not peaks.size or peaks.max() <= 0:
        return gains
    live = peaks > 1e-6 * peaks.max()
    gains[live] = np.minimum(peaks.max() / peaks[live], max_gain)
    return gains


def homogeneous(chain: Chain) -> bool:
    return all(n.op_type in HOMOGENEOUS for n in chain.region)


@register("equalize_channels", float_preserving=True, standalone=False)
class EqualizeChannelsPass(ir.passes.InPlacePass):
    """Scale Conv -> Relu -> depthwise Conv channels to equal ranges (exact; needs calibration statistics)."""

    def __init__(self, stats: Mapping[str, ChannelStats], max_gain: float = MAX_GAIN):
        super().__init__()
        self.stats = stats
        self.max_gain = max_gain
        self.report: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = []
        rw = Rewriter(model)
        for chain in find_chains(model):
            if not homogeneous(chain):
                continue
            stats = self.stats.get(chain.observe)
            if stats is None:
                logger.debug("equalize_channels: %s: no statistics measured for %s", chain.depthwise.name, chain.observe)
                continue
            gains = equalizing_gains(stats.peaks, self.max_gain)
            if gains.max() < MIN_GAIN:
                logger.debug("equalize_channels: %s: channel peaks within %gx, left as is", chain.depthwise.name, MIN_GAIN)
                continue
            self._scale(rw, chain, gains)
            self.report.append({"depthwise": chain.depthwise.name, "producer": chain.producer.name,
                                "largest_gain": float(gains.max())})
        if self.report:
            logger.info("equalize_channels: %d chain(s) equalized", len(self.report))
        return ir.passes.PassResult(model, bool(self.report))

    @staticmethod
    def _scale(rw: Rewriter, chain: Chain, gains: np.ndarray) -> None:
        graph = chain.depthwise.graph
        for node, factor in ((chain.producer, gains), (chain.depthwise, 1.0 / gains)):
            for slot in (1, 2):
                if slot >= len(node.inputs) or node.inputs[slot] is None:
                    continue
                if node is chain.depthwise and slot == 2:
                    continue  # the depthwise bias adds after the scaled products: unchanged
                value = node.inputs[slot]
                array = constant_array(value)
                shape = (-1,) + (1,) * (array.ndim - 1)
                scaled = (array.astype(np.float64) * factor.reshape(shape)).astype(array.dtype)
                rw.set_input(node, slot, rw.constant(graph, f"{value.name}_equalized", scaled))
