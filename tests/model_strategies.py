"""Hypothesis strategies for random small float models (tests/test_properties.py).

`graphs()` draws a `GraphSpec`: an input of shape (1, C, H, W) with C, H, W in 1..8, then a
few ops from Conv, BatchNormalization, Relu, Add, MatMul, Concat and Reshape, each reading
tensors made before it (so the graph is acyclic and every shape is known). A spec holds
only small integers and flags, so Hypothesis shrinks a failing graph op by op; its
``repr`` rebuilds the same model (weights come from ``seed``), and `GraphSpec.text` is the
model in ONNX text form, for the failure report.

Shapes the ops keep valid:
- Conv: 1x1 or 3x3 (3x3 only where it fits), padded or not, optionally depthwise, with or
  without bias; He-scaled weights so activations stay of order 1 through a chain.
- BatchNormalization: on a rank-4 or rank-2 tensor (channel axis 1); var in [0.2, 2].
- Add: a tensor with another of the same shape (itself included) or a per-channel constant.
- MatMul: on the last axis (rank 2: (1, K) @ (K, N); rank 4: (1, C, H, W) @ (W, N)).
- Concat: along axis 1 with a tensor of the same rank and the other dims equal.
- Reshape: rank 4 -> (1, C*H*W) and rank 2 (1, K) -> (1, K, 1, 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

__all__ = ["OPS", "Op", "GraphSpec", "graphs", "calibration_samples"]

OPS = ("conv", "bn", "relu", "add", "matmul", "concat", "reshape")
OPSET = 17
IR_VERSION = 8
MAX_DIM = 8


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a `GraphSpec`. ``a`` and ``b`` pick its inputs among the compatible
    tensors made so far (modulo their number); the other fields are its parameters."""

    kind: str
    a: int = 0
    b: int = 0
    channels: int = 1
    kernel: int = 1
    pad: bool = False
    bias: bool = False
    depthwise: bool = False


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    channels: int
    height: int
    width: int
    ops: tuple[Op, ...]
    seed: int = 0
    extra_output: int | None = None  # also output the tensor with this index (mod count)

    def build(self) -> onnx.ModelProto:
        return _Builder(self).model()

    @property
    def text(self) -> str:
        return onnx.printer.to_text(self.build())


class _Builder:
    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        # (name, shape) of every tensor made so far, the graph input first
        self.tensors: list[tuple[str, tuple[int, ...]]] = [("x", (1, spec.channels, spec.height, spec.width))]

    def const(self, base: str, array: np.ndarray) -> str:
        name = f"{base}_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op_type: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> None:
        out = f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{len(self.nodes)}", **attrs))
        self.tensors.append((out, shape))

    def pick(self, index: int, rank: int | None = None, like: tuple[int, ...] | None = None, skip_axis: int | None = None):
        """The ``index``-th (mod count) tensor of the given rank, or of shape ``like``
        except on ``skip_axis``; None if there is none."""
        found = []
        for name, shape in self.tensors:
            if rank is not None and len(shape) != rank:
                continue
            if like is not None and (len(shape) != len(like) or any(
                    s != t for k, (s, t) in enumerate(zip(shape, like)) if k != skip_axis)):
                continue
            found.append((name, shape))
        return found[index % len(found)] if found else None

    def model(self) -> onnx.ModelProto:
        for op in self.spec.ops:
            getattr(self, f"_{op.kind}")(op)
        outputs = [self.tensors[-1]]
        if self.spec.extra_output is not None:
            extra = self.tensors[self.spec.extra_output % len(self.tensors)]
            if extra[0] != outputs[0][0]:
                outputs.append(extra)
        graph = helper.make_graph(
            self.nodes, "random",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, self.tensors[0][1])],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model

    # -- ops

    def _conv(self, op: Op) -> None:
        picked = self.pick(op.a, rank=4)
        if picked is None:
            return
        x, (_, cin, h, w) = picked
        k = op.kernel if min(h, w) + 2 * (op.kernel // 2 if op.pad else 0) >= op.kernel else 1
        pad = k // 2 if op.pad else 0
        group, cout = (cin, cin) if op.depthwise else (1, op.channels)
        fan_in = cin // group * k * k
        weight = self.rng.standard_normal((cout, cin // group, k, k)).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        inputs = [x, self.const("w", weight)]
        if op.bias:
            inputs.append(self.const("b", (0.1 * self.rng.standard_normal(cout)).astype(np.float32)))
        shape = (1, cout, h + 2 * pad - k + 1, w + 2 * pad - k + 1)
        self.node("Conv", inputs, shape, kernel_shape=[k, k], pads=[pad] * 4, group=group)

    def _bn(self, op: Op) -> None:
        rank = 2 if op.depthwise else 4  # prefer a rank-2 tensor (after Reshape/MatMul) or a rank-4 one
        x, shape = self.pick(op.a, rank=rank) or self.pick(op.a, rank=6 - rank)
        c = shape[1]
        r = self.rng
        params = [
            (r.uniform(0.5, 1.5, c) * r.choice([-1.0, 1.0], c)).astype(np.float32),  # gamma
            (0.2 * r.standard_normal(c)).astype(np.float32),  # beta
            (0.2 * r.standard_normal(c)).astype(np.float32),  # mean
            r.uniform(0.2, 2.0, c).astype(np.float32),  # var
        ]
        names = [self.const(n, p) for n, p in zip(("gamma", "beta", "mean", "var"), params)]
        self.node("BatchNormalization", [x, *names], shape, epsilon=1e-3 if op.bias else 1e-5)

    def _relu(self, op: Op) -> None:
        x, shape = self.tensors[op.a % len(self.tensors)]
        self.node("Relu", [x], shape)

    def _add(self, op: Op) -> None:
        x, shape = self.tensors[op.a % len(self.tensors)]
        y, _ = self.pick(op.b, like=shape)
        if op.bias:  # a per-channel constant instead
            const_shape = (shape[1],) + (1,) * (len(shape) - 2)
            y = self.const("c", (0.5 * self.rng.standard_normal(const_shape)).astype(np.float32))
        self.node("Add", [x, y], shape)

    def _matmul(self, op: Op) -> None:
        x, shape = self.tensors[op.a % len(self.tensors)]
        k = shape[-1]
        weight = (self.rng.standard_normal((k, op.channels)) / np.sqrt(k)).astype(np.float32)
        self.node("MatMul", [x, self.const("m", weight)], shape[:-1] + (op.channels,))

    def _concat(self, op: Op) -> None:
        x, shape = self.tensors[op.a % len(self.tensors)]
        y, other = self.pick(op.b, like=shape, skip_axis=1)
        if shape[1] + other[1] > 2 * MAX_DIM:
            return
        self.node("Concat", [x, y], (1, shape[1] + other[1], *shape[2:]), axis=1)

    def _reshape(self, op: Op) -> None:
        x, shape = self.tensors[op.a % len(self.tensors)]
        size = int(np.prod(shape))
        target = (1, size) if len(shape) == 4 else (1, size, 1, 1)
        if size > MAX_DIM**3:
            return
        self.node("Reshape", [x, self.const("shape", np.array(target, np.int64))], target)


_dims = st.integers(1, MAX_DIM)


@st.composite
def ops(draw, kinds: tuple[str, ...] = OPS) -> Op:
    return Op(
        kind=draw(st.sampled_from(kinds)),
        a=draw(st.integers(0, 15)),
        b=draw(st.integers(0, 15)),
        channels=draw(_dims),
        kernel=draw(st.sampled_from([1, 3])),
        pad=draw(st.booleans()),
        bias=draw(st.booleans()),
        depthwise=draw(st.booleans()),
    )


@st.composite
def graphs(draw, min_ops: int = 1, max_ops: int = 6, require: tuple[str, ...] = ()) -> GraphSpec:
    """A random small model; ``require``: op kinds that must appear at least once."""
    drawn = draw(st.lists(ops(), min_size=min_ops, max_size=max_ops))
    for kind in require:
        if not any(op.kind == kind for op in drawn):
            position = draw(st.integers(0, len(drawn)))
            drawn.insert(position, draw(ops(kinds=(kind,))))
    return GraphSpec(
        channels=draw(_dims),
        height=draw(_dims),
        width=draw(_dims),
        ops=tuple(drawn),
        seed=draw(st.integers(0, 2**16)),
        extra_output=draw(st.none() | st.integers(0, 15)),
    )


def calibration_samples(spec: GraphSpec, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` standard-normal feeds for the model's input."""
    rng = np.random.default_rng(seed)
    shape = (1, spec.channels, spec.height, spec.width)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]
