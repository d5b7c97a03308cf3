"""Measuring helpers shared by the benchmarks (DESIGN.md, "Measuring").

- `peak_rss_run(argv, timeout)`: run a command in a fresh process under a small wrapper
  process whose only child it is, so ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` in
  the wrapper is exactly that command's peak RSS; wall time measured around it; the child
  is killed (with its process group) after ``timeout`` seconds.
- `interleaved_latency(sessions, feeds, runs)`: warm up every session, then time them in
  alternating rounds (A, B, C, A, B, C, ...) in this process; median and p90 per session.
- `machine()`: what the figures were measured on (CPU model, AVX2 / AVX-512 VNNI,
  core count, onnxruntime version).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from zenith_onnx.runtime import interleaved_latency  # noqa: F401  (re-exported for the bench modules)

__all__ = ["peak_rss_run", "interleaved_latency", "calibration_reader", "first_line", "machine", "cpu_model", "cpu_flags"]


# ------------------------------------------------------------------ peak RSS of a subprocess


def peak_rss_run(argv: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``argv`` in a fresh process; returns ``{"wall_s", "peak_rss_mb", "returncode",
    "timed_out", "stdout", "stderr"}``. ``timed_out`` runs report the time at the kill."""
    wrapper = [sys.executable, "-m", "bench._measure", "--wrap", str(timeout or 0), "--", *argv]
    done = subprocess.run(wrapper, capture_output=True, text=True, check=False, cwd=_repo_root())
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measuring wrapper failed for {' '.join(argv)}: {done.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wrap(timeout: float, argv: list[str]) -> dict:
    start = time.perf_counter()
    # A new session so that a timeout kills the child and anything it started.
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        out, err = child.communicate(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "returncode": child.returncode,
        "timed_out": timed_out,
        "stdout": out[-20000:],
        "stderr": err[-4000:],
    }


# ------------------------------------------------------------------ latency
# interleaved_latency lives in zenith_onnx.runtime (imported above); the demos and the
# fallback measure with it too.


def calibration_reader(feeds: Sequence[Mapping[str, np.ndarray]]):
    """An onnxruntime ``CalibrationDataReader`` handing out ``feeds`` once, in order."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self._feeds = iter(feeds)

        def get_next(self):
            return next(self._feeds, None)

    return FeedReader()


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (onnxruntime's messages run to pages)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:limit]


# ------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict:
    import onnx
    import onnxruntime

    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a command, print its wall time and peak RSS as JSON")
    parser.add_argument("--wrap", type=float, required=True, metavar="TIMEOUT_S", help="0: no timeout")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    print(json.dumps(_wrap(args.wrap, command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
