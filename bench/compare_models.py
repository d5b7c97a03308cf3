"""Model speed and accuracy: zenith-onnx's quantized model vs onnxruntime's, per model.

For every model the float model is quantized on the same calibration samples by

- ``ours``: `zenith_onnx.quantize.quantize` with its defaults (uint8 asymmetric
  activations, int8 symmetric per-channel weights, int32 bias, MinMax);
- ``ort_default``: onnxruntime's ``quant_pre_process`` + ``quantize_static`` with its
  defaults (QDQ, QInt8 activations and weights, per-tensor, MinMax);
- ``ort_best``: the same with the settings its docstring recommends for x86
  (``per_channel=True``, QUInt8 activations),

onnxruntime's quantizer reading the samples through a ``CalibrationDataReader``. Then
(DESIGN.md, "Measuring"):

- latency at 1 and 2 intra-op threads, ``ORT_ENABLE_ALL``: float, ort_default, ort_best,
  ours warmed up, then timed in alternating rounds in one process (median, p90);
- fusion: what onnxruntime runs at ``ORT_ENABLE_EXTENDED`` (`zenith_onnx.fusion`):
  integer ops by type and every float op still fed by a DequantizeLinear;
- accuracy on held-out samples (not the calibration samples): SQNR in dB of each quantized
  model, as onnxruntime runs it (``ORT_ENABLE_ALL``, 1 thread), against the float model at
  ``ORT_DISABLE_ALL``; top-1 accuracy and agreement where labels are given.

    python -m bench.compare_models [--quick] [--model M.onnx --data CALIB.npz]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from bench._measure import calibration_reader, first_line, interleaved_latency

__all__ = ["ModelCase", "synthetic_cases", "digits_case", "file_case", "compare", "run"]

REPO = Path(__file__).resolve().parent.parent
CALIB_SAMPLES = 32
EVAL_SAMPLES = 64
CALIB_SEED = 1
EVAL_SEED = 2


@dataclasses.dataclass
class ModelCase:
    """A float model, its calibration feeds and held-out evaluation feeds (+ labels)."""

    name: str
    path: Path
    calib: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None
    source: str = ""


def _split(stacked: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(stacked.values())))
    return [{k: v[i] for k, v in stacked.items()} for i in range(count)]


def synthetic_cases(folder: Path, names: Sequence[str] | None = None) -> list[ModelCase]:
    """The synthetic models: seed-1 standard-normal calibration samples, seed-2 held out."""
    from zenith_onnx.synthetic import SYNTHETIC_MODELS, calibration_samples

    cases = []
    for name, build in SYNTHETIC_MODELS.items():
        if names is not None and name not in names:
            continue
        proto = build()
        path = folder / f"{name}.onnx"
        onnx.save(proto, path)
        cases.append(ModelCase(
            name, path,
            _split(calibration_samples(proto, CALIB_SAMPLES, seed=CALIB_SEED)),
            _split(calibration_samples(proto, EVAL_SAMPLES, seed=EVAL_SEED)),
            source=f"zenith_onnx.synthetic.SYNTHETIC_MODELS['{name}'] (standard-normal inputs)",
        ))
    return cases


def digits_case() -> ModelCase | None:
    """models/digits_cnn.onnx, calibrated on models/digits_calib.npz (train split), evaluated
    on the 360 test images of models/digits.npz; None when the files are not there."""
    model, calib, data = (REPO / "models" / f for f in ("digits_cnn.onnx", "digits_calib.npz", "digits.npz"))
    if not (model.exists() and calib.exists()):
        return None
    calib_feeds = _npz_feeds(model, calib)
    if data.exists():
        with np.load(data, allow_pickle=False) as d:
            x, y = d["x_test"], d["y_test"]
        name = _input_names(model)[0]
        eval_feeds = [{name: x[i : i + 1]} for i in range(len(x))]
        return ModelCase("digits_cnn", model, calib_feeds, eval_feeds, labels=y,
                         source="models/digits_cnn.onnx; calibration models/digits_calib.npz; "
                                "held out: the 360 test images of models/digits.npz")
    return _held_out_split("digits_cnn", model, calib_feeds, "models/digits_cnn.onnx + models/digits_calib.npz")


def file_case(model: Path, data: Path, eval_data: Path | None = None, name: str | None = None) -> ModelCase:
    """A model from the command line. Held out: ``eval_data`` if given, otherwise the last
    quarter of ``data`` (which then is not used for calibration)."""
    feeds = _npz_feeds(model, data)
    name = name or model.stem
    if eval_data is not None:
        return ModelCase(name, model, feeds, _npz_feeds(model, eval_data),
                         source=f"{model}; calibration {data}; held out {eval_data}")
    return _held_out_split(name, model, feeds, f"{model} + {data}")


def _held_out_split(name: str, model: Path, feeds: list, source: str) -> ModelCase:
    if len(feeds) < 2:
        raise SystemExit(f"{source}: need at least 2 samples to hold some out (or give --eval-data)")
    cut = len(feeds) - max(1, len(feeds) // 4)
    return ModelCase(name, model, feeds[:cut], feeds[cut:],
                     source=f"{source} (calibration: first {cut} samples, held out: last {len(feeds) - cut})")


def _input_names(model: Path) -> list[str]:
    proto = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def _npz_feeds(model: Path, data: Path) -> list[dict[str, np.ndarray]]:
    from zenith_onnx.calibration_data import as_feeds
    from zenith_onnx.modelio import load_model

    return [dict(f) for f in as_feeds(str(data), load_model(model))]


# ------------------------------------------------------------------ quantizers


def quantize_ours(case: ModelCase, out: Path) -> dict:
    from zenith_onnx.modelio import load_model, save_model
    from zenith_onnx.quantize import quantize

    start = time.perf_counter()
    result = quantize(load_model(case.path), case.calib, report_samples=0, check_fusion=False)
    save_model(result.model, out)
    return {
        "quantize_s": time.perf_counter() - start,
        "left_float": result.report.get("left_float", []),
        "notes": result.report.get("notes", []),
    }


def quantize_ort(case: ModelCase, out: Path, best: bool) -> dict:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_static

    reader = calibration_reader(case.calib)
    start = time.perf_counter()
    pre = out.with_suffix(".pre.onnx")
    info = {}
    try:
        quant_pre_process(str(case.path), str(pre))
    except Exception as e:  # its symbolic shape inference fails on some exports (#21476, #10484)
        info["note"] = (f"quant_pre_process failed ({first_line(e)}); "
                        "retried with skip_symbolic_shape=True, as a user would")
        quant_pre_process(str(case.path), str(pre), skip_symbolic_shape=True)
    kwargs = {"per_channel": True, "activation_type": QuantType.QUInt8} if best else {}
    quantize_static(str(pre), str(out), reader, **kwargs)
    pre.unlink()
    return {"quantize_s": time.perf_counter() - start, **info}


# ------------------------------------------------------------------ measurements


def _fusion(path: Path) -> dict:
    """Integer ops and float ops fed by DequantizeLinear at ORT_ENABLE_EXTENDED."""
    try:
        from zenith_onnx.fusion import fusion_report
    except ImportError:
        return _count_fused(path)
    try:
        report = fusion_report(str(path))
    except Exception as e:  # a model onnxruntime cannot optimize is a result, not a crash
        return {"error": first_line(e)}

    def plain(op: str) -> str:
        return op.rpartition("::")[2]

    return {
        "integer_ops": {plain(op): n for op, n in report.integer_ops.items()},
        "float_ops": {plain(op): n for op, n in report.float_ops.items()},
        "float_fed_by_dq": {plain(op): len(v) for op, v in report.float_ops_fed_by_dq.items()},
        "float_fed_by_dq_nodes": {plain(op): list(v) for op, v in report.float_ops_fed_by_dq.items()},
        "quantize_linear": report.quantize_linear,
        "dequantize_linear": report.dequantize_linear,
    }


def _count_fused(path: Path) -> dict:
    """Fallback without zenith_onnx.fusion: count integer ops in onnxruntime's optimized graph."""
    from zenith_onnx import runtime

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "opt.onnx"
        runtime.session(str(path), "extended", optimized_model_filepath=str(opt))
        graph = onnx.load(str(opt), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type.startswith(("QLinear", "MatMulInteger")) or node.op_type in ("QGemm", "ConvInteger", "MatMulNBits"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"integer_ops": dict(sorted(counts.items()))}


def _accuracy(case: ModelCase, paths: dict[str, Path]) -> dict:
    from zenith_onnx import runtime
    from zenith_onnx.testing import sqnr_db

    ref_sess = runtime.session(str(paths["float"]), "disable_all")
    ref = [ref_sess.run(None, f) for f in case.eval]
    refs = [o for outs in ref for o in outs]
    result = {}
    for label, path in paths.items():
        entry = {}
        # "all": what the user runs (fused integer kernels); "disable_all": the QDQ graph as written.
        for level in ("all", "disable_all"):
            sess = runtime.session(str(path), level, threads=1)
            got = [sess.run(None, f) for f in case.eval]
            db = sqnr_db(refs, [o for outs in got for o in outs])
            entry["sqnr_db" if level == "all" else "sqnr_db_disable_all"] = float(db) if np.isfinite(db) else None
            if level == "all" and case.labels is not None:
                pred = np.array([np.argmax(outs[0]) for outs in got])
                ref_pred = np.array([np.argmax(outs[0]) for outs in ref])
                entry["top1"] = float(np.mean(pred == case.labels))
                entry["top1_agreement"] = float(np.mean(pred == ref_pred))
        result[label] = entry
    return result


def _latency(paths: dict[str, Path], feeds: list, threads: int, runs: int) -> dict:
    from zenith_onnx import runtime

    sessions = {label: runtime.session(str(path), "all", threads=threads) for label, path in paths.items()}
    return interleaved_latency(sessions, feeds[:8], runs=runs, warmup=max(10, runs // 10))


def op_profile(path: Path, feeds: list, runs: int = 200) -> dict:
    """Where the time goes: onnxruntime's profiler at ORT_ENABLE_ALL, 1 thread; kernel time
    per op type and the slowest nodes, in microseconds per run (the profiler adds a little
    per node, so compare these within a model, not with the latency tables)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="zenith-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for i in range(runs):  # the profile includes the first (cold) runs; they are few
            sess.run(None, feeds[i % len(feeds)])
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    by_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + e["dur"]
        node = by_node.setdefault(e["name"][: -len("_kernel_time")], [op, 0.0, e["args"].get("output_type_shape")])
        node[1] += e["dur"]
    total_runs = runs
    return {
        "total_us": sum(by_op.values()) / total_runs,
        "by_op_us": {op: t / total_runs for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "slowest_nodes": [
            {"node": name, "op": op, "us": t / total_runs, "output": shape}
            for name, (op, t, shape) in sorted(by_node.items(), key=lambda kv: -kv[1][1])[:8]
        ],
    }


def compare(case: ModelCase, folder: Path, runs: int = 200, threads: Sequence[int] = (1, 2), log=print) -> dict:
    """Quantize ``case`` with both tools and measure latency, fusion and accuracy."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"float": case.path}
    is_cnn = any(n.op_type == "Conv" for n in onnx.load(str(case.path), load_external_data=False).graph.node)
    row: dict = {"model": case.name, "source": case.source, "is_cnn": is_cnn, "calib_samples": len(case.calib),
                 "eval_samples": len(case.eval), "quantize": {}}
    for label, fn in (("ort_default", lambda p: quantize_ort(case, p, best=False)),
                      ("ort_best", lambda p: quantize_ort(case, p, best=True)),
                      ("ours", lambda p: quantize_ours(case, p))):
        path = folder / f"{label}.onnx"
        try:
            row["quantize"][label] = fn(path)
            paths[label] = path
        except Exception as e:  # onnxruntime's quantizer failing on a model is a finding
            row["quantize"][label] = {"error": first_line(e)}
            log(f"    {case.name}: {label} failed: {row['quantize'][label]['error']}")
    log(f"    {case.name}: quantized (" + ", ".join(
        f"{k} {v['quantize_s']:.2f} s" for k, v in row["quantize"].items() if "quantize_s" in v) + ")")
    row["fusion"] = {label: _fusion(path) for label, path in paths.items() if label != "float"}
    row["accuracy"] = _accuracy(case, paths)
    row["latency"] = {}
    for t in threads:
        lat = _latency(paths, case.eval, t, runs)
        row["latency"][str(t)] = lat
        ratio = _ratios(lat)
        log(f"    {case.name}: {t} thread(s): " + ", ".join(f"{k} {v['median_ms']:.3f} ms" for k, v in lat.items())
            + " | " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    row["ratios"] = {t: _ratios(row["latency"][t]) for t in row["latency"]}
    row["profile"] = {label: op_profile(paths[label], case.eval[:8], runs=max(50, runs // 2))
                      for label in ("float", "ours") if label in paths}
    return row


def _ratios(lat: dict) -> dict[str, float]:
    """ours/float, ours/ort_default, ours/ort_best, ort_default/float, ort_best/float (medians)."""
    med = {k: v["median_ms"] for k, v in lat.items()}
    out = {}
    for a, b in (("ours", "float"), ("ours", "ort_default"), ("ours", "ort_best"),
                 ("ort_default", "float"), ("ort_best", "float")):
        if a in med and b in med:
            out[f"{a}/{b}"] = med[a] / med[b]
    return out


def run(cases: Sequence[ModelCase], folder: Path, runs: int = 200, threads: Sequence[int] = (1, 2), log=print) -> list[dict]:
    rows = []
    for case in cases:
        log(f"  model {case.name} ({len(case.calib)} calibration / {len(case.eval)} held-out samples)")
        rows.append(compare(case, folder / case.name, runs=runs, threads=threads, log=log))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 rounds instead of 200")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--models", nargs="*", help="synthetic model names (default: all)")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--eval-data", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "models")
    args = parser.parse_args(argv)
    runs = args.runs or (50 if args.quick else 200)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model:
        cases = [file_case(args.model, args.data, args.eval_data)]
    else:
        cases = synthetic_cases(args.out, args.models)
    rows = run(cases, args.out, runs=runs)
    print(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
