"""4-bit MatMul weights: MatMulNBits vs the int8 container, by number of input rows.

`quantize(..., weight_bits=4)` turns a MatMul whose input has one row into
onnxruntime's MatMulNBits and keeps every other 4-bit weight in an int8 container
(`passes/matmul_nbits.py`). This measures both forms of the same one-MatMul model
(each forced by switching the MatMulNBits rule on or off) and the float model,
1 intra-op thread, interleaved rounds, so the rule can be checked on any machine::

    python bench/weight4.py            # the shapes below
    python bench/weight4.py --quick    # two shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((768, 768, 1), (768, 3072, 1), (4096, 4096, 1), (768, 768, 4), (1024, 4096, 64))
QUICK_SHAPES = ((768, 3072, 1), (768, 768, 4))


def _model(k: int, n: int, rows: int):
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def measure(k: int, n: int, rows: int, runs: int = 200) -> dict:
    import onnx_ir as ir

    from zenith_onnx import runtime
    from zenith_onnx.passes import insert_qdq
    from zenith_onnx.qconfig import QuantConfig
    from zenith_onnx.quantize import quantize

    proto = _model(k, n, rows)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((rows, k)).astype(np.float32)} for _ in range(4)]
    config = QuantConfig(weight_bits=4)

    def q():
        result = quantize(ir.serde.deserialize_model(proto), feeds, config=config, report_samples=0, check_fusion=False)
        return result.model, sorted(result.report["quantized_ops"])

    _, chosen_ops = q()
    with mock.patch.object(insert_qdq, "nbits_is_faster", lambda node: "forced" if node.op_type == "MatMul" else None):
        nbits, nbits_ops = q()
    with mock.patch.object(insert_qdq, "nbits_is_faster", lambda node: None):
        container, _ = q()
    assert "MatMulNBits" in nbits_ops
    sessions = {
        "float": runtime.session(proto.SerializeToString(), "all", threads=1),
        "nbits": runtime.session(nbits, "all", threads=1),
        "int8_container": runtime.session(container, "all", threads=1),
    }
    times = runtime.interleaved_latency(sessions, feeds, runs=runs, warmup=10)
    return {
        "k": k, "n": n, "rows": rows, "chosen": "MatMulNBits" if "MatMulNBits" in chosen_ops else "int8 container",
        "float_ms": times["float"]["median_ms"],
        "nbits_ms": times["nbits"]["median_ms"],
        "int8_container_ms": times["int8_container"]["median_ms"],
    }


def run(shapes=SHAPES, runs: int = 200, log=print) -> list[dict]:
    rows = []
    for k, n, r in shapes:
        rows.append(measure(k, n, r, runs))
        log(format_row(rows[-1]))
    return rows


def format_row(row: dict) -> str:
    faster = "MatMulNBits" if row["nbits_ms"] < row["int8_container_ms"] else "int8 container"
    return (f"| {row['rows']} x {row['k']} @ {row['k']} x {row['n']} | {row['float_ms']:.3f} | "
            f"{row['int8_container_ms']:.3f} | {row['nbits_ms']:.3f} | {faster} | {row['chosen']} |")


def render(rows: list[dict]) -> str:
    head = ["| MatMul | float ms | int8 container ms | MatMulNBits ms | faster here | quantize chooses |",
            "|---|---:|---:|---:|---|---|"]
    return "\n".join(head + [format_row(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    rows = run(QUICK_SHAPES if args.quick else SHAPES, args.runs, log=lambda s: None)
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
