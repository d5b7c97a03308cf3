"""Real exported models from published wheels (models/zoo.json, zenith_onnx/zoo.py).

The fetch runs once per session (`pip download --no-deps` of four wheels, ~40 MB, then
cached in .cache/zoo/); when it cannot (no network, no Pillow), every test that needs the
models is skipped with the reason. Budget: ~30 s on 2 cores once the cache is there.

Folding tolerance: 1e-5 relative to each output's max, at ORT_DISABLE_ALL. Outputs that
are probabilities from a Sigmoid (layout scores, the text-detection map) are compared
through their logits, the Sigmoid's input (1e-5 relative), and within 1e-4 absolute
themselves: a logit of magnitude up to ~90 carries float32 rounding of ~1e-4 after 100
folded layers (onnxruntime's own Conv+BatchNorm fusion shows the same 1.2e-5 / 2.2e-5 on
these outputs), and a probability map of an image without text peaks at ~1e-7, where
onnxruntime's Sigmoid is accurate in absolute terms only.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import onnx_ir as ir
import pytest

from zenith_onnx import runtime, zoo
from zenith_onnx.cli import main as cli_main
from zenith_onnx.modelio import load_model
from zenith_onnx.passes import DEFAULT_OPTIMIZE, build_pipeline
from zenith_onnx.qconfig import QuantConfig
from zenith_onnx.quantize import quantize
from zenith_onnx.summary import op_counts
from zenith_onnx.testing import relative_error, sqnr_db

MODELS = ("layout_cdla", "orientation", "ppocrv3_det", "ppocrv3_rec")
# BatchNormalization counts of the published models (models/zoo.json descriptions).
BATCHNORMS = {"layout_cdla": 94, "orientation": 27, "ppocrv3_det": 49, "ppocrv3_rec": 32}
# HardSigmoid/HardSwish ops after optimize: written-out ones fused, plus those already there.
HARD_ACTIVATIONS = {"layout_cdla": 94 + 2, "orientation": 28 + 2, "ppocrv3_det": 20 + 8, "ppocrv3_rec": 27 + 2}


@pytest.fixture(scope="session")
def fetched() -> dict[str, zoo.ZooModel]:
    try:
        return zoo.fetch()
    except zoo.ZooError as e:
        pytest.skip(f"zoo models could not be fetched: {e}")


# ------------------------------------------------------------------ fetch


def test_fetch_checks_every_file_and_keeps_sets_apart(fetched):
    spec = zoo.load_spec()
    for name in MODELS:
        model = fetched[name]
        assert zoo.sha256_file(model.path) == spec["models"][name]["sha256"]
        samples = model.samples()
        calib_images = {s["image"] for s in samples["calib"]}
        eval_images = {s["image"] for s in samples["eval"]}
        assert calib_images and eval_images and not calib_images & eval_images
        shape = tuple(spec["models"][name]["input_shape"])
        for which, count in (("calib", len(samples["calib"])), ("eval", len(samples["eval"]))):
            with np.load(getattr(model, f"{which}_path"), allow_pickle=False) as data:
                assert list(data) == [model.input_name]
                array = data[model.input_name]
            assert array.shape == (count, *shape) and array.dtype == np.float32
            assert np.isfinite(array).all() and array.std() > 0.1  # real pixels, normalised
    for wheel in spec["wheels"].values():
        assert zoo.sha256_file(zoo.DEFAULT_CACHE / "wheels" / wheel["file"]) == wheel["sha256"]


def test_orientation_is_evaluated_on_document_windows_with_known_rotations(fetched):
    """Evaluation: windows of page.png at the four rotations, each with its true class;
    the other evaluation images apart in eval_other (never mixed in); calibration: windows
    of text.png first, then the other calibration images."""
    model = fetched["orientation"]
    samples = model.samples()
    assert model.sets == ("calib", "eval", "eval_other")
    assert {s["image"] for s in samples["eval"]} == {"page.png"}
    assert "page.png" not in {s["image"] for s in samples["eval_other"]} | {s["image"] for s in samples["calib"]}
    assert samples["calib"][0]["image"] == "text.png"
    spec = zoo.load_spec()
    assert {s["image"] for s in samples["eval_other"]} == set(spec["images"]["evaluation"]) - {"page.png"}
    for which in ("eval", "eval_other"):
        assert len(samples[which]) % 4 == 0 and len(model.feeds(which)) == len(samples[which])
        assert model.labels(which) == [{0: 0, 90: 3, 180: 2, 270: 1}[s["rotation"]] for s in samples[which]]
    assert len(samples["eval"]) >= 80
    # The float model knows the rotation of every window, by a wide margin.
    sess = runtime.session(model.path, "all", threads=2)
    ref = [sess.run(None, f) for f in model.feeds("eval")]
    measure = zoo.task_measure(model.spec, ref, ref, model.labels("eval"))
    assert measure["float_accuracy"] == 1.0 and measure["float_margin_ge_0.1"] == 1.0
    assert "eval_other" not in fetched["ppocrv3_rec"].sets


def test_second_fetch_downloads_and_rebuilds_nothing(fetched, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fetch ran a command although the cache is complete")

    monkeypatch.setattr(zoo.subprocess, "run", refuse)
    before = {n: fetched[n].calib_path.stat().st_mtime_ns for n in MODELS}
    again = zoo.fetch()
    assert {n: again[n].calib_path.stat().st_mtime_ns for n in MODELS} == before


def test_a_model_that_does_not_match_its_sha256_is_refused(fetched, tmp_path):
    spec = zoo.load_spec()
    entry = spec["models"]["orientation"]
    spec["models"] = {"orientation": {**entry, "sha256": "0" * 64}}
    spec_path = tmp_path / "zoo.json"
    spec_path.write_text(json.dumps(spec))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    wheel = spec["wheels"][entry["wheel"]]["file"]
    shutil.copy(zoo.DEFAULT_CACHE / "wheels" / wheel, tmp_path / "cache" / "wheels" / wheel)
    with pytest.raises(zoo.ZooError, match="sha256 .* does not match 0{64}"):
        zoo.fetch(["orientation"], cache=tmp_path / "cache", spec_path=spec_path)
    assert not (zoo._model_dir(tmp_path / "cache", "orientation") / "model.onnx").exists()


def test_preprocessing_reads_text_as_the_packages_do(fetched):
    """The float models do their job on our samples: the recognizer reads page.png's
    printed text, the classifier tells the four rotations of page.png apart."""
    rec = fetched["ppocrv3_rec"]
    sess = runtime.session(rec.path, "all", threads=2)
    characters = ["", *load_model(rec.path).metadata_props["character"].splitlines(), " "]
    texts = []
    for feed in rec.feeds("eval"):
        steps = sess.run(None, feed)[0][0].argmax(-1)
        texts.append("".join(characters[c] for i, c in enumerate(steps) if c and (i == 0 or c != steps[i - 1])))
    assert "markers of the coins" in texts and "Let us first determine" in texts
    orientation = fetched["orientation"]
    sess = runtime.session(orientation.path, "all", threads=2)
    page = [i for i, s in enumerate(orientation.samples()["eval"]) if s["image"] == "page.png"]
    feeds = orientation.feeds("eval")
    predicted = [int(np.argmax(sess.run(None, feeds[i])[0])) for i in page]
    assert len(set(predicted)) == 4  # one class per rotation


# ------------------------------------------------------------------ resizing as cv2 does


@pytest.mark.parametrize("interpolation", ["linear", "lanczos4"])
def test_resize_to_the_same_size_is_the_identity(interpolation):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(zoo.resize(image, 9, 7, interpolation), image)


def test_linear_resize_matches_cv2_on_known_values():
    # cv2.resize(INTER_LINEAR): half-pixel centres, edge replicated, no antialiasing.
    row = np.array([[[0], [100]]], dtype=np.uint8)
    np.testing.assert_array_equal(zoo.resize(row, 4, 1)[0, :, 0], [0, 25, 75, 100])
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 1), dtype=np.uint8)
    blocks = image.reshape(4, 2, 4, 2, 1).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_array_equal(zoo.resize(image, 4, 4), np.rint(blocks).astype(np.uint8))


def test_lanczos4_keeps_a_flat_image_flat():
    image = np.full((30, 20, 3), 77, dtype=np.uint8)
    assert (zoo.resize(image, 11, 13, "lanczos4") == 77).all()


# ------------------------------------------------------------------ task measures


def test_task_measures_are_one_on_identical_outputs_and_drop_on_changes(fetched):
    for name in MODELS:
        model = fetched[name]
        sess = runtime.session(model.path, "all", threads=2)
        ref = [sess.run(None, f) for f in model.feeds("eval", 2)]
        assert zoo.task_measure(model.spec, ref, ref)["value"] == 1.0
        # Swap the two samples' outputs: a different picture must not agree fully.
        assert zoo.task_measure(model.spec, ref, ref[::-1])["value"] < 1.0, name


# ------------------------------------------------------------------ optimize


def _sigmoid_inputs(model: ir.Model) -> dict[str, str]:
    """Graph output name -> name of the Sigmoid input it comes from (through data movement)."""
    found = {}
    for out in model.graph.outputs:
        node = out.producer()
        while node is not None and node.op_type in ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"):
            node = node.inputs[0].producer()
        if node is not None and node.op_type == "Sigmoid":
            found[out.name] = node.inputs[0].name
    return found


def _run_with(model: ir.Model, extra: list[str], feeds) -> list[dict[str, np.ndarray]]:
    model = model.clone()
    values = {v.name: v for node in model.graph for v in node.outputs}
    model.graph.outputs.extend(values[n] for n in extra)
    sess = runtime.session(model, "disable_all")
    return [runtime.run(sess, f) for f in feeds]


@pytest.mark.parametrize("name", MODELS)
def test_optimize_folds_every_batchnorm_and_keeps_the_outputs(fetched, name):
    model = fetched[name]
    original = load_model(model.path)
    assert op_counts(original).get("BatchNormalization") == BATCHNORMS[name]
    optimized = original.clone()
    pipeline = build_pipeline(DEFAULT_OPTIMIZE)
    pipeline(optimized)
    counts = op_counts(optimized)
    assert "BatchNormalization" not in counts and "Constant" not in counts
    # Written-out hard-swish / hard-sigmoid became single ops (onnxruntime fuses them into the Conv).
    assert "Clip" not in counts and counts.get("HardSigmoid", 0) + counts.get("HardSwish", 0) == HARD_ACTIVATIONS[name]
    fold = next(p for p in pipeline.passes if hasattr(p, "report_lines"))
    assert all(r.action == "folded" for r in fold.report) and len(fold.report) == BATCHNORMS[name]

    logits = _sigmoid_inputs(original)
    # Two evaluation samples, the first with text (a probability map that is not ~0).
    feeds = model.feeds("eval", 2)
    expected = _run_with(original, list(logits.values()), feeds)
    got = _run_with(optimized, list(logits.values()), feeds)
    for a, b in zip(expected, got):
        for out in (o.name for o in original.graph.outputs):
            if out in logits:
                assert relative_error(a[logits[out]], b[logits[out]]) <= 1e-5, (out, logits[out])
                assert np.max(np.abs(a[out] - b[out])) <= 1e-4, out
            else:
                assert relative_error(a[out], b[out]) <= 1e-5, out


def test_optimize_cli_reports_the_batchnorm_after_an_add_folded(fetched, tmp_path, capsys):
    """PP-OCRv3 det: ConvTranspose -> Add(Reshape(bias)) -> BatchNormalization. The Add
    becomes the ConvTranspose's bias, then the BatchNormalization folds into it."""
    out = tmp_path / "det.onnx"
    start = time.perf_counter()
    assert cli_main(["optimize", str(fetched["ppocrv3_det"].path), "-o", str(out)]) == 0
    assert time.perf_counter() - start < 10
    text = capsys.readouterr().out
    assert "49 BatchNormalization: 49 folded, 0 converted to Mul+Add, 0 left" in text
    counts = op_counts(load_model(out))
    assert counts["ConvTranspose"] == 2 and "Reshape" not in counts


# ------------------------------------------------------------------ quantize


@pytest.mark.parametrize("name", MODELS)
def test_quantize_with_defaults_works_on_every_model(fetched, name):
    """onnxruntime's quant_pre_process fails on both PP-OCRv3 models (symbolic shape
    inference); ours quantizes all four as published, and onnxruntime runs the result."""
    model = fetched[name]
    result = quantize(load_model(model.path), model.feeds("calib", 4), report_samples=0)
    fusion = result.report["fusion"]
    assert sum(fusion["integer_ops"].values()) >= 40
    sess = runtime.session(result.model, "all", threads=2)
    outputs = sess.run(None, model.feeds("eval", 1)[0])
    assert all(np.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("name", MODELS)
def test_histogram_calibration_works_on_every_model(fetched, name):
    """Layout's prepared graph holds a tensor in a band of ten float32 ulps around 3.0;
    binning it in float32 once shifted indices by hundreds of bins (an IndexError with
    any histogram method). Every method's ranges stay inside the observed values."""
    model = fetched[name]
    result = quantize(load_model(model.path), model.feeds("calib", 4), report_samples=0, check_fusion=False,
                      config=QuantConfig(method="entropy"))
    scales = [n.inputs[1].const_value.numpy() for n in result.model.graph if n.op_type == "QuantizeLinear"]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)


def test_orientation_end_to_end_prepared_runs_on_integers_and_keeps_its_floor(fetched):
    """optimize + QUANTIZE_PREPARE + quantize + onnxruntime on the 100 document windows.
    Floors sit below what this model reaches (SQNR 36.6 dB, top-1 agreement 1.000 with
    float and accuracy 1.000 against the true rotation at the time of writing;
    onnxruntime's best settings 36.1 dB, 1.000; bench/zoo_results.md)."""
    from bench.zoo import prepare

    model = fetched["orientation"]
    prepared, notes = prepare(load_model(model.path))
    assert notes == []  # no written-out LayerNorm: the opset stays 15
    result = quantize(prepared, model.feeds("calib"), report_samples=0)
    fusion = result.report["fusion"]
    # HardSwish/HardSigmoid run as QLinearAdd/QLinearMul; the final Softmax stays float by choice
    assert set(fusion["float_ops_fed_by_dq"]) <= {"Shape", "Softmax"}
    # the stem Conv (reads the image) and the 16-channel depthwise Conv after it stay float
    assert fusion["integer_ops"]["QLinearConv"] == 30
    float_sess = runtime.session(model.path, "disable_all")
    quant_sess = runtime.session(result.model, "all", threads=2)
    ref, got = [], []
    for feed in model.feeds("eval"):
        ref.append(float_sess.run(None, feed))
        got.append(quant_sess.run(None, feed))
    assert sqnr_db([r[0] for r in ref], [g[0] for g in got]) >= 30.0
    measure = zoo.task_measure(model.spec, ref, got, model.labels("eval"))
    assert measure["value"] >= 0.99 and measure["accuracy"] >= 0.99


def test_recognizer_default_quantize_splits_the_badly_scaled_chains(fetched):
    """PP-OCRv3 rec: one uint8 scale for the depthwise inputs (channel peaks 0.4 to 600)
    leaves 3 dB output SQNR and 0.65 per-step agreement; quantize splits those chains
    into channel groups by default (21 dB, 0.966 at the time of writing, 28 evaluation
    bands; floors below that)."""
    model = fetched["ppocrv3_rec"]
    calib, evaluation = model.feeds("calib"), model.feeds("eval")
    float_sess = runtime.session(model.path, "disable_all")
    ref = [float_sess.run(None, f) for f in evaluation]
    scores = {}
    for split in (False, True):
        result = quantize(load_model(model.path), calib, report_samples=0, split_channels=split)
        sess = runtime.session(result.model, "all", threads=2)
        got = [sess.run(None, f) for f in evaluation]
        scores[split] = (sqnr_db([r[0] for r in ref], [g[0] for g in got]), zoo.task_measure(model.spec, ref, got)["value"])
        if split:
            assert any(n.startswith("split ") for n in result.report["notes"])
            assert result.report["fusion"]["integer_ops"].get("com.microsoft::QLinearConcat", 0) >= 8
    assert scores[False][0] < 8.0 and scores[False][1] < 0.8
    assert scores[True][0] >= 18.0 and scores[True][1] >= 0.95
