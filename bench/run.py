"""The whole benchmark: ``python -m bench`` (``make bench``), writes bench/results.md.

Steps, each printed as it runs and written to results.md/results.json as soon as it is
done (a step that fails is recorded and the others still run):

1. models: the synthetic set, the digits CNN (if shipped) and ``--model/--data``, each
   quantized by zenith-onnx and by onnxruntime (defaults and its x86 "best" settings):
   latency at 1 and 2 threads, fusion at ORT_ENABLE_EXTENDED, SQNR on held-out samples
   (`bench.compare_models`);
2. tool: quantizer wall time and peak RSS on 300 / 1,200 / 3,000-node chains
   (`bench.tool_scaling`);
3. calib: calibration memory at 32 / 128 / 512 samples (`bench.calib_memory`);
4. fold: BatchNorm folding time on 1,500 / 3,000 / 6,000-node chains (`bench.fold_scale`).

    python -m bench                          # everything, about 5-10 minutes on 2 cores
    python -m bench --quick                  # under 2 minutes; writes bench/out/quick/
    python -m bench --model M.onnx --data CALIB.npz [--eval-data HELD_OUT.npz]
    python -m bench --steps models tool      # a subset
    python -m bench --readme                 # also copy the summary into README.md
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

from bench import _measure

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = ("models", "tool", "calib", "fold", "weight4")
EXTRA_STEPS = ("zoo",)  # run only when asked: `--steps zoo` (real models from published wheels, minutes)
CNNS = {"cnn8", "cnn8_res", "mobilenet_v2", "digits_cnn"}
FLOAT_TARGET = 0.7  # ours/float on CNNs
NOISE = 0.03  # ratios within 3% of 1.0 are ties on this shared machine
LABELS = {"float": "float", "ort_default": "onnxruntime default", "ort_best": "onnxruntime best", "ours": "zenith-onnx"}
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


class Bench:
    def __init__(self, args, command: str):
        self.args = args
        self.start = time.perf_counter()
        self.out: Path = args.out
        self.results: dict = {
            "command": command,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "quick": args.quick,
            "machine": _measure.machine(),
            "steps": {},
        }

    def log(self, text: str) -> None:
        print(f"[bench {time.perf_counter() - self.start:6.1f} s] {text}", flush=True)

    def step(self, name: str, fn) -> None:
        self.log(f"step {name}: start")
        t = time.perf_counter()
        try:
            data = fn()
            self.results["steps"][name] = {"seconds": time.perf_counter() - t, "data": data}
            self.log(f"step {name}: done in {time.perf_counter() - t:.1f} s")
        except Exception as e:  # record it; the other steps still run
            traceback.print_exc()
            self.results["steps"][name] = {"seconds": time.perf_counter() - t, "error": _measure.first_line(e)}
            self.log(f"step {name}: FAILED ({type(e).__name__}: {str(e)[:200]})")
        self.write()

    def write(self) -> None:
        self.results["total_s"] = time.perf_counter() - self.start
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=_json_default) + "\n")
        (self.out / "results.md").write_text(render(self.results, self.out))


def _json_default(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


# ------------------------------------------------------------------ steps


def step_models(bench: Bench) -> list[dict]:
    from bench import compare_models as cm

    folder = REPO / "bench" / "out" / "models"
    folder.mkdir(parents=True, exist_ok=True)
    args = bench.args
    cases = cm.synthetic_cases(folder, args.synthetic)
    digits = cm.digits_case()
    if digits is not None:
        cases.append(digits)
    else:
        bench.log("models/digits_cnn.onnx or models/digits_calib.npz not found: digits CNN skipped")
    if args.model:
        taken = {c.name for c in cases}
        name = args.model.stem if args.model.stem not in taken else f"{args.model.stem}-cli"
        cases.append(cm.file_case(args.model, args.data, args.eval_data, name=name))
    rows = []
    for case in cases:
        bench.log(f"model {case.name}: quantize, fusion, accuracy, latency ({args.runs} rounds x {args.threads} threads)")
        rows.append(cm.compare(case, folder / case.name, runs=args.runs, threads=args.threads, log=bench.log))
        bench.results["steps"]["models"] = {"data": rows, "partial": True}
        bench.write()  # the team sees where we stand before the long steps
    return rows


def step_tool(bench: Bench) -> list[dict]:
    from bench import tool_scaling

    blocks = (50, 200) if bench.args.quick else tool_scaling.DEFAULT_BLOCKS
    return tool_scaling.run(blocks, cap=bench.args.cap, log=bench.log)


def step_calib(bench: Bench) -> list[dict] | None:
    try:
        from bench import calib_memory
    except ImportError:
        bench.log("bench/calib_memory.py not found: calibration memory skipped (TODO in results.md)")
        return None
    if not hasattr(calib_memory, "run"):
        bench.log("bench/calib_memory.py has no run(): calibration memory skipped (TODO in results.md)")
        return None
    return calib_memory.run((32, 128, 512), quick=bench.args.quick, repeats=5)


def step_fold(bench: Bench) -> list[dict]:
    from bench import fold_scale

    sizes = [300, 600] if bench.args.quick else [1500, 3000, 6000]
    rows = fold_scale.run(sizes)
    for r in rows:
        bench.log(fold_scale.format_result(r))
    return rows


def step_weight4(bench: Bench) -> list[dict]:
    from bench import weight4

    return weight4.run(weight4.QUICK_SHAPES if bench.args.quick else weight4.SHAPES, log=bench.log)


def step_zoo(bench: Bench) -> list[dict]:
    from bench import zoo

    return zoo.run(runs=10 if bench.args.quick else zoo.DEFAULT_RUNS, log=bench.log)


STEP_FUNCTIONS = {"models": step_models, "tool": step_tool, "calib": step_calib, "fold": step_fold,
                  "weight4": step_weight4, "zoo": step_zoo}


# ------------------------------------------------------------------ rendering


def _f(x, digits=2, suffix="") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def _verdict(ratio: float | None, limit: float) -> str:
    if ratio is None:
        return "n/a"
    if ratio <= limit:
        return "met"
    if ratio <= limit * (1 + NOISE):
        return "tie (within 3% noise)"
    return "**NOT MET**"


def _data(results: dict, step: str):
    return (results["steps"].get(step) or {}).get("data")


def render_latency(rows: list[dict], threads: str) -> str:
    lines = [
        "| model | float ms | onnxruntime default ms | onnxruntime best ms | zenith-onnx ms | ours/float | ours/onnxruntime default | ours/onnxruntime best | onnxruntime default/float | onnxruntime best/float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lat = row["latency"].get(threads)
        if not lat:
            continue
        ratios = row["ratios"][threads]

        def cell(label):
            v = lat.get(label)
            return f"{v['median_ms']:.3f} ({v['p90_ms']:.3f})" if v else "failed"

        lines.append(
            f"| {row['model']} | {cell('float')} | {cell('ort_default')} | {cell('ort_best')} | {cell('ours')} | "
            + " | ".join(f"**{_f(ratios.get(k))}**" if k.startswith("ours/") else _f(ratios.get(k))
                         for k in ("ours/float", "ours/ort_default", "ours/ort_best", "ort_default/float", "ort_best/float"))
            + " |"
        )
    return "\n".join(lines)


def _ops_text(counts: dict[str, int] | None) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{op} {n}" for op, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def render_fusion(rows: list[dict]) -> str:
    lines = [
        "| model | quantizer | integer ops (onnxruntime's optimized graph) | float ops still fed by DequantizeLinear | float compute ops left |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        for label in ("ort_default", "ort_best", "ours"):
            fus = row["fusion"].get(label)
            if fus is None:
                lines.append(f"| {row['model']} | {LABELS[label]} | quantizer failed: {row['quantize'][label].get('error', '')} | | |")
                continue
            if "error" in fus:
                lines.append(f"| {row['model']} | {LABELS[label]} | onnxruntime failed: {fus['error']} | | |")
                continue
            total = sum(fus["integer_ops"].values())
            lines.append(
                f"| {row['model']} | {LABELS[label]} | {total}: {_ops_text(fus['integer_ops'])} | "
                f"{_ops_text(fus.get('float_fed_by_dq'))} | {_ops_text(fus.get('float_ops'))} |"
            )
    return "\n".join(lines)


def render_notes(rows: list[dict]) -> list[str]:
    """What each quantizer said it left in float, and the workarounds the bench applied."""
    notes = []
    for row in rows:
        for label, q in row["quantize"].items():
            for note in ([q["note"]] if "note" in q else []) + q.get("notes", []):
                notes.append(f"- {row['model']}, {LABELS[label]}: {note}")
            left = q.get("left_float") or []
            if left:
                notes.append(f"- {row['model']}, {LABELS[label]} left in float: "
                             + "; ".join(f"{x['op']} {x['node']} ({x['reason']})" for x in left[:8])
                             + (f"; ... {len(left) - 8} more" if len(left) > 8 else ""))
    return (["Notes from the quantizers:", "", *notes, ""]) if notes else []


def render_diagnosis(results: dict) -> list[str]:
    """For every model that misses a latency target or runs slower than float: what onnxruntime left in float and
    where the time goes, float vs ours, by op type (onnxruntime's profiler)."""
    missed = {t.split(":")[0] for t, _, verdict in targets(results) if "NOT MET" in verdict}
    out = []
    for row in _data(results, "models") or []:
        slower = (row["ratios"].get("1") or {}).get("ours/float", 0) > 1
        if (row["model"] not in missed and not slower) or "profile" not in row:
            continue
        fus = row["fusion"].get("ours") or {}
        prof = row["profile"]
        f, o = prof.get("float", {}), prof.get("ours", {})
        out += [f"### {row['model']}", "",
                f"onnxruntime's graph of ours: float ops fed by DequantizeLinear: {_ops_text(fus.get('float_fed_by_dq'))}; "
                f"float compute ops left: {_ops_text(fus.get('float_ops'))}.", "",
                f"Kernel time per run (profiler, 1 thread): float {f.get('total_us', 0):.1f} us, ours {o.get('total_us', 0):.1f} us.", "",
                "| float model: op | us/run | ours: op | us/run |", "|---|---:|---|---:|"]
        fo, oo = list(f.get("by_op_us", {}).items()), list(o.get("by_op_us", {}).items())
        for i in range(max(len(fo), len(oo))):
            a = fo[i] if i < len(fo) else ("", None)
            b = oo[i] if i < len(oo) else ("", None)
            out.append(f"| {a[0]} | {_f(a[1], 1)} | {b[0]} | {_f(b[1], 1)} |")
        out += ["", "Slowest nodes, float: " + "; ".join(
                    f"{n['op']} {n['node']} {n['us']:.1f} us -> {_shape(n['output'])}" for n in f.get("slowest_nodes", [])[:5]) + ".",
                "",
                "Slowest nodes, ours: " + "; ".join(
                    f"{n['op']} {n['node']} {n['us']:.1f} us -> {_shape(n['output'])}" for n in o.get("slowest_nodes", [])[:5]) + ".",
                ""]
    return (["## Where the time goes (models that miss a latency target or run slower than float)", "", *out]) if out else []


def _shape(output) -> str:
    """'uint8[1x32x32x16]' from the profiler's [{'uint8': [1, 32, 32, 16]}]."""
    try:
        (dtype, dims), = output[0].items()
        return f"{dtype}[{'x'.join(str(d) for d in dims)}]"
    except (TypeError, ValueError, IndexError, AttributeError, KeyError):
        return "?"


def render_accuracy(rows: list[dict]) -> str:
    has_top1 = any("top1" in a for row in rows for a in row["accuracy"].values())
    head = "| model | held-out samples | SQNR onnxruntime default dB | SQNR onnxruntime best dB | SQNR zenith-onnx dB |"
    sep = "|---|---:|---:|---:|---:|"
    if has_top1:
        head += " top-1 float / onnxruntime default / best / zenith-onnx | top-1 agreement with float (default / best / ours) |"
        sep += "---|---|"
    lines = [head, sep]
    for row in rows:
        acc = row["accuracy"]
        line = f"| {row['model']} | {row['eval_samples']} | " + " | ".join(
            _f(acc.get(k, {}).get("sqnr_db"), 1) for k in ("ort_default", "ort_best", "ours")) + " |"
        if has_top1:
            if "top1" in acc.get("float", {}):
                line += " " + " / ".join(_f(100 * acc[k]["top1"], 1, "%") if k in acc else "-"
                                         for k in ("float", "ort_default", "ort_best", "ours")) + " |"
                line += " " + " / ".join(_f(100 * acc[k]["top1_agreement"], 1, "%") if k in acc else "-"
                                         for k in ("ort_default", "ort_best", "ours")) + " |"
            else:
                line += " | |"
        lines.append(line)
    return "\n".join(lines)


def targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target of the issue that this run measured;
    latency targets give the 1-thread / 2-thread ratios and the worse verdict."""
    out = []
    order = ["met", "tie (within 3% noise)", "**NOT MET**", "n/a"]
    for row in _data(results, "models") or []:
        checks = [(f"ours <= {LABELS[ref]}", f"ours/{ref}", 1.0) for ref in ("ort_default", "ort_best")]
        if row["model"] in CNNS or row.get("is_cnn"):
            checks.append((f"ours <= {FLOAT_TARGET}x float (CNN)", "ours/float", FLOAT_TARGET))
        for text, key, limit in checks:
            values = [row["ratios"][t].get(key) for t in sorted(row["ratios"])]
            verdicts = [_verdict(v, limit) for v in values]
            worst = max(verdicts, key=order.index)
            out.append((f"{row['model']}: {text}", " / ".join(_f(v, 2, "x") for v in values), worst))
    tool = _data(results, "tool") or []
    ours = sorted((r for r in tool if r["tool"] == "ours" and r["nodes"]), key=lambda r: r["nodes"])
    if ours:
        big = ours[-1]
        if big["nodes"] >= 3000:
            ok = not big["timed_out"] and "error" not in big and big["wall_s"] < 10
            out.append((f"quantize {big['nodes']:,} nodes in < 10 s (whole process)", _f(big["wall_s"], 2, " s"),
                        "met" if ok else "**NOT MET**"))
        if len(ours) > 1 and all("pipeline_s" in r for r in ours):
            per = (ours[-1]["pipeline_s"] / ours[-1]["nodes"]) / (ours[0]["pipeline_s"] / ours[0]["nodes"])
            out.append((f"ours linear: pipeline time per node at {ours[-1]['nodes']:,} vs {ours[0]['nodes']:,} nodes <= 1.3x",
                        _f(per, 2, "x"), "met" if per <= 1.3 else "**NOT MET**"))
    return out


def render_tool(rows: list[dict]) -> str:
    from bench import tool_scaling

    return tool_scaling.format_table(rows)


def render_calib(rows: list[dict]) -> str:
    counts = sorted({r["samples"] for r in rows})
    keys = sorted({(r["tool"], r["method"]) for r in rows}, key=lambda k: ({"plain": 0, "zenith": 1}.get(k[0], 2), k[1]))
    find = {(r["tool"], r["method"], r["samples"]): r for r in rows}
    lines = [
        "| tool | method | " + " | ".join(f"peak RSS @{c} MB" for c in counts) + f" | RSS {counts[-1]}/{counts[0]} | "
        + " | ".join(f"time @{c} s" for c in counts) + " |",
        "|---|---|" + "---:|" * (2 * len(counts) + 1),
    ]
    for tool, method in keys:
        got = [find.get((tool, method, c)) for c in counts]
        rss = [g["peak_rss_mb"] if g else None for g in got]
        secs = [g.get("seconds") if g else None for g in got]
        ratio = rss[-1] / rss[0] if rss[0] and rss[-1] else None
        name = {"zenith": "zenith-onnx", "plain": "plain inference"}.get(tool, tool)
        lines.append(f"| {name} | {method} | " + " | ".join(_f(v, 0) for v in rss) + f" | {_f(ratio, 2, 'x')} | "
                     + " | ".join(_f(v, 2) for v in secs) + " |")
    ours = sorted({r["method"] for r in rows if r["tool"] == "zenith"})
    if ours and "ratio_all" in find.get(("zenith", ours[0], counts[-1]), {}):
        last = counts[-1]
        lines += ["", "Calibration time over plain inference of the same samples (zenith-onnx; 1.5x is the target):", "",
                  "| method | " + " | ".join(f"wall @{c} (ENABLE_ALL)" for c in counts)
                  + f" | CPU @{last} | per added sample | samples made beforehand @{last} | wall @{last} (DISABLE_ALL) |",
                  "|---|" + "---:|" * (len(counts) + 4)]
        for method in ours:
            got = [find.get(("zenith", method, c), {}) for c in counts]
            top = got[-1]
            lines.append(f"| {method} | " + " | ".join(_f(g.get("ratio_all"), 2, "x") for g in got)
                         + f" | {_f(top.get('cpu_ratio_all'), 2, 'x')} | {_f(top.get('per_sample_ratio_all'), 2, 'x')}"
                         f" | {_f(top.get('premade_ratio_all'), 2, 'x')} | {_f(top.get('ratio_disable_all'), 2, 'x')} |")
    return "\n".join(lines)


def render_fold(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| nodes | load s | fold s | save s | total s | total time per node vs smallest |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        per = (r["total_s"] / r["nodes"]) / (base["total_s"] / base["nodes"])
        lines.append(f"| {r['nodes']:,} | {r['load_s']:.2f} | {r['fold_s']:.2f} | {r['save_s']:.2f} | {r['total_s']:.2f} | {per:.2f} |")
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    """The headline table (1 thread): what README shows."""
    rows = _data(results, "models") or []
    lines = [
        "| model | ours / float | ours / onnxruntime default | ours / onnxruntime best | integer ops ours (onnxruntime default) | float ops fed by DQ, ours | SQNR dB ours (onnxruntime default / best) |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        r = row["ratios"].get("1", {})
        fus = row["fusion"]

        def n_int(label):
            f = fus.get(label) or {}
            return str(sum(f["integer_ops"].values())) if "integer_ops" in f else "-"

        acc = row["accuracy"]
        lines.append(
            f"| {row['model']} | {_f(r.get('ours/float'))} | {_f(r.get('ours/ort_default'))} | {_f(r.get('ours/ort_best'))} | "
            f"{n_int('ours')} ({n_int('ort_default')}) | {_ops_text((fus.get('ours') or {}).get('float_fed_by_dq'))} | "
            f"{_f(acc.get('ours', {}).get('sqnr_db'), 1)} ({_f(acc.get('ort_default', {}).get('sqnr_db'), 1)} / "
            f"{_f(acc.get('ort_best', {}).get('sqnr_db'), 1)}) |"
        )
    return "\n".join(lines)


def machine_text(m: dict) -> str:
    return (f"{m['cpu']}, {m['cores']} cores (shared with other work while measuring); "
            f"AVX2 {'yes' if m['avx2'] else 'no'}, AVX-512 VNNI {'yes' if m['avx512_vnni'] else 'no'}, "
            f"AVX-VNNI {'yes' if m['avx_vnni'] else 'no'}; onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, "
            f"numpy {m['numpy']}, Python {m['python']}")


def render(results: dict, out: Path) -> str:
    m = results["machine"]
    done = [s for s in STEPS + EXTRA_STEPS if s in results["steps"]]
    partial = any(v.get("partial") for v in results["steps"].values()) or len(done) < len(results.get("planned", STEPS))
    parts = [
        "# Benchmarks: zenith-onnx vs onnxruntime's quantizer",
        "",
        f"Command: `{results['command']}` — {results['date']}, total {results['total_s'] / 60:.1f} min"
        + (" **(run still in progress / partial)**" if partial else "") + (" (quick mode)" if results["quick"] else "") + ".",
        "",
        f"Machine: {machine_text(m)}.",
        "",
        "**Claims are ratios measured in one run.** Absolute times vary between machines "
        "(this one has AVX-512 VNNI; others have only AVX2) and with the load of the shared cores; "
        "latency figures come from alternating rounds (float, onnxruntime default, onnxruntime best, ours, "
        "float, ...) in one process so that load hits all four alike.",
        "",
        "Quantizers compared on the same calibration samples: **zenith-onnx** `quantize()` defaults "
        "(uint8 asymmetric activations, int8 symmetric per-channel weights, int32 bias, MinMax); "
        "**onnxruntime default**: `quant_pre_process` + `quantize_static` defaults (QDQ, QInt8 activations "
        "and weights, per-tensor, MinMax); **onnxruntime best**: the same with `per_channel=True`, "
        "`activation_type=QUInt8` (its docstring's advice for x86). onnxruntime reads the samples through a "
        "`CalibrationDataReader`.",
        "",
    ]
    models = _data(results, "models")
    if models:
        runs = models[0]["latency"].get("1", {}).get("float", {}).get("runs", "?")
        parts += ["## Summary (1 thread)", "", summary_table(results), ""]
        checks = targets(results)
        if checks:
            threads = "/".join(sorted(models[0]["ratios"]))
            parts += ["## Targets", "", f"| target | measured (latency: {threads} thread(s)) | verdict |", "|---|---:|---|"]
            parts += [f"| {a} | {b} | {c} |" for a, b, c in checks]
            parts += ["", f"Ratios within {int(NOISE * 100)}% above the limit are run-to-run noise on this shared "
                      "machine (two models with the same fused graph measure 0.97-1.03x of each other).", ""]
        for t in sorted(models[0]["latency"]):
            busy = int(t) >= (m.get("cores") or 1)
            parts += [f"## Latency, {t} intra-op thread(s)", "",
                      f"ORT_ENABLE_ALL, median (p90) of {runs} alternating rounds after warm-up, batch 1; ratios of medians."
                      + (f" With {t} threads on {m['cores']} shared cores, another job on either core stalls every "
                         "parallel op, so these ratios move between runs far more than the 1-thread ones; "
                         "the 1-thread ratios are the claims." if busy and int(t) > 1 else ""), "",
                      render_latency(models, t), ""]
        parts += ["## Fusion: what onnxruntime runs", "",
                  "Each quantized model loaded at ORT_ENABLE_EXTENDED with `optimized_model_filepath` "
                  "(`zenith_onnx.fusion.fusion_report`); integer ops are QLinear*, QGemm, MatMulInteger*, "
                  "ConvInteger, MatMulNBits. A float op fed by a DequantizeLinear runs in float between Q and DQ.", "",
                  render_fusion(models), "",
                  *render_notes(models),
                  "## Accuracy on held-out samples", "",
                  "SQNR = 10 log10(sum ref^2 / sum (ref - q)^2) over all outputs; ref: the float model at ORT_DISABLE_ALL; "
                  "q: the quantized model as onnxruntime runs it (ORT_ENABLE_ALL, 1 thread). Held-out samples are not the "
                  "calibration samples (synthetic models: seed 2 vs seed 1; digits: the test split vs the train split).", "",
                  render_accuracy(models), ""]
        parts += render_diagnosis(results)
        parts += ["Models: " + "; ".join(f"**{r['model']}**: {r['source']}, {r['calib_samples']} calibration samples"
                                          for r in models) + ".", ""]
    elif "models" in results["steps"]:
        parts += ["## Models", "", f"FAILED: {results['steps']['models'].get('error')}", ""]

    tool = results["steps"].get("tool")
    if tool:
        parts += ["## Quantizer time and memory vs graph size", "",
                  "Conv-BN-Relu chains (`zenith_onnx.synthetic.conv_chain`, 8 channels, 8x8), 8 calibration samples, "
                  "from .onnx + .npz files to a saved QDQ model, each run in a fresh process (zenith-onnx 3 times per size, the "
                  "fastest kept): wall time of the whole "
                  "process (imports included) and its peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss` in a wrapper "
                  "process). zenith-onnx: `python -m zenith_onnx quantize IN -o OUT --data CALIB.npz --report R.json` "
                  "(also runs the fusion check and the accuracy report); its pipeline time is the sum of the report's "
                  "step times (load and save excluded). onnxruntime: `quant_pre_process` + `quantize_static` (defaults), "
                  f"killed after {results.get('cap_s', 120):.0f} s.", ""]
        parts += [render_tool(tool["data"]) if "data" in tool else f"FAILED: {tool.get('error')}", ""]
    calib = results["steps"].get("calib")
    if calib:
        parts += ["## Calibration memory and time", ""]
        if calib.get("data"):
            parts += ["`bench/calib_memory.py`: a small CNN (~2 MB of activations per sample) calibrated on generated "
                      "samples, each run in a fresh process; peak RSS of that process. 'plain inference' runs the "
                      "float model over the same samples, 1 intra-op thread, at ORT_ENABLE_ALL (the baseline) and "
                      "ORT_DISABLE_ALL, its time including session creation. zenith-onnx runs onnxruntime at "
                      "ORT_ENABLE_ALL with 1 intra-op thread plus one thread that bins the activations while the "
                      "next sample runs; onnxruntime's calibrators use its default session options. Every "
                      "(tool, method, count) runs once per round, in rounds spread over the whole step, and the "
                      "shortest time is kept. Making the samples is counted on both sides except in the 'samples "
                      "made beforehand' column; 'per added sample' is the time the samples between the two largest "
                      "counts add (one-off costs such as the entropy search cancel out). CPU time counts both "
                      "threads: the histogram methods count about 0.55 ns per value (zenith_onnx/_native.c; "
                      "numpy's fallback 1.1 ns), so they stay under 1.5x in wall time while the second core is "
                      "free and take about 1.9x when the cores are busy. On real networks calibration costs "
                      "2.6-3.3x plain inference with minmax and 3.7-4.3x with the histogram methods "
                      "(`python -m bench.calib_zoo`, bench/calib_zoo_results.md; README, Real models, says why).",
                  "", render_calib(calib["data"]), ""]
        elif "error" in calib:
            parts += [f"FAILED: {calib['error']}", ""]
        else:
            parts += ["**TODO**: `bench/calib_memory.py` (another engineer's) was not present or had no `run()` "
                      "when this ran; re-run `python -m bench --steps calib` once it lands.", ""]
    fold = results["steps"].get("fold")
    if fold:
        parts += ["## BatchNorm folding vs graph size", "",
                  "`bench/fold_scale.py`: load + optimize (lift_constants, fold_batchnorm, cleanup) + save on "
                  "Conv-BN-Relu chains, in this process.", ""]
        parts += [render_fold(fold["data"]) if "data" in fold else f"FAILED: {fold.get('error')}", ""]
    weight4 = results["steps"].get("weight4")
    if weight4:
        from bench import weight4 as weight4_bench

        parts += ["## 4-bit MatMul weights: MatMulNBits or int8 container", "",
                  "`bench/weight4.py`: one MatMul quantized with `--weight-bits 4` in both forms (MatMulNBits with "
                  "int4 blocks of 32 and int8 compute; 4-bit values in an int8 container), 1 thread, interleaved "
                  "rounds, median. quantize uses MatMulNBits only for one-row inputs.", ""]
        parts += [weight4_bench.render(weight4["data"]) if "data" in weight4 else f"FAILED: {weight4.get('error')}", ""]
    zoo = results["steps"].get("zoo")
    if zoo:
        from bench import zoo as zoo_bench

        parts += ["## Real exported models (models/zoo.json)", ""]
        parts += [zoo_bench.render(zoo["data"]) if "data" in zoo else f"FAILED: {zoo.get('error')}", ""]
    plots = results.get("plots", [])
    if plots:
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    parts += ["## Steps", "", "| step | seconds |", "|---|---:|"]
    parts += [f"| {s} | {results['steps'][s].get('seconds', 0):.1f} |" for s in done]
    parts += [f"| total | {results['total_s']:.1f} |", "",
              "Raw figures: `results.json` beside this file. Re-check one latency figure: "
              "`python -m bench.latency A.onnx B.onnx` (quantized models are kept in bench/out/models/).", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------ plots


def plot(results: dict, out: Path) -> list[str]:
    """Write the plots this run has data for; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    models = _data(results, "models")
    if models:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, t in zip(axes, ("1", "2")):
            names = [r["model"] for r in models if t in r["latency"]]
            width = 0.27
            for i, label in enumerate(("ort_default", "ort_best", "ours")):
                vals = [r["latency"][t][label]["median_ms"] / r["latency"][t]["float"]["median_ms"]
                        if label in r["latency"][t] else 0 for r in models if t in r["latency"]]
                ax.bar([x + (i - 1) * width for x in range(len(names))], vals, width, label=LABELS[label])
            ax.axhline(1.0, color="k", lw=0.8)
            ax.axhline(FLOAT_TARGET, color="r", ls="--", lw=0.8, label=f"target {FLOAT_TARGET}x float (CNNs)")
            ax.set_xticks(range(len(names)), names, rotation=20)
            ax.set_title(f"latency / float latency, {t} thread(s) (lower is better)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        written.append("latency.png")
        plt.close(fig)
    tool = _data(results, "tool")
    if tool:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for name, label in (("ours", "zenith-onnx"), ("onnxruntime", "onnxruntime")):
            rows = sorted((r for r in tool if r["tool"] == name and r["nodes"]), key=lambda r: r["nodes"])
            xs = [r["nodes"] for r in rows]
            a.plot(xs, [r["wall_s"] for r in rows], "o-", label=label)
            for r in rows:
                if r["timed_out"]:
                    a.annotate(f"killed at {r['cap_s']:.0f} s", (r["nodes"], r["wall_s"]), fontsize=8)
            ok = [r for r in rows if not r["timed_out"] and "error" not in r]
            b.plot([r["nodes"] for r in ok], [r["peak_rss_mb"] for r in ok], "o-", label=label)
        a.set(xlabel="nodes", ylabel="wall time, s (whole process)", title="quantize time", xscale="log", yscale="log")
        b.set(xlabel="nodes", ylabel="peak RSS, MB", title="quantize peak memory", xscale="log")
        a.legend()
        b.legend()
        fig.tight_layout()
        fig.savefig(out / "tool_scaling.png", dpi=110)
        written.append("tool_scaling.png")
        plt.close(fig)
    calib = _data(results, "calib")
    if calib:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key in sorted({(r["tool"], r["method"]) for r in calib}):
            rows = sorted((r for r in calib if (r["tool"], r["method"]) == key), key=lambda r: r["samples"])
            ax.plot([r["samples"] for r in rows], [r["peak_rss_mb"] for r in rows], marker="o",
                    ls="-" if key[0] == "zenith" else ":" if key[0] == "plain" else "--", label=f"{key[0]} {key[1]}")
        ax.set(xlabel="calibration samples", ylabel="peak RSS, MB", xscale="log", yscale="log", title="calibration memory")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "calib_memory.png", dpi=110)
        plt.close(fig)
        written.append("calib_memory.png")
    return written


# ------------------------------------------------------------------ README


def _missed_text(results: dict) -> list[str]:
    missed = [(t, v) for t, v, verdict in targets(results) if verdict != "met"]
    if not missed:
        return ["Every target of the benchmark is met in this run.", ""]
    return ["Targets not met in this run: " + "; ".join(f"{t} ({v})" for t, v in missed)
            + " (details and profiles in bench/results.md).", ""]


def update_readme(results: dict, readme: Path = REPO / "README.md") -> bool:
    """Replace the text between the bench markers (appending the section if missing)."""
    section = "\n".join([
        README_START,
        "## Benchmarks",
        "",
        "`make bench` runs `python -m bench` (add `MODEL=model.onnx DATA=calib.npz` for your own model; "
        "`BENCH_ARGS=--quick` for a 1-minute check). "
        f"The figures below were measured with `{results['command']}` ({results['date'][:10]}, "
        f"{results['total_s'] / 60:.1f} min) on "
        f"{machine_text(results['machine'])}. Ratios from one run (alternating rounds, 1 thread, "
        "ORT_ENABLE_ALL); onnxruntime default = `quant_pre_process` + `quantize_static` defaults, "
        "best = `per_channel=True`, QUInt8 activations; SQNR on held-out samples. Full tables, "
        "2-thread figures, calibration memory and plots: [bench/results.md](bench/results.md).",
        "",
        summary_table(results),
        "",
        *_missed_text(results),
        *(["Quantizer time and peak memory on Conv-BN-Relu chains (fresh process each; zenith-onnx the fastest "
           "of 3):", "",
           render_tool(_data(results, "tool")), ""] if _data(results, "tool") else []),
        *(["Calibration peak memory and time by number of samples, zenith-onnx's streaming observers next to "
           "onnxruntime's calibrators (`bench/calib_memory.py`, fresh process each; 'plain inference' runs the "
           "float model over the same samples):", "", render_calib(_data(results, "calib")), ""]
          if _data(results, "calib") else []),
        README_END,
    ])
    text = readme.read_text()
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        new = head + section + tail
    else:
        new = text.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller chains, fewer sample counts (< 2 min)")
    parser.add_argument("--model", type=Path, help="also benchmark this float .onnx model")
    parser.add_argument("--data", type=Path, help="calibration .npz for --model")
    parser.add_argument("--eval-data", type=Path, help="held-out .npz for --model (default: the last quarter of --data)")
    parser.add_argument("--steps", nargs="+", choices=STEPS + EXTRA_STEPS, default=list(STEPS))
    parser.add_argument("--synthetic", nargs="*", default=None, help="synthetic models to run (default: all)")
    parser.add_argument("--runs", type=int, help="latency rounds (default 300; --quick 50)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cap", type=float, default=120.0, help="seconds before onnxruntime's quantizer is killed (tool step)")
    parser.add_argument("--out", type=Path, help="folder for results.md/json and plots (default bench/, --quick: bench/out/quick/)")
    parser.add_argument("--readme", action="store_true", help="copy the summary into README.md's bench section")
    args = parser.parse_args(argv)
    if args.model and not args.data:
        parser.error("--model needs --data CALIB.npz")
    if args.runs is None:
        args.runs = 50 if args.quick else 300
    if args.runs < 50:
        print("warning: fewer than 50 rounds; DESIGN.md asks for >= 50 for a reported figure", file=sys.stderr)
    if args.quick and args.cap == 120.0:
        args.cap = 30.0
    if args.out is None:
        args.out = HERE / "out" / "quick" if args.quick else HERE
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    bench = Bench(args, command.strip())
    bench.results["planned"] = list(args.steps)
    bench.results["cap_s"] = args.cap
    bench.log(f"machine: {machine_text(bench.results['machine'])}")
    bench.log(f"writing {args.out / 'results.md'}; steps {', '.join(args.steps)}")
    for name in args.steps:
        bench.step(name, functools.partial(STEP_FUNCTIONS[name], bench))
    try:
        bench.results["plots"] = plot(bench.results, args.out)
    except Exception:
        traceback.print_exc()
    bench.write()
    if args.readme:
        update_readme(bench.results)
        bench.log("README.md bench section updated")
    bench.log(f"done in {(time.perf_counter() - bench.start) / 60:.1f} min: {args.out / 'results.md'}")
    return 0
