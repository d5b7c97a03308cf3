"""How `zenith-onnx optimize` scales with graph size: load + default pipeline
(lift_constants, fold_batchnorm, cleanup) + save on chains of Conv-BN-Relu blocks.

    python bench/fold_scale.py [NODES ...]      (default: 1500 3000 6000)

prints one line per size, ``fold_scale: 6000 nodes: load X s, fold Y s, save Z s, total T s``,
then the time per node of each stage relative to the smallest size (about 1.0 when the
pipeline is linear). `run(sizes)` returns the same figures as dicts for a bench harness.
Blocks are 8 channels, 8x8 spatial, 3x3 kernels with padding 1 (3 nodes each).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from zenith_onnx import passes
from zenith_onnx.modelio import load_model, save_model

__all__ = ["build_chain", "run", "main"]

CHANNELS = 8
SIZE = 8
DEFAULT_SIZES = (1500, 3000, 6000)


def build_chain(blocks: int, channels: int = CHANNELS, size: int = SIZE, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` Conv-BN-Relu blocks in a chain (ir_version 10, opset 17)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    x = "x"
    for i in range(blocks):
        w = const(f"conv{i}.w", rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels))
        b = const(f"conv{i}.b", rng.standard_normal(channels) * 0.1)
        nodes.append(helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        stats = [
            const(f"bn{i}.scale", rng.uniform(0.5, 1.5, channels)),
            const(f"bn{i}.bias", rng.standard_normal(channels) * 0.1),
            const(f"bn{i}.mean", rng.standard_normal(channels) * 0.1),
            const(f"bn{i}.var", rng.uniform(0.5, 2.0, channels)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *stats], [f"bn{i}"], name=f"bn{i}"))
        x = "y" if i == blocks - 1 else f"relu{i}"
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [x], name=f"relu{i}"))
    shape = [1, channels, size, size]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def measure(nodes: int, folder: Path) -> dict:
    """Time load, default pipeline and save for a chain of ``nodes`` nodes (a multiple of 3)."""
    blocks = nodes // 3
    src, dst = folder / f"chain{nodes}.onnx", folder / f"chain{nodes}.out.onnx"
    onnx.save(build_chain(blocks), src)
    pipeline = passes.build_pipeline(passes.DEFAULT_OPTIMIZE)

    t0 = time.perf_counter()
    model = load_model(src)
    t1 = time.perf_counter()
    pipeline(model)
    t2 = time.perf_counter()
    save_model(model, dst)
    t3 = time.perf_counter()

    remaining = sum(1 for n in model.graph if n.op_type == "BatchNormalization")
    if remaining:
        raise RuntimeError(f"{remaining} BatchNormalization left in the {nodes}-node chain")
    return {
        "nodes": 3 * blocks,
        "nodes_after": len(model.graph),
        "load_s": t1 - t0,
        "fold_s": t2 - t1,
        "save_s": t3 - t2,
        "total_s": t3 - t0,
    }


def run(sizes=DEFAULT_SIZES) -> list[dict]:
    """One measurement per size (node count); each a dict with nodes, nodes_after,
    load_s, fold_s, save_s, total_s."""
    with tempfile.TemporaryDirectory(prefix="fold-scale-") as tmp:
        return [measure(n, Path(tmp)) for n in sizes]


def format_result(r: dict) -> str:
    return (
        f"fold_scale: {r['nodes']} nodes: load {r['load_s']:.2f} s, fold {r['fold_s']:.2f} s, "
        f"save {r['save_s']:.2f} s, total {r['total_s']:.2f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=list(DEFAULT_SIZES), help="node counts")
    args = parser.parse_args(argv)
    results = run(args.sizes)
    for r in results:
        print(format_result(r))
    base = results[0]
    for r in results[1:]:
        ratios = ", ".join(
            f"{stage} {(r[key] / r['nodes']) / (base[key] / base['nodes']):.2f}"
            for stage, key in (("load", "load_s"), ("fold", "fold_s"), ("save", "save_s"), ("total", "total_s"))
        )
        print(f"fold_scale: time per node at {r['nodes']} vs {base['nodes']} nodes: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
