"""The real models of models/zoo.json: zenith-onnx vs onnxruntime's quantizer, side by side.

    python -m bench.zoo [--models layout_cdla ...] [--runs 20]     (also: python -m bench --steps zoo)

For every model (fetched by `zenith_onnx.zoo`, calibration and evaluation samples from
different images) the float model is quantized on the same calibration samples by

- ``ours``: `zenith_onnx.quantize.quantize` with ``rewrite=False`` (BatchNorm folding
  only, as it was before QUANTIZE_PREPARE);
- ``ours_prepared``: `zenith_onnx.quantize.quantize` with its defaults, which split
  badly scaled Conv -> activation -> depthwise Conv chains into channel groups
  (`zenith_onnx.passes.split_channels`) and run the float-preserving rewrites of
  `zenith_onnx.passes.QUANTIZE_PREPARE` (the opset raised to 17 only when a written-out
  LayerNorm is found);
- ``ours_16bit``: the same with 16-bit activations (``QuantConfig(activation_bits=16)``,
  opset 21): what keeping everything near float costs, since onnxruntime's CPU provider
  has no 16-bit integer kernels;
- ``ours_fallback``: `zenith_onnx.sensitivity.quantize_with_fallback` (defaults, goal
  30 dB output SQNR on the calibration samples) with a per-model float-node budget
  `FALLBACK_BUDGET`, chosen once before this bench ran (det/rec/orientation from a
  colleague's measurement on the evaluation images, layout set to the detector's
  budget) and never tuned on its results: ``zenith-onnx quantize --auto-fallback
  --max-float-nodes N``;
- ``ort_default`` / ``ort_best``: onnxruntime's ``quant_pre_process`` + ``quantize_static``
  with its defaults, and with its best x86 settings (the model converted to opset 13
  first, ``per_channel=True``, QUInt8 activations: at opset 12 quantize_static writes
  per-channel DequantizeLinear that onnxruntime refuses to load); a pre-processing
  failure is retried with ``skip_symbolic_shape=True`` as a user would, and both errors
  are recorded.

Besides the float model itself, ``float_optimized`` is the float model after
``zenith-onnx optimize`` (BatchNorm folded, hard-swish fused): a faster float baseline.

Measured (DESIGN.md, "Measuring", with fewer rounds: these are big models on 2 shared
cores): latency at ORT_ENABLE_ALL, 1 intra-op thread, all variants warmed up, then timed
in alternating rounds (default 20) on the first 4 evaluation samples, median and p90;
fusion at ORT_ENABLE_EXTENDED (integer ops, float ops fed by DequantizeLinear); accuracy
on the evaluation samples against the float model at ORT_DISABLE_ALL: SQNR over all
outputs and the task's measure (`zenith_onnx.zoo.task_measure`); for the classifier,
whose samples carry their true rotation, also every model's accuracy, and the agreement
on its out-of-domain samples (``eval_other``), reported apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench._measure import first_line, interleaved_latency, machine
from bench.compare_models import _fusion

__all__ = ["DEFAULT_RUNS", "LATENCY_SAMPLES", "run", "measure_model", "render"]

HERE = Path(__file__).resolve().parent
DEFAULT_RUNS = 20
BEST_OPSET = 13
LATENCY_SAMPLES = 4
LABELS = {
    "float": "float (as published)",
    "float_optimized": "float, zenith-onnx optimize",
    "ours": "zenith-onnx quantize, rewrite=False",
    "ours_prepared": "zenith-onnx quantize (default)",
    "ours_16bit": "zenith-onnx quantize, 16-bit activations",
    "ours_fallback": "zenith-onnx quantize + fallback",
    "ort_default": "onnxruntime default",
    "ort_best": "onnxruntime best",
}
QUANTIZED = ("ours", "ours_prepared", "ours_fallback", "ours_16bit", "ort_default", "ort_best")
# Float-node budget of quantize_with_fallback, fixed before measuring (see the docstring).
FALLBACK_BUDGET = {"layout_cdla": 80, "orientation": 16, "ppocrv3_det": 80, "ppocrv3_rec": 55}


# ------------------------------------------------------------------ the variants


def optimize_float(path: Path, out: Path) -> dict:
    from zenith_onnx.modelio import load_model, save_model
    from zenith_onnx.passes import DEFAULT_OPTIMIZE, build_pipeline

    model = load_model(path)
    build_pipeline(DEFAULT_OPTIMIZE)(model)
    save_model(model, out)
    return {}


def prepare(model) -> tuple[object, list[str]]:
    """QUANTIZE_PREPARE on ``model`` as quantize runs it (kept for the float-prepared column)."""
    from zenith_onnx.quantize import prepare_for_quantization

    return prepare_for_quantization(model)


def quantize_ours(path: Path, calib: list, out: Path, prepared: bool, activation_bits: int = 8) -> dict:
    from zenith_onnx.modelio import load_model, save_model
    from zenith_onnx.qconfig import QuantConfig
    from zenith_onnx.quantize import quantize

    start = time.perf_counter()
    model = load_model(path)
    result = quantize(model, calib, config=QuantConfig(activation_bits=activation_bits), report_samples=0,
                      check_fusion=False, rewrite=prepared)
    notes = []
    save_model(result.model, out)
    left = {}
    for item in result.report.get("left_float", []):
        left.setdefault(f"{item['op']}: {item['reason']}", []).append(item["node"])
    return {"quantize_s": time.perf_counter() - start, "notes": notes + result.report.get("notes", []),
            "left_float": {k: len(v) for k, v in left.items()}}


def quantize_fallback(path: Path, calib: list, out: Path, budget: int) -> dict:
    from collections import Counter

    from zenith_onnx.modelio import load_model, save_model
    from zenith_onnx.sensitivity import quantize_with_fallback

    start = time.perf_counter()
    # latency_runs=0: the bench times every variant itself, in one interleaved loop.
    result = quantize_with_fallback(load_model(path), calib, max_float_nodes=budget, latency_runs=0)
    save_model(result.model, out)
    r = result.report
    ops = {node.name: node.op_type for node in result.float_model.graph}
    return {"quantize_s": time.perf_counter() - start, "budget": budget, "goal_sqnr_db": r["goal_sqnr_db"],
            "calib_sqnr_db_before": r["sqnr_db_before"], "calib_sqnr_db_after": r["sqnr_db_after"],
            "goal_met": r["goal_met"], "samples": r["samples"], "kept_float": r["kept_float"],
            "kept_float_ops": dict(Counter(ops.get(n, "?") for n in r["kept_float"])),
            "rounds": [{k: v for k, v in rd.items() if k != "added"} | {"units": len(rd["added"])} for rd in r["rounds"]],
            "worst_units": r["worst_units"], "sensitivity_s": r["sensitivity_s"]}


def quantize_ort(path: Path, calib: list, out: Path, best: bool) -> dict:
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_static

    from bench._measure import calibration_reader

    start = time.perf_counter()
    pre = out.with_suffix(".pre.onnx")
    info: dict = {}
    if best:
        # Per-channel DequantizeLinear needs opset 13; quantize_static does not raise it
        # (at opset 12 it writes a model onnxruntime refuses), so a user converts first.
        from zenith_onnx.modelio import load_model, save_model
        from zenith_onnx.opset import ensure_opset

        model, note = ensure_opset(load_model(path), BEST_OPSET, "per-channel weights")
        if note:
            path = out.with_suffix(".opset13.onnx")
            save_model(model, path)
            info["opset_note"] = note
    try:
        quant_pre_process(str(path), str(pre))
    except Exception as e:  # its symbolic shape inference fails on Paddle exports
        info["pre_process_error"] = first_line(e)
        quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
        info["note"] = "quant_pre_process retried with skip_symbolic_shape=True"
    kwargs = {"per_channel": True, "activation_type": QuantType.QUInt8} if best else {}
    quantize_static(str(pre), str(out), calibration_reader(calib), **kwargs)
    pre.unlink()
    out.with_suffix(".opset13.onnx").unlink(missing_ok=True)
    return {"quantize_s": time.perf_counter() - start, **info}


# ------------------------------------------------------------------ measuring


def _accuracy(zoo_model, paths: dict[str, Path], evaluation: list) -> dict:
    """SQNR and task measure per variant on the evaluation samples; with the true classes
    (classifier), each model's accuracy; on ``eval_other`` samples, the same apart."""
    from zenith_onnx import runtime, zoo
    from zenith_onnx.testing import sqnr_db

    sets = {"eval": (evaluation, zoo_model.labels("eval"))}
    if "eval_other" in zoo_model.sets:
        sets["other"] = (zoo_model.feeds("eval_other"), zoo_model.labels("eval_other"))
    reference = runtime.session(str(paths["float"]), "disable_all")
    refs = {key: [reference.run(None, f) for f in feeds] for key, (feeds, _) in sets.items()}
    result = {}
    for label, path in paths.items():
        if label == "float":
            continue
        try:
            sess = runtime.session(str(path), "all", threads=1)
        except Exception as e:  # a quantizer that writes a model onnxruntime cannot load
            result[label] = {"error": first_line(e, 400)}
            continue
        for key, (feeds, labels) in sets.items():
            got = [sess.run(None, f) for f in feeds]
            ref = refs[key]
            db = sqnr_db([o for outs in ref for o in outs], [o for outs in got for o in outs])
            entry = {"sqnr_db": float(db) if np.isfinite(db) else None,
                     "task": zoo.task_measure(zoo_model.spec, ref, got, labels)}
            if key == "eval":
                result[label] = entry
            else:
                result[label][key] = entry
    return result


def measure_model(zoo_model, folder: Path, runs: int = DEFAULT_RUNS, log=print) -> dict:
    from zenith_onnx import runtime

    folder.mkdir(parents=True, exist_ok=True)
    calib, evaluation = zoo_model.feeds("calib"), zoo_model.feeds("eval")
    row: dict = {"model": zoo_model.name, "task": zoo_model.task, "description": zoo_model.spec["description"],
                 "input_shape": zoo_model.spec["input_shape"], "calib_samples": len(calib),
                 "eval_samples": len(evaluation), "quantize": {}, "fusion": {}}
    if "eval_other" in zoo_model.sets:
        row["other_samples"] = len(zoo_model.feeds("eval_other"))
    paths = {"float": zoo_model.path}
    steps = {
        "float_optimized": lambda p: optimize_float(zoo_model.path, p),
        "ours": lambda p: quantize_ours(zoo_model.path, calib, p, prepared=False),
        "ours_prepared": lambda p: quantize_ours(zoo_model.path, calib, p, prepared=True),
        "ours_16bit": lambda p: quantize_ours(zoo_model.path, calib, p, prepared=True, activation_bits=16),
        "ours_fallback": lambda p: quantize_fallback(zoo_model.path, calib, p, FALLBACK_BUDGET[zoo_model.name]),
        "ort_default": lambda p: quantize_ort(zoo_model.path, calib, p, best=False),
        "ort_best": lambda p: quantize_ort(zoo_model.path, calib, p, best=True),
    }
    for label, fn in steps.items():
        path = folder / f"{label}.onnx"
        try:
            row["quantize"][label] = fn(path)
            paths[label] = path
        except Exception as e:  # a quantizer failing on a real model is a finding
            row["quantize"][label] = {"error": first_line(e, 400)}
            log(f"  {zoo_model.name}: {label} failed: {row['quantize'][label]['error']}")
    for label in QUANTIZED:
        if label in paths:
            row["fusion"][label] = _fusion(paths[label])  # {"error": ...} when onnxruntime cannot load it
    row["accuracy"] = _accuracy(zoo_model, paths, evaluation)
    runnable = {label: p for label, p in paths.items() if "error" not in row["accuracy"].get(label, {})}
    sessions = {label: runtime.session(str(p), "all", threads=1) for label, p in runnable.items()}
    latency = interleaved_latency(sessions, evaluation[:LATENCY_SAMPLES], runs=runs, warmup=3)
    base = latency["float"]["median_ms"]
    row["latency"] = latency
    row["ratio_to_float"] = {label: v["median_ms"] / base for label, v in latency.items()}
    log(f"  {zoo_model.name}: " + ", ".join(f"{k} {v['median_ms']:.2f} ms ({row['ratio_to_float'][k]:.2f}x)"
                                            for k, v in latency.items()))
    return row


def run(names=None, runs: int = DEFAULT_RUNS, folder: Path = HERE / "out" / "zoo", log=print,
        on_row=lambda rows: None) -> list[dict]:
    """Fetch (if needed) and measure the zoo models; one row per model. ``on_row(rows so
    far)`` is called after each model (a long run leaves what it measured)."""
    from zenith_onnx import zoo

    rows = []
    for name, m in zoo.fetch(names, log=log).items():
        rows.append(measure_model(m, folder / name, runs=runs, log=log))
        on_row(rows)
    return rows


# ------------------------------------------------------------------ rendering


def _f(x, digits=2, suffix="") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _ops(counts: dict | None) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def render(rows: list[dict], runs: int | None = None) -> str:
    """Markdown: the per-model table, fusion, accuracy, and every error."""
    runs = runs or (rows[0]["latency"]["float"]["runs"] if rows else DEFAULT_RUNS)
    head = ["| model | task measure | " + " | ".join(LABELS[k] for k in ("float_optimized", *QUANTIZED)) + " |",
            "|---|---|" + "---:|" * (1 + len(QUANTIZED))]
    latency = [*head]
    accuracy = [*head[:1], head[1]]
    for row in rows:
        ratio = row["ratio_to_float"]
        cells = []
        for label in ("float_optimized", *QUANTIZED):
            if label in ratio:
                lat = row["latency"][label]
                cells.append(f"**{ratio[label]:.2f}x** ({lat['median_ms']:.1f} ms)")
            else:
                cells.append("failed")
        measure = next((a["task"]["measure"] for a in row["accuracy"].values() if "task" in a), "")
        latency.append(f"| {row['model']} (float {row['latency']['float']['median_ms']:.1f} ms) | {measure} | " + " | ".join(cells) + " |")
        acc_cells = []
        for label in ("float_optimized", *QUANTIZED):
            a = row["accuracy"].get(label)
            acc_cells.append("failed" if not a or "error" in a else f"{_f(a['sqnr_db'], 1)} dB / {a['task']['value']:.3f}")
        accuracy.append(f"| {row['model']} | {measure} | " + " | ".join(acc_cells) + " |")
    fusion = ["| model | quantizer | integer ops | float ops fed by DequantizeLinear | float ops left |", "|---|---|---|---|---|"]
    for row in rows:
        for label in QUANTIZED:
            f = row["fusion"].get(label)
            if f is None:
                fusion.append(f"| {row['model']} | {LABELS[label]} | quantizer failed | | |")
            elif "error" in f:
                fusion.append(f"| {row['model']} | {LABELS[label]} | onnxruntime failed: {f['error']} | | |")
            else:
                fusion.append(f"| {row['model']} | {LABELS[label]} | {sum(f['integer_ops'].values())}: {_ops(f['integer_ops'])} | "
                              f"{_ops(f['float_fed_by_dq'])} | {_ops(f['float_ops'])} |")
    fallback = ["| model | float-node budget | nodes kept float | output SQNR on the calibration samples, before -> after "
                "(goal) | rounds (nodes float: SQNR, kept/undone) | time |", "|---|---:|---|---|---|---:|"]
    for row in rows:
        q = row["quantize"].get("ours_fallback")
        if not q or "error" in q:
            fallback.append(f"| {row['model']} | {FALLBACK_BUDGET.get(row['model'], '-')} | failed | | | |")
            continue
        rounds = "; ".join(f"{rd['float_nodes']}: {_f(rd['sqnr_db'], 1)} dB {'kept' if rd['accepted'] else 'undone'}"
                           for rd in q["rounds"]) or "none"
        fallback.append(f"| {row['model']} | {q['budget']} | {len(q['kept_float'])}: {_ops(q['kept_float_ops'])} | "
                        f"{q['calib_sqnr_db_before']:.1f} -> {q['calib_sqnr_db_after']:.1f} dB ({q['goal_sqnr_db']:.0f} dB, "
                        f"{'met' if q['goal_met'] else 'missed'}, {q['samples']} samples) | {rounds} | {q['quantize_s']:.0f} s |")
    truth = ["| model | samples | measure | float (as published) | " + " | ".join(LABELS[k] for k in ("float_optimized", *QUANTIZED)) + " |",
             "|---|---|---|---:|" + "---:|" * (1 + len(QUANTIZED))]
    for row in rows:
        first = next((a for a in row["accuracy"].values() if "task" in a), None)
        if first is None or "float_accuracy" not in first["task"]:
            continue
        for key, what in (("eval", "in-domain evaluation"), ("other", "out-of-domain (eval_other)")):
            entries = {label: (a if key == "eval" else a.get(key)) for label, a in row["accuracy"].items() if "task" in a}
            sample = next((e for e in entries.values() if e), None)
            if sample is None:
                continue
            n = row["eval_samples"] if key == "eval" else row.get("other_samples", "-")
            margin = sample["task"]["float_margin_ge_0.1"]
            cells = [f"{entries[k]['task']['accuracy']:.3f}" if entries.get(k) else "-" for k in ("float_optimized", *QUANTIZED)]
            truth.append(f"| {row['model']} | {what}, {n} (float margin >= 0.1 on {margin:.0%}) | accuracy (true rotation) | "
                         f"{sample['task']['float_accuracy']:.3f} | " + " | ".join(cells) + " |")
            cells = [f"{entries[k]['task']['value']:.3f}" if entries.get(k) else "-" for k in ("float_optimized", *QUANTIZED)]
            truth.append(f"| {row['model']} | {what}, {n} | top-1 agreement with float | 1.000 | " + " | ".join(cells) + " |")
    notes = []
    for row in rows:
        for label, q in row["quantize"].items():
            for key in ("error", "opset_note", "pre_process_error", "note"):
                if key in q:
                    notes.append(f"- {row['model']}, {LABELS[label]}: {key.replace('_', ' ')}: `{q[key]}`")
            for note in q.get("notes", []):
                notes.append(f"- {row['model']}, {LABELS[label]}: {note}")
            for reason, n in q.get("left_float", {}).items():
                notes.append(f"- {row['model']}, {LABELS[label]} left in float: {n} x {reason}")
        for label, a in row["accuracy"].items():
            if "error" in a:
                notes.append(f"- {row['model']}, {LABELS[label]}: onnxruntime cannot run the quantized model: `{a['error']}`")
    models = [f"- **{r['model']}** ({r['task']}, input {'x'.join(map(str, r['input_shape']))}, "
              f"{r['calib_samples']} calibration / {r['eval_samples']} evaluation samples"
              + (f" + {r['other_samples']} out-of-domain" if "other_samples" in r else "") + f"): {r['description']}"
              for r in rows]
    return "\n".join([
        "### Latency relative to the published float model",
        "",
        f"ORT_ENABLE_ALL, 1 intra-op thread, median of {runs} alternating rounds after warm-up on the first "
        f"{LATENCY_SAMPLES} evaluation samples (big models on 2 shared cores: few rounds, treat differences under ~5% "
        "as noise); lower is better.",
        "",
        *latency,
        "",
        "### Accuracy against the float model (evaluation images, not used for calibration)",
        "",
        "SQNR over all outputs (float model at ORT_DISABLE_ALL vs the quantized model at ORT_ENABLE_ALL) / the task "
        "measure: top-1 agreement (classifier), text-mask IoU at the package's threshold 0.3 (detection), per-step "
        "argmax agreement (recognition), F1 of detected boxes matched by class and IoU >= 0.5 after the package's "
        "decoding and NMS (layout).",
        "",
        *accuracy,
        "",
        *(["### Classifier: against the true rotation, and out of domain", "",
            "The orientation samples are windows of page.png (evaluation) at the four rotations, so the true class is "
            "known; the other evaluation images (photographs, drawings, patterns: not documents) are measured apart "
            "(models/zoo.json says why).", "", *truth, ""] if len(truth) > 2 else []),
        "### quantize + fallback: what was kept float",
        "",
        "`quantize_with_fallback(model, calibration samples, max_float_nodes=budget)` (goal 30 dB output SQNR; "
        "the budget per model was fixed before the run, not tuned on it).",
        "",
        *fallback,
        "",
        "### What onnxruntime runs (ORT_ENABLE_EXTENDED)",
        "",
        *fusion,
        "",
        "### Errors and notes",
        "",
        *(notes or ["none"]),
        "",
        "### Models",
        "",
        *models,
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="zoo model names (default: all)")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="alternating latency rounds (default %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "zoo", help="folder for the models and results")
    parser.add_argument("--write", type=Path, default=HERE / "zoo_results.md", help="markdown results file")
    args = parser.parse_args(argv)
    command = " ".join(["python -m bench.zoo", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    info = machine()
    text = ""

    def write(rows: list[dict]) -> None:
        nonlocal text
        text = "\n".join([
            "# Real exported models: zenith-onnx vs onnxruntime's quantizer",
            "",
            f"Command: `{command}` — {time.strftime('%Y-%m-%d')}, {(time.perf_counter() - start) / 60:.1f} min on {info['cpu']}, "
            f"{info['cores']} cores, AVX-512 VNNI {'yes' if info['avx512_vnni'] else 'no'}, onnxruntime {info['onnxruntime']}.",
            "",
            render(rows, args.runs),
        ])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        args.write.write_text(text)

    run(args.models, runs=args.runs, folder=args.out, on_row=write)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
