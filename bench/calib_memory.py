"""Calibration memory and time: zenith-onnx's streaming observers vs onnxruntime's calibrators.

A small CNN (input N x 3 x 64 x 64, Conv/Relu/MaxPool/Add, about 2 MB of activations per
sample) is calibrated on 32, 128 and 512 random samples generated on the fly (an
iterable of dicts: the data itself never sits in memory). Every run is its own
subprocess, started by a wrapper process whose only child it is, so
``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` in the wrapper is exactly that run's
peak RSS (DESIGN.md, Measuring). Compared:

- zenith-onnx `calibrate` with every method (onnxruntime at 1 intra-op thread; this
  thread bins the previous sample's activations meanwhile, so it uses up to two cores);
- onnxruntime's `create_calibrator` with MinMax, Entropy, Percentile (its defaults; it
  keeps its own session options, i.e. onnxruntime's default thread count);
- plain onnxruntime inference of the float model over the same samples, 1 thread, at
  ``ORT_ENABLE_ALL`` (what a user runs: the baseline of the time ratios) and
  ``ORT_DISABLE_ALL``. Its time counts the session creation too, as calibration's does.

Every time includes making the samples (about 0.1 ms each, a third of plain inference
here), on both sides, except the ``premade`` ratio at the largest count, where both
sides get the samples made beforehand. Besides wall time, the CPU time of the process
(all threads) is reported: the wall ratio is what a user waits on a machine with a
free second core, the CPU ratio what it costs when the cores are busy.

    python bench/calib_memory.py            # 32 / 128 / 512 samples
    python bench/calib_memory.py --quick    # 16 / 64 samples

The machine may be shared: plain and zenith runs are repeated (``repeats``) in
rounds that run every (tool, method, sample count) once, so a burst of load hits all
of them alike and each has ``repeats`` chances spread over the whole bench; each keeps
its shortest time, smallest CPU time and highest peak RSS. onnxruntime's calibrators
run once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
OURS = ("minmax", "moving_average", "percentile", "entropy", "mse")
ORTS = ("MinMax", "Entropy", "Percentile")
PLAIN = ("disable_all", "all")
PREMADE = "+premade"
SHAPE = (1, 3, 64, 64)


def build_model(path: str | os.PathLike) -> int:
    """Write the bench CNN to ``path``; returns the activation bytes per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    sizes = {}

    def conv(x, cin, cout, name, hw):
        w = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name, pads=[1, 1, 1, 1]))
        sizes[name] = cout * hw * hw
        return name

    def op(kind, inputs, name, size, **attrs):
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        sizes[name] = size
        return name

    x = op("Relu", [conv("x", 3, 16, "conv1", 64)], "relu1", 16 * 64 * 64)
    x = op("Relu", [conv(x, 16, 16, "conv2", 64)], "relu2", 16 * 64 * 64)
    x = op("MaxPool", [x], "pool1", 16 * 32 * 32, kernel_shape=[2, 2], strides=[2, 2])
    r = op("Relu", [conv(x, 16, 32, "conv3", 32)], "relu3", 32 * 32 * 32)
    x = op("Add", [conv(r, 32, 32, "conv4", 32), r], "add1", 32 * 32 * 32)
    x = op("Relu", [x], "relu4", 32 * 32 * 32)
    x = op("MaxPool", [x], "pool2", 32 * 16 * 16, kernel_shape=[2, 2], strides=[2, 2])
    x = op("Relu", [conv(x, 32, 64, "conv5", 16)], "relu5", 64 * 16 * 16)
    x = op("GlobalAveragePool", [x], "gap", 64)
    x = op("Flatten", [x], "flat", 64)
    inits.append(numpy_helper.from_array((rng.standard_normal((10, 64)) * 0.1).astype(np.float32), "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
    op("Gemm", [x, "fc.w", "fc.b"], "logits", 10, transB=1)
    graph = helper.make_graph(
        nodes, "calib_bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return 4 * (sum(sizes.values()) + int(np.prod(SHAPE)))


def samples(count: int, seed: int = 1):
    """Calibration feeds made one at a time (nothing stacked in memory)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {"x": rng.standard_normal(SHAPE).astype(np.float32)}


# ------------------------------------------------------------------ child processes


def _child(tool: str, method: str, count: int, model_path: str) -> dict:
    """One measured run (in its own process); returns its wall time in seconds. A tool
    name ending in ``PREMADE`` makes the samples before the clock starts."""
    if tool.endswith(PREMADE):
        tool, made = tool.removesuffix(PREMADE), list(samples(count))
        feeds = made.__iter__
    else:
        feeds = functools.partial(samples, count)
    if tool == "zenith":
        import onnx_ir as ir

        from zenith_onnx.calibration import calibrate

        model = ir.load(model_path)
        start, cpu = time.perf_counter(), time.process_time()
        ranges = calibrate(model, feeds(), method=method, progress=False)
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                "tensors": len(ranges.tensors)}
    if tool == "onnxruntime":
        from onnxruntime.quantization.calibrate import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.feeds = samples(count)

            def get_next(self):
                return next(self.feeds, None)

        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            calibrator = create_calibrator(
                model_path, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod[method],
            )
            calibrator.collect_data(Reader())
            ranges = calibrator.compute_data()
            return {"seconds": time.perf_counter() - start, "tensors": len(ranges.data)}
    if tool == "plain":
        from zenith_onnx import runtime

        start, cpu = time.perf_counter(), time.process_time()
        session = runtime.session(model_path, method, threads=1)
        for feed in feeds():
            session.run(None, feed)
        return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu}
    raise ValueError(tool)


def _measure(tool: str, method: str, count: int, model_path: str) -> dict:
    """Run one child under a wrapper process; peak RSS from the wrapper's RUSAGE_CHILDREN."""
    wrapper = subprocess.run(
        [sys.executable, str(HERE), "--wrap", tool, method, str(count), model_path],
        capture_output=True, text=True, check=False,
    )
    if wrapper.returncode != 0:
        raise RuntimeError(f"{tool} {method} {count}: {wrapper.stderr.strip()[-2000:]}")
    return json.loads(wrapper.stdout.strip().splitlines()[-1])


def _wrap(tool: str, method: str, count: int, model_path: str) -> None:
    child = subprocess.run(
        [sys.executable, str(HERE), "--child", tool, method, str(count), model_path],
        capture_output=True, text=True, check=False,
    )
    if child.returncode != 0:
        sys.stderr.write(child.stderr)
        sys.exit(1)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(json.dumps(result))


# ------------------------------------------------------------------ driver


def run(sample_counts=(32, 128, 512), quick: bool = False, repeats: int = 7) -> list[dict]:
    """Measure every (tool, method, sample count); print a table; return the rows.

    zenith rows carry ``ratio_all`` / ``ratio_disable_all`` (time over plain inference
    at ORT_ENABLE_ALL / ORT_DISABLE_ALL on the same samples), ``cpu_ratio_all`` and, at
    the largest count, ``per_sample_ratio_all`` and ``premade_ratio_all``."""
    if quick:
        sample_counts, repeats = (16, 64), 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="calib-bench-") as tmp:
        model_path = str(Path(tmp) / "cnn.onnx")
        per_sample = build_model(model_path)
        print(f"model: {per_sample / 2**20:.2f} MB of activations per sample; samples {list(sample_counts)}")
        jobs = [(tool, method, count) for count in sample_counts
                for tool, method in [("plain", m) for m in PLAIN] + [("zenith", m) for m in OURS]]
        # The time ratio without making the samples (largest count; RSS then holds the data).
        jobs += [("plain" + PREMADE, "all", sample_counts[-1])]
        jobs += [("zenith" + PREMADE, m, sample_counts[-1]) for m in OURS]
        runs: dict[tuple[str, str, int], list[dict]] = {job: [] for job in jobs}
        for round_ in range(repeats):  # every job once per round: a burst of load hits them alike
            for job in jobs:
                runs[job].append(_measure(*job, model_path))
            # Other work on the machine takes the core the binning thread would use.
            print(f"  round {round_ + 1}/{repeats} done; load average (1 min) {os.getloadavg()[0]:.2f} "
                  f"on {os.cpu_count()} cores", flush=True)
        for count in sample_counts:
            for method in ORTS:
                runs["onnxruntime", method, count] = [_measure("onnxruntime", method, count, model_path)]
        for (tool, method, count), got in runs.items():
            result = {**got[0], "seconds": min(r["seconds"] for r in got),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in got)}
            if "cpu_seconds" in result:
                result["cpu_seconds"] = min(r["cpu_seconds"] for r in got)
            rows.append({"tool": tool, "method": method, "samples": count, **result})
    for count in sample_counts:
        _add_ratios(rows, count)
    _add_per_sample_ratios(rows, sample_counts)
    premade = {r["method"]: r for r in rows if r["tool"].endswith(PREMADE)}
    rows[:] = [r for r in rows if not r["tool"].endswith(PREMADE)]
    for r in rows:
        if r["tool"] == "zenith" and r["samples"] == sample_counts[-1]:
            r["premade_ratio_all"] = premade[r["method"]]["seconds"] / premade["all"]["seconds"]
    _print_table(rows, sample_counts)
    return rows


def _add_ratios(rows: list[dict], count: int) -> None:
    at = [r for r in rows if r["samples"] == count]
    plain = {r["method"]: r for r in at if r["tool"] == "plain"}
    for r in at:
        if r["tool"] == "zenith":
            r["ratio_all"] = r["seconds"] / plain["all"]["seconds"]
            r["ratio_disable_all"] = r["seconds"] / plain["disable_all"]["seconds"]
            r["cpu_ratio_all"] = r["cpu_seconds"] / plain["all"]["cpu_seconds"]


def _add_per_sample_ratios(rows: list[dict], counts) -> None:
    """``per_sample_ratio_all`` on the zenith rows of the largest count: the time each
    further sample adds, between the two largest counts, over plain inference's (the
    one-off costs, sessions and the entropy search, cancel out)."""
    if len(counts) < 2:
        return
    find = {(r["tool"], r["method"], r["samples"]): r for r in rows}
    before, last = sorted(counts)[-2:]
    plain = find["plain", "all", last]["seconds"] - find["plain", "all", before]["seconds"]
    for method in OURS:
        row = find["zenith", method, last]
        row["per_sample_ratio_all"] = (row["seconds"] - find["zenith", method, before]["seconds"]) / plain


def _print_table(rows: list[dict], counts) -> None:
    def find(tool, method, count):
        return next(r for r in rows if (r["tool"], r["method"], r["samples"]) == (tool, method, count))

    first, last = counts[0], counts[-1]
    head = "".join(f"{f'RSS@{c} MB':>12}" for c in counts)
    print(f"\n{'tool':<12}{'method':<16}{head}{f'RSS x{last}/{first}':>14}" + "".join(f"{f't@{c} s':>10}" for c in counts))
    keys = sorted({(r["tool"], r["method"]) for r in rows}, key=lambda k: ("pzo".index(k[0][0]), k[1]))
    for tool, method in keys:
        rss = [find(tool, method, c)["peak_rss_mb"] for c in counts]
        secs = [find(tool, method, c)["seconds"] for c in counts]
        print(f"{tool:<12}{method:<16}" + "".join(f"{v:12.1f}" for v in rss) + f"{rss[-1] / rss[0]:14.2f}"
              + "".join(f"{v:10.3f}" for v in secs))
    labels = {"ratio_all": "wall", "cpu_ratio_all": "cpu", "ratio_disable_all": "wall-D"}
    columns = [(key, c) for key in labels for c in counts]
    extra = {"per_sample_ratio_all": "per-sample", "premade_ratio_all": f"premade@{last}"}
    extra = {k: v for k, v in extra.items() if k in find("zenith", OURS[0], last)}
    print(f"\n{'zenith / plain':<28}" + "".join(f"{f'{labels[key]}@{c}':>11}" for key, c in columns)
          + "".join(f"{v:>13}" for v in extra.values()))
    for tool, method in keys:
        if tool == "zenith":
            print(f"{tool:<12}{method:<16}" + "".join(f"{find(tool, method, c)[key]:11.2f}" for key, c in columns)
                  + "".join(f"{find(tool, method, last)[k]:13.2f}" for k in extra))
    print("(wall, cpu: wall / CPU time over plain inference at ORT_ENABLE_ALL, 1 intra-op thread; wall-D: wall time "
          "over plain inference at ORT_DISABLE_ALL; per-sample: wall time a further sample adds between the two "
          f"largest counts, over plain inference's; premade@{last}: wall time with the samples made before the "
          "clock starts, on both sides; onnxruntime's calibrators use its default thread count)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 samples")
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--repeats", type=int, default=7, help="runs per plain/zenith measurement")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--child", nargs=4, metavar=("TOOL", "METHOD", "N", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--wrap", nargs=4, metavar=("TOOL", "METHOD", "N", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        tool, method, count, model_path = args.child
        print(json.dumps(_child(tool, method, int(count), model_path)))
        return 0
    if args.wrap:
        tool, method, count, model_path = args.wrap
        _wrap(tool, method, int(count), model_path)
        return 0
    rows = run(tuple(args.samples), quick=args.quick, repeats=args.repeats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
