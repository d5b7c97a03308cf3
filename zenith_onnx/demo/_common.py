"""Helpers the demos share: where the shipped files are, latency measured the DESIGN way,
a text table, the machine description and a two-panel plot.

Latency follows DESIGN.md "Measuring": one intra-op thread, ``ORT_ENABLE_ALL``, a
warm-up, then the models measured in alternating rounds (A, B, C, A, B, C, ...) in one
process so that a slow phase of the machine hits all of them alike; median and p90.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from zenith_onnx.errors import ModelError, UsageError

__all__ = [
    "models_dir",
    "measure_latency",
    "format_table",
    "machine_info",
    "plot_panels",
    "quantize_qat_export",
]

# The shipped models live at the top of the source tree, beside the package.
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def models_dir(required: Sequence[str]) -> Path:
    """The repository's ``models/`` folder; `ModelError` naming the missing files if it
    does not hold ``required``."""
    missing = [name for name in required if not (MODELS_DIR / name).is_file()]
    if missing:
        raise ModelError(
            f"{MODELS_DIR}: demo file(s) {', '.join(missing)} not found; the demos run from a "
            "source checkout of zenith-onnx (make demo), whose models/ folder ships them"
        )
    return MODELS_DIR


def measure_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Mapping[str, np.ndarray],
    runs: int,
    warmup: int = 10,
) -> dict[str, dict[str, float]]:
    """Median and p90 milliseconds of one ``run`` of each session, measured in
    interleaved rounds after ``warmup`` runs of each."""
    from zenith_onnx.runtime import interleaved_latency

    return interleaved_latency(sessions, [feed], runs=runs, warmup=warmup)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def machine_info() -> dict:
    """What the latency figures depend on: CPU model, integer dot-product extensions,
    onnxruntime version (DESIGN: say whether the machine has AVX-512 VNNI)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = text.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
        "onnxruntime": ort.__version__,
        "intra_op_threads": 1,
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }


def plot_panels(path: Path, title: str, labels: Sequence[str], panels: Sequence[dict]) -> bool:
    """Save one bar chart per panel side by side (matplotlib, Agg backend). Each panel:
    ``{"title", "ylabel", "values", optional "errors" (upper error bars), "ylim", "fmt"}``.
    Returns False (and draws nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = [f"C{i}" for i in range(len(labels))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), constrained_layout=True)
    for ax, panel in zip(np.atleast_1d(axes), panels):
        values = panel["values"]
        errors = panel.get("errors")
        bars = ax.bar(range(len(labels)), values, color=colors,
                      yerr=None if errors is None else [np.zeros(len(errors)), errors], capsize=3)
        ax.bar_label(bars, labels=[panel.get("fmt", "{:.3g}").format(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(panel["ylabel"])
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def quantize_qat_export(model, calibration, config, calibration_label: str = "the calibration data"):
    """Quantize a QAT export (`zenith_onnx.qat.export_qat`) with the ranges it learned;
    only if some tensor has none, quantize again with ``calibration`` (any calibration
    data `zenith_onnx.quantize.quantize` takes) and add a note to the report saying so.
    Returns the `QuantizeResult`; its report's ``calibration_data_used`` says which."""
    from zenith_onnx.quantize import quantize

    try:
        result = quantize(model, config=config, check_fusion=False, report_samples=0)
        missing = [f for f in result.report.get("left_float", []) if "no calibrated range" in f["reason"]]
    except UsageError:  # no frozen range at all
        missing = ["all"]
    if missing:
        result = quantize(model, calibration, config=config, check_fusion=False, report_samples=0)
        result.report.setdefault("notes", []).append(
            f"the QAT model lacked ranges for {len(missing)} op(s): calibrated those on {calibration_label}"
        )
    result.report["calibration_data_used"] = bool(missing)
    return result
