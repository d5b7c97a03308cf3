"""The quantize pipeline: fold, calibrate, insert Q/DQ, clean up, check, report.

``quantize(model, data=...)`` returns a QDQ model that onnxruntime's CPU execution
provider turns into integer kernels, and a report: what was quantized, what stayed
float and why, the opset changes made, the time of each step, onnxruntime's fused-op
counts and the accuracy of the QDQ model against the float model on the calibration data
(per output SQNR and max error, and the worst layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.passes import build_pipeline
from zenith_onnx.passes._graph import attr_int
from zenith_onnx.passes.insert_qdq import FROZEN_QPARAMS, InsertQDQPass, plan_quantization
from zenith_onnx.passes.strip_qdq import StripQDQPass
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.ranges import FORMAT as RANGES_FORMAT

__all__ = ["QuantizeResult", "quantize", "quantize_file"]

logger = logging.getLogger(__name__)

REPORT_SAMPLES = 16
SPLIT_SAMPLES = 32


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    float_model: ir.Model
    report: dict

    def format(self) -> str:
        return format_report(self.report)


def _load_ranges(ranges) -> dict[str, tuple[float, float]]:
    """``{name: (min, max)}`` from a ranges file, a `Ranges`, or a Python mapping of
    ``(min, max)`` / ``{"min", "max"}``; everything goes through the file format's checks
    (finite, within float32, min <= max)."""
    from zenith_onnx.ranges import Ranges

    if ranges is None:
        return {}
    if isinstance(ranges, (str, os.PathLike)):
        ranges = Ranges.load(ranges)
    elif not isinstance(ranges, Ranges):
        if not isinstance(ranges, Mapping):
            raise DataError(f"ranges: expected a file, a Ranges or a mapping, got {type(ranges).__name__}")
        entries = {}
        for name, r in ranges.items():
            pair = r if isinstance(r, Mapping) else dict(zip(("min", "max"), r)) if isinstance(r, (tuple, list)) else r
            entries[name] = pair
        ranges = Ranges.from_dict({"format": RANGES_FORMAT, "method": "given", "tensors": entries}, "ranges")
    return {name: (r.min, r.max) for name, r in ranges.tensors.items()}


@contextlib.contextmanager
def _fewer_collections():
    """Python's cyclic collector walks every graph object (nodes and values refer to each
    other) at each full collection: on a 3,000-node chain `zenith-onnx quantize` took 3.66 s
    with it and 2.94 s without. While a pipeline runs, young collections come every 100,000
    allocations instead of 700 (and the older ones as much less often); the thresholds in
    place before come back after."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], 100_000), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@_fewer_collections()
def quantize(
    model: ir.Model,
    data=None,
    *,
    ranges=None,
    config: QuantConfig | None = None,
    report_samples: int = REPORT_SAMPLES,
    check_fusion: bool = True,
    rewrite: bool = True,
    split_channels: bool = True,
) -> QuantizeResult:
    """Quantize a float (or partly quantized) model. ``model`` is not modified.

    data: calibration data (.npz path, iterable of feed dicts, or a CalibrationDataReader);
    ranges: a ranges JSON path / `Ranges` / ``{name: (min, max)}`` instead of data.
    rewrite: run `QUANTIZE_PREPARE` (activations rewritten into ops onnxruntime runs on
    integers); False folds BatchNorm only (for comparisons).
    split_channels: with data, split Conv -> activation -> depthwise Conv chains whose
    depthwise input one 8-bit scale serves badly into channel groups of similar range
    (`zenith_onnx.passes.split_channels`).
    """
    config = config or QuantConfig()
    timings: dict[str, float] = {}
    notes: list[str] = []
    t = time.perf_counter()
    model = model.clone()

    needed_opset, why = (21, "16-bit activations need QuantizeLinear-21") if config.activation_bits == 16 else (
        13, "per-channel DequantizeLinear (axis) needs opset 13") if config.per_channel else (10, "QuantizeLinear needs opset 10")
    from zenith_onnx.opset import ensure_opset

    model, note = ensure_opset(model, needed_opset, why)
    if note:
        notes.append(note)

    strip = StripQDQPass()
    strip(model)
    if strip.report.get("frozen_activations") or strip.report.get("frozen_weights"):
        notes.append(
            f"kept the existing quantization of {strip.report['frozen_activations']} activation(s) and "
            f"{strip.report['frozen_weights']} weight(s) (model already carried Q/DQ)"
        )
    equalized, split = [], []
    if split_channels and rewrite and data is not None:
        if reads_once(data):
            notes.append("channel splitting skipped: the calibration data can be read only once (give a list or an .npz)")
        else:
            equalized, split = _split_channels(model, data)
    if equalized:
        notes.append(f"equalized the channel ranges of {len(equalized)} Conv -> Relu -> depthwise Conv chain(s)")
    if split:
        notes.append(f"split {len(split)} Conv -> activation -> depthwise Conv chain(s) into channel groups of "
                     f"similar range ({sum(len(s['groups']) for s in split)} groups): one activation scale each")
    model, prepare_notes = prepare_for_quantization(model) if rewrite else _fold_only(model)
    notes.extend(prepare_notes)
    timings["fold"] = time.perf_counter() - t
    float_model = model.clone()
    _drop_meta(float_model)

    t = time.perf_counter()
    plan = plan_quantization(model, config)
    observe = plan.observe_names()
    known = _load_ranges(ranges)
    if data is not None and observe:
        from zenith_onnx.calibration import calibrate

        calibrated = calibrate(
            model, data, tensors=observe, method=config.method, percentile=config.percentile,
            activation_bits=config.activation_bits,
        )
        known.update(_load_ranges(calibrated))
    elif data is None and ranges is None and observe:
        frozen = sum(1 for v in plan.groups.parent if FROZEN_QPARAMS in v.meta)
        if not frozen:
            raise UsageError("no calibration data: give --data CALIB.npz or --ranges RANGES.json")
        notes.append(f"no calibration data: {len(observe)} tensor(s) without a frozen range stay float")
    missing = [n for n in observe if n not in known]
    if missing and (data is not None or ranges is not None):
        notes.append(f"{len(missing)} tensor(s) have no range and stay float: {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    insert = InsertQDQPass(known, config, plan)
    insert(model)
    build_pipeline(["cleanup"])(model)
    timings["insert_qdq"] = time.perf_counter() - t

    report = {
        "config": dataclasses.asdict(config),
        "notes": notes,
        **insert.report,
        "timings_s": timings,
    }
    if check_fusion:
        t = time.perf_counter()
        report["fusion"] = _fusion(model)
        timings["fusion_check"] = time.perf_counter() - t
    if data is not None and report_samples:
        t = time.perf_counter()
        report["accuracy"] = accuracy_report(float_model, model, data, insert.tensor_map, report_samples)
        timings["accuracy_report"] = time.perf_counter() - t
    return QuantizeResult(model, float_model, report)


def reads_once(data) -> bool:
    """True for calibration data that cannot be read twice (a reader, a generator)."""
    if hasattr(data, "get_next"):
        return True
    try:
        return iter(data) is data
    except TypeError:
        return False


def _split_channels(model: ir.Model, data) -> tuple[list[dict], list[dict]]:
    """Fold BatchNorm, then equalize the Conv -> Relu -> depthwise Conv chains
    (`zenith_onnx.passes.equalize_channels`) and split the others whose depthwise input
    one 8-bit scale serves badly (`zenith_onnx.passes.split_channels`)."""
    from zenith_onnx.passes.equalize_channels import EqualizeChannelsPass, homogeneous
    from zenith_onnx.passes.split_channels import SplitChannelsPass, channel_stats, find_chains

    if not any(n.op_type == "Conv" and attr_int(n, "group", 1) > 1 for n in model.graph):
        return [], []  # no depthwise Conv: no chain (and no second fold, whose shape inference is not free)
    _fold_only(model)
    chains = find_chains(model)
    if not chains:
        return [], []
    stats = channel_stats(model, [c.observe for c in chains], _feeds(data, model, SPLIT_SAMPLES))
    equalize = EqualizeChannelsPass(stats)
    equalize(model)
    # A Relu chain is equalized (exact, free); the others (hard-swish) may be split.
    split = SplitChannelsPass({c.observe: stats[c.observe] for c in chains if not homogeneous(c)})
    split(model)
    return equalize.report, split.report


def prepare_for_quantization(model: ir.Model) -> tuple[ir.Model, list[str]]:
    """Run `QUANTIZE_PREPARE` (folds, LayerNorm and hard-swish fusion, activations written
    with ops that onnxruntime runs on integers). Written-out LayerNorms fuse only at opset
    17: the opset is raised (and the passes run again) only when the model has some."""
    from zenith_onnx.opset import ensure_opset
    from zenith_onnx.passes import QUANTIZE_PREPARE
    from zenith_onnx.passes.fuse_layernorm import LAYERNORM_OPSET

    pipeline = build_pipeline(QUANTIZE_PREPARE)
    pipeline(model)
    layernorm = next(p for p in pipeline.passes if getattr(p, "pass_name", "") == "fuse_layernorm")
    if not layernorm.needs_opset:
        return model, []
    model, note = ensure_opset(model, LAYERNORM_OPSET, f"{layernorm.needs_opset} written-out LayerNorm(s) to fuse")
    build_pipeline(QUANTIZE_PREPARE)(model)
    return model, [note]


def _fold_only(model: ir.Model) -> tuple[ir.Model, list[str]]:
    build_pipeline(["lift_constants", "fuse_bias_add", "fold_batchnorm", "cleanup", "infer_shapes"])(model)
    return model, []


def _drop_meta(model: ir.Model) -> None:
    for v in model.graph.initializers.values():
        v.meta.pop(FROZEN_QPARAMS, None)


def _fusion(model: ir.Model) -> dict:
    try:
        from zenith_onnx.fusion import fusion_report
    except ImportError:  # pragma: no cover - fusion.py ships with the package
        return {}
    return fusion_report(model).to_dict()


def _feeds(data, model: ir.Model, limit: int) -> list[dict[str, np.ndarray]]:
    from zenith_onnx.calibration_data import as_feeds

    feeds = []
    for feed in as_feeds(data, model):
        feeds.append(feed)
        if len(feeds) >= limit:
            break
    return feeds


def accuracy_report(
    float_model: ir.Model,
    qdq_model: ir.Model,
    data,
    tensor_map: Mapping[str, str],
    samples: int = REPORT_SAMPLES,
    worst: int = 5,
) -> dict:
    """SQNR and max error per output, and the per-layer SQNR of the worst layers.

    Layers compare the float model's tensor with the dequantized tensor of the QDQ model
    (``tensor_map``: float name -> DQ output name), so a layer's figure includes the error
    accumulated before it.
    """
    from zenith_onnx import runtime
    from zenith_onnx.testing import sqnr_db

    feeds = _feeds(data, float_model, samples)
    outputs = [o.name for o in float_model.graph.outputs]
    f_produced, q_produced = _produced(float_model), _produced(qdq_model)
    layer_pairs = [(f, q) for f, q in tensor_map.items() if f in f_produced and q in q_produced]
    f_model = _with_outputs(float_model, [f for f, _ in layer_pairs])
    q_model = _with_outputs(qdq_model, [q for _, q in layer_pairs])
    f_sess = runtime.session(f_model, "disable_all")
    q_sess = runtime.session(q_model, "disable_all")
    ref: dict[str, list] = {}
    got: dict[str, list] = {}
    for k, feed in enumerate(feeds):
        a = _run_sample(f_sess, feed, k, "float")
        b = _run_sample(q_sess, feed, k, "quantized")
        for name in outputs:
            ref.setdefault(name, []).append(a[name])
            got.setdefault(name, []).append(b[name])
        for f, q in layer_pairs:
            ref.setdefault(f"layer:{f}", []).append(a[f])
            got.setdefault(f"layer:{f}", []).append(b[q])
    per_output = {}
    for name in outputs:
        r = np.concatenate([x.ravel() for x in ref[name]]).astype(np.float64)
        g = np.concatenate([x.ravel() for x in got[name]]).astype(np.float64)
        per_output[name] = {"sqnr_db": _finite(sqnr_db(r, g)), "max_abs_error": float(np.max(np.abs(r - g))) if r.size else 0.0}
    layers = []
    for f, _ in layer_pairs:
        key = f"layer:{f}"
        layers.append({"tensor": f, "sqnr_db": _finite(sqnr_db(ref[key], got[key]))})
    layers.sort(key=lambda x: x["sqnr_db"])
    total_ref = [x for name in outputs for x in ref[name]]
    total_got = [x for name in outputs for x in got[name]]
    return {
        "samples": len(feeds),
        "sqnr_db": _finite(sqnr_db(total_ref, total_got)),
        "outputs": per_output,
        "worst_layers": layers[:worst],
    }


def _run_sample(sess, feed: Mapping[str, np.ndarray], index: int, which: str) -> dict[str, np.ndarray]:
    """Run one report sample. onnxruntime failing on it, or the float model computing NaN or
    Inf, is the model's or the data's fault (as in calibration): a `DataError`, not a crash
    or a NaN in the report."""
    import onnxruntime as ort

    from zenith_onnx import runtime

    state = ort.capi.onnxruntime_pybind11_state
    try:
        values = runtime.run(sess, feed)
    except (state.Fail, state.InvalidArgument, state.RuntimeException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        raise DataError(f"onnxruntime failed on calibration sample {index} ({which} model): {first}") from None
    if which == "float" and not all(np.isfinite(v).all() for v in values.values() if v.dtype.kind == "f"):
        raise DataError(f"the float model produces NaN or Inf on calibration sample {index}; cannot measure its accuracy")
    return values


def _finite(x: float) -> float:
    return float(x) if np.isfinite(x) else (999.0 if x > 0 else -999.0)


def _produced(model: ir.Model) -> dict[str, ir.Value]:
    """Values produced by nodes of the main graph, by name."""
    return {out.name: out for node in model.graph for out in node.outputs}


def _with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of ``model`` that also outputs ``names`` (values of the main graph)."""
    copy = model.clone()
    values = _produced(copy)
    present = {o.name for o in copy.graph.outputs}
    for name in names:
        if name in present or name not in values:
            continue
        copy.graph.outputs.append(values[name])
        present.add(name)
    return copy


def format_report(report: dict) -> str:
    lines = []
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    ops = ", ".join(f"{op} {n}" for op, n in sorted(report.get("quantized_ops", {}).items()))
    lines.append(f"quantized: {ops or 'nothing'}; {report.get('absorbed_activations', 0)} activation(s) absorbed")
    for item in report.get("left_float", []):
        lines.append(f"float: {item['op']} {item['node']}: {item['reason']}")
    fusion = report.get("fusion") or {}
    if fusion:
        integer = ", ".join(f"{op} {n}" for op, n in sorted(fusion.get("integer_ops", {}).items()))
        lines.append(f"onnxruntime fused: {integer or 'nothing'}")
        leftovers = fusion.get("float_ops_fed_by_dq", {})
        if leftovers:
            lines.append("float ops still fed by DequantizeLinear: " + ", ".join(f"{op} {len(v) if isinstance(v, list) else v}" for op, v in sorted(leftovers.items())))
    acc = report.get("accuracy")
    if acc:
        lines.append(f"accuracy on {acc['samples']} calibration sample(s): SQNR {acc['sqnr_db']:.1f} dB")
        for name, o in acc["outputs"].items():
            lines.append(f"  output {name}: SQNR {o['sqnr_db']:.1f} dB, max |error| {o['max_abs_error']:.4g}")
        if acc["worst_layers"]:
            lines.append("  worst layers: " + ", ".join(f"{x['tensor']} {x['sqnr_db']:.1f} dB" for x in acc["worst_layers"]))
    times = ", ".join(f"{k} {v:.2f} s" for k, v in report.get("timings_s", {}).items())
    lines.append(f"time: {times}")
    return "\n".join(lines)


def quantize_file(
    model_path,
    output_path,
    *,
    data=None,
    ranges=None,
    config: QuantConfig | None = None,
    report_path=None,
    fallback: dict | None = None,
) -> QuantizeResult:
    """CLI entry: load, quantize, save atomically, print the report.

    ``fallback`` (``{"goal_sqnr_db": ..., "max_float_nodes": ...}``) keeps the layers that
    cost the most accuracy in float (`zenith_onnx.sensitivity.quantize_with_fallback`)."""
    from zenith_onnx.modelio import atomic_output, load_model, save_model

    _check_paths(model_path, output_path, data, ranges, report_path)
    if data is None and ranges is None:
        data_hint = None
    else:
        data_hint = data
    model = load_model(model_path)
    if data_hint is not None:
        from zenith_onnx.calibration_data import load_npz

        data_hint = load_npz(data_hint, model)
    if fallback is not None:
        if data_hint is None:
            raise UsageError("--auto-fallback needs --data: it runs the model to find the costly layers")
        from zenith_onnx.sensitivity import quantize_with_fallback

        chosen = quantize_with_fallback(model, data_hint, config, **fallback)
        report = chosen.report.pop("quantize_report", {})
        kept = set(chosen.report.get("kept_float", ()))
        for item in report.get("left_float", []):
            if item["node"] in kept and item["reason"] == "excluded by the user":
                item["reason"] = "kept float by --auto-fallback (costs the most accuracy in int8)"
        result = QuantizeResult(chosen.model, chosen.float_model, {**report, "fallback": chosen.report})
        print(chosen.format())
    else:
        result = quantize(model, data_hint, ranges=ranges, config=config)
    save_model(result.model, output_path)
    if report_path:
        with atomic_output(report_path) as tmp:
            Path(tmp).write_text(json.dumps(result.report, indent=2, default=_json_default))
    print(result.format())
    print(f"{model_path} -> {output_path}")
    return result


def _check_paths(model_path, output_path, data, ranges, report_path) -> None:
    """Before any work: no output may overwrite an input or the other output, and the
    report's folder must exist (else the model would be written and the report fail)."""
    inputs = [p for p in (model_path, data, ranges) if isinstance(p, (str, os.PathLike))]
    outputs = [p for p in (output_path, report_path) if p]
    for k, out in enumerate(outputs):
        resolved = Path(out).resolve()
        for what, other in [*(("input", p) for p in inputs), *(("output", p) for p in outputs[:k])]:
            if resolved == Path(other).resolve():
                raise UsageError(f"{out}: this output would overwrite the {what} '{other}'; choose another path")
        if not resolved.parent.is_dir():
            raise UsageError(f"{out}: output folder '{Path(out).parent}' does not exist")


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
