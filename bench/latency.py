"""Latency of any .onnx files, measured the way the bench does (DESIGN.md, "Measuring").

    python -m bench.latency A.onnx B.onnx [C.onnx ...] [--data CALIB.npz] [--threads 1 2] [--runs 200]

All models load at ``ORT_ENABLE_ALL`` with the given intra-op thread count, warm up, then
run in alternating rounds (A, B, C, A, B, C, ...) in this process on the same feeds (the
first samples of ``--data``, or standard-normal feeds). Prints median and p90 per model
and each model's median over the first one's. Use it to re-check a figure of
bench/results.md, or to compare two builds of a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench._measure import interleaved_latency

__all__ = ["measure", "main"]


def measure(paths: list[Path], feeds: list[dict], threads: int = 1, runs: int = 200) -> dict[str, dict]:
    """``{path: {median_ms, p90_ms, min_ms, runs}}`` for ``paths`` timed in alternating rounds."""
    from zenith_onnx import runtime

    sessions = {_label(paths, i): runtime.session(str(p), "all", threads=threads) for i, p in enumerate(paths)}
    return interleaved_latency(sessions, feeds, runs=runs, warmup=max(10, runs // 10))


def _label(paths: list[Path], i: int) -> str:
    """The path, numbered when the same file is given twice (to see the noise floor)."""
    return str(paths[i]) if paths.count(paths[i]) == 1 else f"{paths[i]} #{paths[:i].count(paths[i]) + 1}"


def _feeds(first: Path, data: Path | None, count: int = 8) -> list[dict]:
    from zenith_onnx.modelio import load_model
    from zenith_onnx.testing import random_feeds

    model = load_model(first)
    if data is None:
        return [random_feeds(model, seed=i) for i in range(count)]
    from zenith_onnx.calibration_data import as_feeds

    feeds = []
    for feed in as_feeds(str(data), model):
        feeds.append(dict(feed))
        if len(feeds) == count:
            break
    return feeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, help=".npz with one array per input (samples on axis 0)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--runs", type=int, default=200, help="rounds (>= 50 for a figure you report)")
    args = parser.parse_args(argv)
    feeds = _feeds(args.models[0], args.data)
    for threads in args.threads:
        result = measure(args.models, feeds, threads, args.runs)
        base = result[_label(args.models, 0)]["median_ms"]
        print(f"{threads} thread(s), {args.runs} alternating rounds, ORT_ENABLE_ALL:")
        for path, r in result.items():
            print(f"  {path}: median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
                  f"{r['median_ms'] / base:.2f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
