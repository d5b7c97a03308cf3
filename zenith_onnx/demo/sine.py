"""`zenith-onnx demo sine`: naive post-training quantization (PTQ) vs quantization-aware
training (QAT) with 4-bit weights, on a small MLP that fits a noisy sine.

The experiment of the Zenith QAT notebook (05_qat_from_scratch), measured over seeds:

- data: ``TRAIN_POINTS`` points x ~ U[-pi, pi], y = sin(x) + N(0, ``NOISE``^2); the
  error of every model is the MSE against the *clean* sine on ``EVAL_POINTS`` evenly
  spaced points of [-pi, pi];
- model: Linear(1, 64) -> ReLU -> Linear(64, 64) -> ReLU -> Linear(64, 1);
- FP32: plain torch training (full batch, Adam, cosine learning rate, ``STEPS`` steps:
  1000, near FP32's lowest error over 300..3000 steps; longer training fits the noise and
  grows the weight outliers that make PTQ worse, see README "Sine demo");
- PTQ INT4: the FP32 model, weights quantized to 4 bits symmetric (-7..7) once, no
  retraining, activations (the input and both ReLU outputs) 8-bit asymmetric with min/max
  ranges of the training inputs, with `zenith_onnx.kernels` (the functions the passes
  use). Two variants: *per tensor* (one scale per weight: the "naive" PTQ of the notebook)
  and *per channel* (one scale per output row, the quantize pass's default);
- QAT INT4: the same MLP trained **from scratch** (like the notebook) with
  `zenith_onnx.qat.prepare_qat` and ``QATConfig(weight_bits=4, activation_bits=8)``
  (per-channel weights, straight-through estimator), same optimizer, steps and seed as
  FP32; activation ranges are recorded during the first ``observe_steps`` steps, then
  frozen;
- ONNX: each QAT model goes through `zenith_onnx.qat.export_qat` ->
  `zenith_onnx.quantize.quantize` (no calibration data: the export carries its ranges)
  -> onnxruntime, deployed (``ORT_ENABLE_ALL``) and reference (``ORT_DISABLE_ALL``); its
  MSE is compared with the torch QAT model's. The two differ by the int32 bias that the
  quantized model adds in its integer kernels (the QAT model trains a float bias): the
  torch QAT model given those int32 biases is checked to match onnxruntime to float
  rounding.

The expected relations (QAT <= 2x FP32, PTQ >= 5x QAT; on the mean MSE over seeds) are
checked and reported, never tuned for. Writes ``results.json``, ``qat_success.png``
(seed 0's curves) and seed 0's ONNX models (with the integer kernels onnxruntime fuses
from the quantized one) to the output folder and prints a table.
Needs the ``qat`` extra (torch, onnxscript); matplotlib for the plot.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from zenith_onnx import kernels, runtime
from zenith_onnx.demo._common import format_table, machine_info, quantize_qat_export
from zenith_onnx.errors import UsageError
from zenith_onnx.fusion import fusion_report
from zenith_onnx.modelio import atomic_output, save_model
from zenith_onnx.qconfig import QuantConfig

__all__ = ["run_demo", "DEFAULT_OUT"]

DEFAULT_OUT = Path("demo-out") / "sine"
SEEDS = {False: 5, True: 2}
STEPS = {False: 1000, True: 500}
TRAIN_POINTS, EVAL_POINTS, NOISE = 256, 1001, 0.1
HIDDEN = 64
LEARNING_RATE = 1e-2
WEIGHT_BITS, ACTIVATION_BITS = 4, 8
TORCH_THREADS = 1  # a 64-wide MLP trains fastest on one thread; leaves the other core free

# Relations the notebook claims, checked on the mean MSE over seeds and reported.
QAT_MAX_RATIO = 2.0  # QAT INT4 <= 2x FP32
PTQ_MIN_RATIO = 5.0  # PTQ INT4 >= 5x QAT INT4
# onnxruntime vs torch QAT MSE, per seed: agree within 2 % relative or 1e-4 absolute.
ONNX_RTOL, ONNX_ATOL = 0.02, 1e-4

# Rows of the table and keys of results.json, in order.
MODELS = {
    "fp32": "FP32",
    "ptq_per_tensor": "PTQ INT4 per-tensor (naive)",
    "ptq_per_channel": "PTQ INT4 per-channel",
    "qat": "QAT INT4 (torch)",
    "qat_onnx": "QAT INT4 onnxruntime (ENABLE_ALL)",
    "qat_onnx_reference": "QAT INT4 onnxruntime (DISABLE_ALL)",
}


def _import_torch():
    from zenith_onnx.qat import require_qat_extra

    return require_qat_extra("demo sine", " or run `make sine`")


def run_demo(out_dir: str | Path | None = None, quick: bool = False, *, steps: int | None = None,
             seeds: int | None = None) -> dict:
    """Run the sine demo, print the table, write the output folder; return the results.

    quick: 2 seeds and 500 training steps instead of 5 and 1000 (for tests).
    steps, seeds: override those numbers (how the PTQ gap depends on training length).
    """
    start = time.perf_counter()
    torch = _import_torch()
    steps = STEPS[quick] if steps is None else steps
    seeds = SEEDS[quick] if seeds is None else seeds
    if steps < 1 or seeds < 1:
        raise UsageError(f"demo sine: steps and seeds must be >= 1, got {steps} and {seeds}")
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    try:
        runs = [_run_seed(torch, seed, steps, out if seed == 0 else None) for seed in range(seeds)]
    finally:
        torch.set_num_threads(threads)
    results = _results(runs, quick, steps, time.perf_counter() - start)
    plotted = _plot(runs[0], out / "qat_success.png")
    results["total_s"] = time.perf_counter() - start
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    _print(results, out, plotted)
    return results


def _data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-math.pi, math.pi, (TRAIN_POINTS, 1)).astype(np.float32)
    y = (np.sin(x) + NOISE * rng.standard_normal(x.shape)).astype(np.float32)
    x_eval = np.linspace(-math.pi, math.pi, EVAL_POINTS, dtype=np.float32).reshape(-1, 1)
    return {"x": x, "y": y, "x_eval": x_eval, "y_eval": np.sin(x_eval)}


def _mse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, np.float64) - target) ** 2))


def _mlp(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(1, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1),
    )


def _train(torch, model, x: np.ndarray, y: np.ndarray, steps: int):
    """Full-batch Adam with a cosine learning rate: the same loop for FP32 and QAT."""
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        loss = torch.mean((model(x) - y) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return model.eval()


def _linears(torch, model) -> list:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _gemm_biases(model: ir.Model) -> list[np.ndarray]:
    """The float value of each Gemm's bias in a quantized model, in graph order: the
    int32 bias (scale = input scale x weight scale) that onnxruntime's integer kernels add."""
    biases = []
    for node in model.graph:
        if node.op_type != "Gemm":
            continue
        dq = node.inputs[2].producer()
        q, scale = (v.const_value.numpy() for v in dq.inputs[:2])
        biases.append(kernels.dequantize(q, scale, 0, axis=0 if scale.ndim else None))
    return biases


def _predict(torch, model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ptq_predict(layers: list[tuple[np.ndarray, np.ndarray]], x_calib: np.ndarray, x: np.ndarray,
                 per_channel: bool) -> np.ndarray:
    """The MLP with ``layers`` (weight, bias) quantized after training: weights
    ``WEIGHT_BITS`` symmetric (narrow range, as the quantize pass and QATConfig), the input
    and the ReLU outputs ``ACTIVATION_BITS`` unsigned with min/max ranges on ``x_calib``,
    the output float, bias float (onnxruntime adds an int32 bias: a far finer step)."""
    w_range = kernels.int_range(WEIGHT_BITS, signed=True, narrow=True)
    a_range = kernels.int_range(ACTIVATION_BITS, signed=False)

    def weight(w):
        axis = 0 if per_channel else None
        lo, hi = (w.min(axis=1), w.max(axis=1)) if per_channel else (w.min(), w.max())
        scale, zp = kernels.scale_zero_point(lo, hi, w_range, symmetric=True)
        return kernels.fake_quantize(w, scale, zp, w_range, axis)

    def forward(h, weights, act):
        h = act(0, h)
        for i, (w, b) in enumerate(weights):
            h = h @ w.T + b
            if i < len(weights) - 1:
                h = act(i + 1, np.maximum(h, 0))
        return h

    ranges: list[tuple[float, float]] = []
    forward(x_calib, layers, lambda i, h: ranges.append((h.min(), h.max())) or h)

    def quantized(i, h):
        scale, zp = kernels.scale_zero_point(*ranges[i], a_range, symmetric=False)
        return kernels.fake_quantize(h, scale, zp, a_range)

    return forward(x, [(weight(w), b) for w, b in layers], quantized)


def _run_seed(torch, seed: int, steps: int, save_to: Path | None) -> dict:
    """Train FP32 and QAT, quantize FP32 (PTQ), export QAT and run it in onnxruntime."""
    from zenith_onnx.qat import QATConfig, export_qat, prepare_qat

    d = _data(seed)
    t = time.perf_counter()
    torch.manual_seed(seed)
    fp32 = _train(torch, _mlp(torch), d["x"], d["y"], steps)
    fp32_s = time.perf_counter() - t
    layers = [(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in _linears(torch, fp32)]

    t = time.perf_counter()
    torch.manual_seed(seed)  # the same initial weights as FP32
    qat = prepare_qat(_mlp(torch), QATConfig(weight_bits=WEIGHT_BITS, activation_bits=ACTIVATION_BITS))
    _train(torch, qat, d["x"], d["y"], steps)
    qat_s = time.perf_counter() - t

    t = time.perf_counter()
    exported = export_qat(qat, (torch.from_numpy(d["x_eval"]),))
    name = exported.graph.inputs[0].name
    # Only used if the export lacks a range: the training inputs, in the export's batch shape.
    calibration = [{name: np.resize(d["x"], d["x_eval"].shape)}]
    result = quantize_qat_export(exported, calibration, QuantConfig(weight_bits=WEIGHT_BITS), "the training inputs")
    feed = {name: d["x_eval"]}
    calibrated = result.report["calibration_data_used"]
    onnx_pred = runtime.run(runtime.session(result.model, "all", threads=1), feed)
    reference = runtime.run(runtime.session(result.model, "disable_all"), feed)
    onnx_s = time.perf_counter() - t
    fusion = None
    if save_to is not None:
        save_model(exported, save_to / "qat_int4_export.onnx")
        save_model(result.model, save_to / "qat_int4.onnx")
        report = fusion_report(result.model).to_dict()
        fusion = {k: report[k] for k in ("integer_ops", "float_ops", "float_ops_fed_by_dq", "fully_fused")}

    deployed_bias = copy.deepcopy(qat)
    with torch.no_grad():
        for layer, bias in zip(_linears(torch, deployed_bias), _gemm_biases(result.model), strict=True):
            layer.bias.copy_(torch.from_numpy(bias))
    bias_only = np.abs(_predict(torch, deployed_bias, d["x_eval"]) - next(iter(reference.values())))

    pred = {
        "fp32": _predict(torch, fp32, d["x_eval"]),
        "ptq_per_tensor": _ptq_predict(layers, d["x"], d["x_eval"], per_channel=False),
        "ptq_per_channel": _ptq_predict(layers, d["x"], d["x_eval"], per_channel=True),
        "qat": _predict(torch, qat, d["x_eval"]),
        "qat_onnx": next(iter(onnx_pred.values())),
        "qat_onnx_reference": next(iter(reference.values())),
    }
    return {
        "seed": seed,
        "data": d,
        "pred": pred,
        "mse": {k: _mse(p, d["y_eval"]) for k, p in pred.items()},
        "notes": result.report.get("notes", []),
        "calibration_data_used": calibrated,
        "fusion": fusion,
        "onnx_vs_torch_with_int32_bias_max_abs": float(bias_only.max()),
        "times_s": {"fp32_train": fp32_s, "qat_train": qat_s, "export_quantize_run": onnx_s},
    }


def _stats(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "per_seed": [float(x) for x in v]}


def _results(runs: list[dict], quick: bool, steps: int, elapsed: float) -> dict:
    mse = {k: _stats([r["mse"][k] for r in runs]) for k in MODELS}
    mean = {k: s["mean"] for k, s in mse.items()}
    onnx_diff = [
        {"seed": r["seed"], "torch": r["mse"]["qat"], "onnxruntime": r["mse"]["qat_onnx"],
         "abs": abs(r["mse"]["qat_onnx"] - r["mse"]["qat"]),
         "rel": abs(r["mse"]["qat_onnx"] - r["mse"]["qat"]) / r["mse"]["qat"]}
        for r in runs
    ]
    relations = {
        "qat_over_fp32": mean["qat"] / mean["fp32"],
        "qat_max_ratio": QAT_MAX_RATIO,
        "qat_within_2x_fp32": mean["qat"] <= QAT_MAX_RATIO * mean["fp32"],
        "ptq_per_tensor_over_qat": mean["ptq_per_tensor"] / mean["qat"],
        "ptq_per_channel_over_qat": mean["ptq_per_channel"] / mean["qat"],
        "ptq_min_ratio": PTQ_MIN_RATIO,
        "ptq_per_tensor_5x_qat": mean["ptq_per_tensor"] >= PTQ_MIN_RATIO * mean["qat"],
        "ptq_per_channel_5x_qat": mean["ptq_per_channel"] >= PTQ_MIN_RATIO * mean["qat"],
        "seeds_qat_within_2x_fp32": sum(r["mse"]["qat"] <= QAT_MAX_RATIO * r["mse"]["fp32"] for r in runs),
        "seeds_ptq_per_tensor_5x_qat": sum(r["mse"]["ptq_per_tensor"] >= PTQ_MIN_RATIO * r["mse"]["qat"] for r in runs),
        "seeds_ptq_per_channel_5x_qat": sum(r["mse"]["ptq_per_channel"] >= PTQ_MIN_RATIO * r["mse"]["qat"] for r in runs),
        "onnx_rtol": ONNX_RTOL,
        "onnx_atol": ONNX_ATOL,
        "onnx_matches_torch": all(d["rel"] <= ONNX_RTOL or d["abs"] <= ONNX_ATOL for d in onnx_diff),
        "onnx_max_rel_diff": max(d["rel"] for d in onnx_diff),
        "onnx_max_abs_diff": max(d["abs"] for d in onnx_diff),
        # torch QAT given the deployed int32 biases vs onnxruntime (DISABLE_ALL), largest |difference|
        # of a prediction: near float rounding when the bias explains the whole MSE difference.
        "onnx_vs_torch_with_int32_bias_max_abs": max(r["onnx_vs_torch_with_int32_bias_max_abs"] for r in runs),
    }
    return {
        "demo": "sine",
        "quick": quick,
        "setup": {
            "model": f"Linear(1,{HIDDEN})-ReLU-Linear({HIDDEN},{HIDDEN})-ReLU-Linear({HIDDEN},1)",
            "train_points": TRAIN_POINTS, "noise_std": NOISE, "eval_points": EVAL_POINTS,
            "error": "MSE against the clean sine on evenly spaced points of [-pi, pi]",
            "optimizer": f"Adam lr {LEARNING_RATE}, cosine schedule, full batch",
            "steps": steps, "seeds": [r["seed"] for r in runs], "torch_threads": TORCH_THREADS,
            "ptq": f"INT{WEIGHT_BITS} symmetric weights (per tensor = naive; per channel), "
                   f"UINT{ACTIVATION_BITS} activations with min/max ranges of the training inputs, no retraining",
            "qat": f"from scratch, QATConfig(weight_bits={WEIGHT_BITS}, activation_bits={ACTIVATION_BITS}), "
                   "per-channel weights, straight-through estimator",
            "onnx": "export_qat -> quantize (no calibration data) -> onnxruntime",
        },
        "machine": {k: v for k, v in machine_info().items() if k in ("cpu", "simd", "onnxruntime")},
        "mse": mse,
        "relations": relations,
        "onnx_vs_torch": onnx_diff,
        "calibration_data_used": any(r["calibration_data_used"] for r in runs),
        "fusion_seed0": runs[0]["fusion"],
        "notes": sorted({n for r in runs for n in r["notes"]}),
        "times_s": {"per_seed": [r["times_s"] for r in runs], "experiment": elapsed},
    }


def _plot(run: dict, path: Path) -> bool:
    """Seed ``run``'s data and curves; False (nothing drawn) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    d, pred, mse = run["data"], run["pred"], run["mse"]
    x = d["x_eval"].ravel()
    fig, ax = plt.subplots(figsize=(7.5, 4.3), constrained_layout=True)
    ax.scatter(d["x"].ravel(), d["y"].ravel(), s=6, color="0.65", label="training data (noisy)")
    ax.plot(x, d["y_eval"].ravel(), color="black", lw=1, ls=":", label="clean sine")
    styles = {
        "fp32": dict(color="C0", lw=1.6),
        "ptq_per_tensor": dict(color="red", lw=1.8),
        "ptq_per_channel": dict(color="red", lw=1.2, ls="--", alpha=0.6),
        "qat": dict(color="green", lw=1.8),
    }
    for key, style in styles.items():
        ax.plot(x, pred[key].ravel(), label=f"{MODELS[key]}: MSE {mse[key]:.1e}", **style)
    ax.set_ylim(-1.6, 2.4)  # headroom for the legend
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(f"4-bit weights: naive PTQ vs QAT (seed {run['seed']}, MSE vs clean sine)", fontsize=10)
    ax.legend(fontsize=7.5, loc="upper center", ncol=2)
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return True


def _print(results: dict, out: Path, plotted: bool) -> None:
    s, r = results["setup"], results["relations"]
    fp32 = results["mse"]["fp32"]["mean"]
    print(f"sine demo: {s['model']}, {s['train_points']} noisy points, {len(s['seeds'])} seeds, "
          f"{s['steps']} steps{' (quick)' if results['quick'] else ''}")
    rows = [
        [label, f"{m['mean']:.2e}", f"{m['std']:.1e}", f"{m['min']:.2e} - {m['max']:.2e}", f"{m['mean'] / fp32:.2f}x"]
        for key, label in MODELS.items() for m in [results["mse"][key]]
    ]
    print(format_table(["model", "MSE mean", "std", "min - max", "vs FP32"], rows))
    print("MSE against the clean sine; PTQ: weights quantized after training, no retraining; "
          "QAT: trained from scratch with fake quantization (STE)")

    def met(flag: bool) -> str:
        return "met" if flag else "NOT met"

    print(f"QAT INT4 <= {QAT_MAX_RATIO:g}x FP32: {r['qat_over_fp32']:.2f}x -> {met(r['qat_within_2x_fp32'])} "
          f"({r['seeds_qat_within_2x_fp32']}/{len(s['seeds'])} seeds)")
    for kind in ("per_tensor", "per_channel"):
        print(f"PTQ INT4 {kind.replace('_', '-')} >= {PTQ_MIN_RATIO:g}x QAT: {r[f'ptq_{kind}_over_qat']:.1f}x -> "
              f"{met(r[f'ptq_{kind}_5x_qat'])} ({r[f'seeds_ptq_{kind}_5x_qat']}/{len(s['seeds'])} seeds)")
    print(f"onnxruntime vs torch QAT MSE (per seed, within {ONNX_RTOL:.0%} or {ONNX_ATOL:g}): largest difference "
          f"{r['onnx_max_rel_diff']:.2%} ({r['onnx_max_abs_diff']:.1e}) -> {met(r['onnx_matches_torch'])}")
    print(f"  the difference is the deployed model's int32 bias: torch QAT given those biases vs onnxruntime "
          f"(DISABLE_ALL), largest |difference| of a prediction {r['onnx_vs_torch_with_int32_bias_max_abs']:.1e}")
    print("quantize completed the QAT export " + (
        "after calibrating missing ranges on the training inputs (see notes)" if results["calibration_data_used"]
        else "with the ranges learned in QAT alone (no calibration data)"))
    fusion = results["fusion_seed0"]
    ops = ", ".join(f"{op} {n}" for op, n in sorted(fusion["integer_ops"].items())) or "none"
    print(f"onnxruntime (ORT_ENABLE_EXTENDED) runs seed 0's quantized model with integer ops: {ops}; "
          f"{'fully fused' if fusion['fully_fused'] else 'float ops left: ' + str(fusion['float_ops'])}")
    for note in results["notes"]:
        print(f"note: {note}")
    if not plotted:
        print("matplotlib is not installed: no plot (pip install 'zenith-onnx[demo]')")
    print(f"{results['total_s']:.1f} s; wrote results.json{', qat_success.png' if plotted else ''}, "
          f"qat_int4_export.onnx, qat_int4.onnx (seed 0) to {out.resolve()}")
