"""Split a Conv -> activation -> depthwise Conv chain into channel groups of similar range,
so that each group's activations get their own 8-bit scale.

onnxruntime's integer Conv reads its input with one scale per tensor. In MobileNetV3 /
PP-LCNet blocks the channels that feed a depthwise Conv span very different ranges
(measured on PP-OCRv3 rec: 0.36 to 612 in one tensor; 28 of its 64 channels span fewer
than 4 steps of the per-tensor scale, so their depthwise outputs are noise). A depthwise
Conv treats each channel alone, so the chain can be cut by channels without changing the
float function; each piece is calibrated, and quantized, on its own. Before/After (two
groups; ``idx_g``: the channels of group g, ``perm``: ``argsort(concat(idx_g))``)::

    Before:  X -> Conv(W, b) -> act -> DwConv(V, c, group=C) -> Y
    After:   X -> Conv(W[idx_1], b[idx_1]) -> act -> DwConv(V[idx_1], c[idx_1], group=|idx_1|) -> Concat -> Gather(perm, axis=1) -> Y
             X -> Conv(W[idx_2], b[idx_2]) -> act -> DwConv(V[idx_2], c[idx_2], group=|idx_2|) -^

Math: for a depthwise Conv (group = channels, one input channel per output channel) and an
activation made of elementwise ops with scalar constants, output channel c depends on the
producer's output channel c only, so computing any subset of channels apart is exact; the
Concat and Gather put the channels back in their order (onnxruntime runs both on the
8-bit tensor: QLinearConcat, and Gather between Q/DQ of one scale). Groups
(`channel_groups`): channels sorted by peak |activation| on the calibration data, a new
group starting where a channel's peak is below the group's largest / ``ratio``, at most
``max_groups``, sizes rounded to `ALIGN` channels.

When (`split_noise_db`): splitting costs Conv launches, a Concat and a Gather, so a chain
is split only where the depthwise input is badly served by one scale. With ``s`` the
uint8 step of a set of channels (its range, 0 included, / 255), channel ``c`` carries
relative noise ``s^2 / 12 / E[x_c^2]``; its mean over the live channels (peak above
1e-6 of the largest), in dB, must exceed `NOISE_DB` with one scale and drop by at least
`MIN_GAIN_DB` with one scale per group, and at least `MIN_STARVED` live channels must
peak within `STARVED_STEPS` steps of the one scale (a lone near-dead channel does not
pay for a split). Measured before choosing these numbers (mean
relative noise with one scale): PP-OCRv3 rec +9 to -18 dB (18 dB output SQNR gained by
splitting), PicoDet layout +2 to -21 dB, PP-OCRv3 det -19 to -35 dB and the orientation
classifier -17 to -25 dB (no accuracy gained by splitting them, 10-15% latency lost).

Refused, with the reason in a debug line: the second Conv is not depthwise (group equal
to its input and output channels), a weight or bias is not constant, the first Conv is
grouped, the activation has an op that is not elementwise or a constant that is not a
scalar, a tensor of the chain has a reader outside it or is a graph output.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from zenith_onnx.passes._graph import attr_int, constant_array, is_default_domain
from zenith_onnx.passes._rewriter import Rewriter
from zenith_onnx.passes.registry import register

__all__ = ["SplitChannelsPass", "Chain", "ChannelStats", "find_chains", "channel_groups", "channel_stats", "split_noise_db",
           "RATIO", "MAX_GROUPS", "NOISE_DB", "MIN_GAIN_DB",
           "STARVED_STEPS", "MIN_STARVED", "starved_channels"]

logger = logging.getLogger(__name__)

ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "HardSigmoid", "HardSwish", "Sigmoid",
                         "LeakyRelu", "Tanh"})
RATIO = 16.0
MAX_GROUPS = 2
NOISE_DB = -16.0
MIN_GAIN_DB = 6.0
# ... and only where several channels starve: at least MIN_STARVED live channels peak
# within STARVED_STEPS steps of the one-scale quantizer. In the MobileNetV2 bench net one
# channel peaking at 1/1150 of the others put a chain at +8.5 dB mean noise; split, that
# net ran 13% slower and lost 0.7 dB output SQNR. Every chain split in PP-OCRv3 rec has 7
# to 49 starved channels.
STARVED_STEPS = 4
MIN_STARVED = 4
# onnxruntime's QLinearConv (NHWC, AVX-512) takes a slow path when the channel count is not
# a multiple of 16: a 214-channel depthwise 3x3 on 6x160 took 0.34 ms, 256 channels 0.10 ms.
ALIGN = 16


def channel_groups(peaks: np.ndarray, ratio: float = RATIO, max_groups: int = MAX_GROUPS, align: int = ALIGN) -> list[np.ndarray]:
    """Channel indices (ascending) of each group, largest peaks first: a group holds the
    channels within ``ratio`` of its largest peak, rounded up to a multiple of ``align``
    channels (by taking the next-largest ones); the last group takes what is left."""
    peaks = np.asarray(peaks, np.float64)
    order = np.argsort(-peaks, kind="stable")
    groups, start = [], 0
    while start < len(order):
        if len(groups) == max_groups - 1:
            end = len(order)
        else:
            end = start + 1
            while end < len(order) and peaks[order[end]] * ratio >= peaks[order[start]]:
                end += 1
            size = -(-(end - start) // align) * align
            if start + size >= len(order) > end:
                # Rounding up would swallow the small channels: leave the last `align`
                # (and any remainder) to them.
                size = max(align, (len(order) - start - 1) // align * align)
            end = min(len(order), start + size)
        groups.append(np.sort(order[start:end]))
        start = end
    return groups


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    """Per channel (axis 1) over the calibration samples: min, max and mean square."""

    low: np.ndarray
    high: np.ndarray
    mean_square: np.ndarray

    @property
    def peaks(self) -> np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


def split_noise_db(stats: ChannelStats, groups: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean relative uint8 noise of the live channels, in dB: with one scale for all
    channels, and with one scale per group."""
    peaks = stats.peaks
    live = peaks > 1e-6 * peaks.max() if peaks.size else peaks.astype(bool)
    if not live.any():
        return -np.inf, -np.inf

    def noise(sets: Sequence[np.ndarray]) -> float:
        total = 0.0
        for idx in sets:
            step = (max(float(stats.high[idx].max()), 0.0) - min(float(stats.low[idx].min()), 0.0)) / 255.0
            used = idx[live[idx]]
            total += float(np.sum(step**2 / 12.0 / np.maximum(stats.mean_square[used], 1e-30)))
        return 10.0 * np.log10(max(total / int(live.sum()), 1e-30))

    return noise([np.arange(peaks.size)]), noise(groups)


def starved_channels(stats: ChannelStats) -> int:
    """How many live channels peak within `STARVED_STEPS` uint8 steps of one scale for
    all channels."""
    peaks = stats.peaks
    live = peaks > 1e-6 * peaks.max() if peaks.size else peaks.astype(bool)
    if not live.any():
        return 0
    step = (max(float(stats.high.max()), 0.0) - min(float(stats.low.min()), 0.0)) / 255.0
    return int(np.sum(peaks[live] < STARVED_STEPS * step))


def channel_stats(model: ir.Model, names: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, ChannelStats]:
    """`ChannelStats` of each named tensor over ``feeds`` (onnxruntime, ORT_DISABLE_ALL)."""
    from zenith_onnx import runtime
    from zenith_onnx.quantize import _with_outputs

    sess = runtime.session(_with_outputs(model, names), "disable_all")
    low: dict[str, np.ndarray] = {}
    high: dict[str, np.ndarray] = {}
    square: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for feed in feeds:
        values = runtime.run(sess, feed)
        for name in names:
            v = values[name]
            x = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1).astype(np.float64)
            low[name] = np.minimum(low[name], x.min(axis=1)) if name in low else x.min(axis=1)
            high[name] = np.maximum(high[name], x.max(axis=1)) if name in high else x.max(axis=1)
            square[name] = square.get(name, 0.0) + np.sum(x * x, axis=1)
            count[name] = count.get(name, 0) + x.shape[1]
    return {name: ChannelStats(low[name], high[name], square[name] / count[name]) for name in low}


@dataclasses.dataclass(frozen=True)
class Chain:
    """Conv -> elementwise region -> depthwise Conv. ``observe``: the depthwise input."""

    producer: ir.Node
    region: tuple[ir.Node, ...]  # in graph order
    depthwise: ir.Node

    @property
    def observe(self) -> str:
        return self.depthwise.inputs[0].name


def _is_depthwise(node: ir.Node) -> str | None:
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.ndim < 3:
        return "its weight is not a constant of rank >= 3"
    if attr_int(node, "group", 1) != w.shape[0] or w.shape[1] != 1 or w.shape[0] < 2:
        return f"not depthwise (group {attr_int(node, 'group', 1)}, weight {w.shape})"
    if len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None:
        return "its bias is not constant"
    return None


def _chain(dw: ir.Node, position: Mapping[ir.Node, int]) -> Chain | str:
    why = _is_depthwise(dw)
    if why:
        return why
    region: list[ir.Node] = []
    root: ir.Node | None = None
    todo, seen = [dw.inputs[0]], set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        p = v.producer()
        if p is None or not is_default_domain(p):
            return f"{v.name} is a graph input or comes from another domain"
        if v.is_graph_output():
            return f"{v.name} is a graph output"
        if p.op_type == "Conv":
            if root is not None and root is not p:
                return "the activation reads two Convs"
            root = p
            continue
        if p.op_type not in ELEMENTWISE:
            return f"{p.op_type} {p.name} between the Convs is not elementwise"
        region.append(p)
        for inp in p.inputs:
            if inp is None:
                continue
            c = constant_array(inp)
            if c is not None:
                if c.size != 1:
                    return f"{p.op_type} {p.name} has a constant that is not a scalar"
                continue
            todo.append(inp)
    if root is None:
        return "no Conv before the activation"
    w = constant_array(root.inputs[1]) if len(root.inputs) > 1 else None
    if w is None or attr_int(root, "group", 1) != 1:
        return f"the first Conv {root.name} is grouped or its weight is not constant"
    if len(root.inputs) > 2 and root.inputs[2] is not None and constant_array(root.inputs[2]) is None:
        return f"the first Conv {root.name}'s bias is not constant"
    if w.shape[0] != constant_array(dw.inputs[1]).shape[0]:
        return "the Convs have different channel counts"
    inside = {*region, dw}
    for node in (root, *region):
        for out in node.outputs:
            if out.is_graph_output() or any(u.node not in inside for u in out.uses()):
                return f"{out.name} has a reader outside the chain"
    region.sort(key=lambda n: position[n])
    return Chain(root, tuple(region), dw)


def find_chains(model: ir.Model) -> list[Chain]:
    """Every Conv -> elementwise activation -> depthwise Conv chain of the main graph."""
    position = {node: k for k, node in enumerate(model.graph)}
    found = []
    for node in model.graph:
        if node.op_type != "Conv" or not is_default_domain(node):
            continue
        chain = _chain(node, position)
        if isinstance(chain, str):
            if attr_int(node, "group", 1) > 1:
                logger.debug("split_channels: depthwise %s kept whole: %s", node.name, chain)
            continue
        found.append(chain)
    return found


@register("split_channels", float_preserving=True, standalone=False)
class SplitChannelsPass(ir.passes.InPlacePass):
    """Split Conv -> activation -> depthwise Conv chains by channel range, so each group gets its own activation scale (needs calibration statistics)."""

    def __init__(self, stats: Mapping[str, ChannelStats], ratio: float = RATIO, max_groups: int = MAX_GROUPS,
                 noise_db: float = NOISE_DB, min_gain_db: float = MIN_GAIN_DB):
        super().__init__()
        self.stats = stats
        self.noise_db = noise_db
        self.min_gain_db = min_gain_db
        self.ratio = ratio
        self.max_groups = max_groups
        self.report: list[dict] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = []
        rw = Rewriter(model)
        for chain in find_chains(model):
            stats = self.stats.get(chain.observe)
            if stats is None:
                logger.debug("split_channels: %s: no statistics measured for %s", chain.depthwise.name, chain.observe)
                continue
            groups = channel_groups(stats.peaks, self.ratio, self.max_groups)
            if len(groups) < 2:
                logger.debug("split_channels: %s: one group (peaks within %gx)", chain.depthwise.name, self.ratio)
                continue
            whole, grouped = split_noise_db(stats, groups)
            starved = starved_channels(stats)
            if whole <= self.noise_db or whole - grouped < self.min_gain_db or starved < MIN_STARVED:
                logger.debug("split_channels: %s kept whole: input noise %.1f dB with one scale, %.1f dB in %d groups, "
                             "%d channel(s) starved", chain.depthwise.name, whole, grouped, len(groups), starved)
                continue
            self._split(rw, chain, groups)
            self.report.append({"depthwise": chain.depthwise.name, "producer": chain.producer.name,
                                "groups": [len(g) for g in groups], "noise_db": [whole, grouped]})
        if self.report:
            logger.info("split_channels: %d chain(s) split", len(self.report))
        return ir.passes.PassResult(model, bool(self.report))

    @staticmethod
    def _split(rw: Rewriter, chain: Chain, groups: list[np.ndarray]) -> None:
        graph = chain.depthwise.graph
        outputs = []
        nodes: list[ir.Node] = []
        for k, idx in enumerate(groups):
            mapping: dict[ir.Value, ir.Value] = {}
            for old in (chain.producer, *chain.region, chain.depthwise):
                inputs = []
                for slot, v in enumerate(old.inputs):
                    if old.op_type == "Conv" and slot > 0 and v is not None:
                        inputs.append(rw.constant(graph, f"{v.name}_split{k}", constant_array(v)[idx]))
                    else:
                        inputs.append(mapping.get(v, v))
                attributes = dict(old.attributes)
                if old is chain.depthwise:
                    attributes["group"] = ir.AttrInt64("group", len(idx))
                out = old.outputs[0]
                new_out = ir.Value(name=rw.unique(f"{out.name}_split{k}"), type=out.type)
                node = ir.node(old.op_type, inputs, attributes=attributes, outputs=[new_out],
                               name=rw.unique(f"{old.name or old.op_type}_split{k}"))
                mapping[out] = new_out
                nodes.append(node)
            outputs.append(nodes[-1].outputs[0])
        y = chain.depthwise.outputs[0]
        concat = ir.node("Concat", outputs, attributes={"axis": 1},
                         outputs=[ir.Value(name=rw.unique(f"{y.name}_grouped"), type=y.type)],
                         name=rw.unique(f"{chain.depthwise.name}_groups_Concat"))
        order = np.argsort(np.concatenate(groups)).astype(np.int64)
        gather = ir.node("Gather", [concat.outputs[0], rw.constant(graph, f"{chain.depthwise.name}.channel_order", order)],
                         attributes={"axis": 1}, outputs=[ir.Value(name=rw.unique(f"{y.name}_ordered"), type=y.type, shape=y.shape)],
                         name=rw.unique(f"{chain.depthwise.name}_order_Gather"))
        graph.insert_before(chain.depthwise, [*nodes, concat, gather])
        rw.bypass(chain.depthwise, gather.outputs[0])
        for node in reversed((chain.producer, *chain.region)):
            rw.remove(node)
