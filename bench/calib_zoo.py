"""Calibration time on the real models of models/zoo.json, next to plain inference.

    python -m bench.calib_zoo [--models ppocrv3_det ...] [--repeats 3]

`bench/calib_memory.py` measures the issue's small CNN; this measures what a user of a
real network waits for. For every fetched zoo model (`make models`), over its calibration
samples (batch of one, 1 intra-op thread), the shortest of ``repeats`` runs of:

- ``plain``: onnxruntime inference of the float model at ``ORT_ENABLE_ALL`` (session
  creation included), the baseline of the ratios; also at ``ORT_DISABLE_ALL``, the level
  onnxruntime's own calibrators run at;
- ``exposed``: the same inference with every tensor calibration observes made a graph
  output and fetched, nothing else: what onnxruntime alone costs once the activations
  must leave it (each is reordered out of the blocked NCHWc layout, and the convolution
  it sits after can no longer absorb its activation function);
- ``calibrate(method)``: `zenith_onnx.calibration.calibrate` with its default tensors,
  wall time and CPU time of the process (onnxruntime and the binning thread);
- onnxruntime's MinMax calibrator (``create_calibrator``), for reference. Its Entropy
  and Percentile calibrators keep every activation of every sample (gigabytes here) and
  are left to `bench/calib_memory.py`.

Results: printed, and written to ``bench/calib_zoo_results.md`` (README quotes them).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench._measure import first_line, machine

HERE = Path(__file__).resolve().parent
METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")
DEFAULT_MODELS = ("orientation", "ppocrv3_det", "ppocrv3_rec", "layout_cdla")


def _best(repeats: int, run) -> tuple[float, float]:
    """Shortest wall time and smallest CPU time of ``repeats`` calls of ``run``."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def _plain(model, feeds, level: str, outputs=None):
    from zenith_onnx import runtime

    def run():
        session = runtime.session(model, level, threads=1)
        for feed in feeds:
            session.run(outputs, feed)

    return run


def _exposed(model_path: Path):
    """The model with every tensor `calibrate` fetches made a graph output, and their names."""
    import onnx_ir as ir

    from zenith_onnx.calibration import _expose
    from zenith_onnx.observers import MinMaxObserver

    observed, plan, observation = _expose(ir.load(model_path), None, MinMaxObserver)
    return observed, [n for n in plan.outputs if n in observation.observers]


def _ort_minmax(model_path: Path, feeds):
    from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(
                str(model_path), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.MinMax,
            )
            calibrator.collect_data(Reader())
            calibrator.compute_data()

    return run


def measure_model(name: str, repeats: int) -> dict:
    import onnx_ir as ir

    from zenith_onnx import zoo
    from zenith_onnx.calibration import calibrate

    entry = zoo.load(name)
    feeds = entry.feeds("calib")
    model = ir.load(entry.path)
    row: dict = {"model": name, "samples": len(feeds), "nodes": len(model.graph)}
    row["plain"] = _best(repeats, _plain(entry.path, feeds, "all"))
    row["plain_disable_all"] = _best(repeats, _plain(entry.path, feeds, "disable_all"))
    exposed, names = _exposed(entry.path)
    row["fetched"] = len(names)
    row["exposed"] = _best(repeats, _plain(exposed, feeds, "all", names))
    for method in METHODS:
        row[method] = _best(repeats, lambda: calibrate(model, feeds, method=method, progress=False))
        print(f"  {name} {method}: {row[method][0]:.2f} s", flush=True)
    try:
        row["ort_minmax"] = _best(1, _ort_minmax(entry.path, feeds))
    except Exception as e:  # recorded, the rest stands
        row["ort_minmax_error"] = first_line(e)
    return row


def render(rows: list[dict], seconds: float) -> str:
    info = machine()
    lines = [
        "# Calibration time on the zoo models",
        "",
        f"`python -m bench.calib_zoo` ({time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min) on {info['cpu']}, "
        f"{info['cores']} cores; onnxruntime {info['onnxruntime']}, numpy {info['numpy']}.",
        "Calibration samples of each model, batch of one, 1 intra-op thread, shortest of the repeats. "
        "Ratios over plain inference of the float model at ORT_ENABLE_ALL (session creation included on "
        "both sides); `exposed`: that inference with every tensor calibration fetches made a graph output, "
        "no observer; `cpu`: CPU time of the process over plain inference's.",
        "",
        "| model | samples | tensors fetched | plain s | plain DISABLE_ALL | exposed | "
        + " | ".join(METHODS) + " | cpu (percentile) | onnxruntime MinMax |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(METHODS) + "---:|---:|",
    ]
    for r in rows:
        base, base_cpu = r["plain"]
        cells = [r["model"], str(r["samples"]), str(r["fetched"]), f"{base:.3f}",
                 f"{r['plain_disable_all'][0] / base:.2f}x", f"{r['exposed'][0] / base:.2f}x"]
        cells += [f"{r[m][0] / base:.2f}x" for m in METHODS]
        cells.append(f"{r['percentile'][1] / base_cpu:.2f}x")
        cells.append(f"{r['ort_minmax'][0] / base:.2f}x" if "ort_minmax" in r else f"failed: {r['ort_minmax_error']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "calib_zoo_results.md"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for name in args.models:
        print(f"{name}:", flush=True)
        rows.append(measure_model(name, args.repeats))
    text = render(rows, time.perf_counter() - start)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
