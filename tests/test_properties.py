"""Property-based tests (Hypothesis) on random small models and random bad input.

- Folding: the default optimize pipeline keeps every output of a random Conv/BN/Relu/Add/
  MatMul/Concat/Reshape graph within 1e-4 relative of the float model under onnxruntime at
  ORT_DISABLE_ALL, leaves a valid model, and folds every BatchNormalization it can see the
  rank of (each one left is reported).
- Quantizing: the QDQ model passes `onnx.checker` (full_check), loads and runs in
  onnxruntime at ORT_DISABLE_ALL and ORT_ENABLE_EXTENDED, and its report tells the truth: on
  the calibration samples the SQNR and the max error per output, recomputed here (own
  numpy, not zenith_onnx.testing), equal the reported ones, and the error against the
  original (unfolded) model stays within the reported max error plus the folding error.
- Malformed input: mutated model bytes, random ranges documents and random calibration
  arrays end in a `ZenithError` (a one-line message) or in a sound result, never in another
  exception, and no output ever holds a NaN, infinite, zero or denormal scale.

Profiles (tests/conftest.py): ``default`` 100 examples per test; ``--hypothesis-profile=long``
2,000. A failure prints the falsifying `GraphSpec` (its repr rebuilds the model), the
model in ONNX text form, and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model_strategies import GraphSpec, Op, calibration_samples, graphs
from zenith_onnx import runtime
from zenith_onnx.errors import ZenithError
from zenith_onnx.modelio import load_model
from zenith_onnx.passes import DEFAULT_OPTIMIZE, build_pipeline
from zenith_onnx.passes.fold_batchnorm import LEFT, FoldBatchNormPass
from zenith_onnx.quantize import quantize
from zenith_onnx.ranges import FORMAT, Ranges

# A numpy warning would be one more stderr line in the CLI: each is a failure here.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FOLD_RTOL = 1e-4


def _relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """``max|ref - got| / max|ref|`` (absolute when ``ref`` is all zero), as DESIGN.md measures folding."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    assert ref.shape == got.shape
    err, scale = float(np.max(np.abs(ref - got))), float(np.max(np.abs(ref)))
    return err / scale if scale > 0 else err


def _sqnr_db(refs: list[np.ndarray], gots: list[np.ndarray]) -> float:
    """``10 log10(sum ref^2 / sum (ref - got)^2)`` over all arrays, mapped like the report
    maps +-inf (999 / -999)."""
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in refs)
    noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(g, np.float64)) ** 2)) for r, g in zip(refs, gots))
    if noise == 0:
        return 999.0
    return 10.0 * np.log10(signal / noise) if signal > 0 else -999.0


def _outputs(session, feeds) -> dict[str, list[np.ndarray]]:
    runs = [runtime.run(session, feed) for feed in feeds]
    return {name: [run[name] for run in runs] for name in runs[0]}


def _assert_scales_sound(model: ir.Model) -> int:
    """Every Q/DQ scale is a finite, normal, positive float32; returns how many Q nodes."""
    quantize_nodes = 0
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1].const_value.numpy()
            assert scale.dtype == np.float32 and np.all(np.isfinite(scale)) and np.all(scale >= FLOAT32_TINY), (node.name, scale)
            quantize_nodes += node.op_type == "QuantizeLinear"
    return quantize_nodes


# ------------------------------------------------------------------ folding


@given(spec=graphs(require=("bn",)), inferred_shapes=st.booleans())
def test_folding_keeps_every_output(spec: GraphSpec, inferred_shapes: bool, tally):
    """With shapes known (as most exporters write them) every BatchNormalization goes;
    without, each one left is in the report with its reason. Outputs stay within 1e-4."""
    proto = spec.build()
    if inferred_shapes:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    note(spec.text)
    model = ir.serde.deserialize_model(proto)
    pipeline = build_pipeline(DEFAULT_OPTIMIZE)
    pipeline(model)
    tally["hypothesis examples: folding"] += 1

    fold = next(p for p in pipeline.passes if isinstance(p, FoldBatchNormPass))
    assert len(fold.report) == sum(op.kind == "bn" for op in spec.ops) >= 1
    left = [n.name for n in model.graph if n.op_type == "BatchNormalization"]
    # (a BatchNormalization left but unused is then removed by cleanup)
    assert set(left) <= {r.node for r in fold.report if r.action == LEFT}
    if inferred_shapes:
        assert not left, fold.report_lines()
    optimized = ir.serde.serialize_model(model)
    onnx.checker.check_model(optimized, full_check=True)

    feeds = calibration_samples(spec, 2, seed=spec.seed)
    expected = _outputs(runtime.session(proto.SerializeToString(), "disable_all"), feeds)
    got = _outputs(runtime.session(optimized.SerializeToString(), "disable_all"), feeds)
    assert list(got) == list(expected)
    for name in expected:
        for ref, out in zip(expected[name], got[name]):
            assert _relative_error(ref, out) <= FOLD_RTOL, (name, _relative_error(ref, out))


# ------------------------------------------------------------------ quantizing


@given(spec=graphs(require=("conv",)), samples=st.integers(1, 4), data_seed=st.integers(0, 2**16))
def test_quantized_model_is_valid_and_its_report_is_true(spec: GraphSpec, samples: int, data_seed: int, tally):
    proto = spec.build()
    note(spec.text)
    feeds = calibration_samples(spec, samples, seed=data_seed)
    result = quantize(ir.serde.deserialize_model(proto), feeds, report_samples=samples)
    tally["hypothesis examples: quantizing"] += 1

    qproto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(qproto, full_check=True)
    # Every op with an integer kernel gets Q/DQ around it, except the early layers kept float
    # for speed (a stem Conv and the light ops reading only it; their output is quantized
    # only for quantized readers): a model left as it was would fail here.
    float_for_speed = {x["node"] for x in result.report["left_float"] if "faster" in x["reason"]}
    compute = [n for n in result.float_model.graph if n.op_type in ("Conv", "MatMul", "Gemm", "Add", "Mul", "Concat")
               and n.name not in float_for_speed]
    assert (_assert_scales_sound(result.model) >= 1) == bool(compute)
    if result.report["quantized_ops"]:
        tally["quantizing examples with integer ops"] += 1
    for op_type, count in result.report["quantized_ops"].items():
        fed_by_dq = [n for n in result.model.graph if n.op_type == op_type and all(
            v is None or (v.producer() is not None and v.producer().op_type == "DequantizeLinear") for v in n.inputs)]
        assert len(fed_by_dq) == count, (op_type, count)

    qbytes = qproto.SerializeToString()
    quantized = _outputs(runtime.session(qbytes, "disable_all"), feeds)
    fused = _outputs(runtime.session(qbytes, "extended"), feeds)
    folded = _outputs(runtime.session(ir.serde.serialize_model(result.float_model).SerializeToString(), "disable_all"), feeds)
    original = _outputs(runtime.session(proto.SerializeToString(), "disable_all"), feeds)
    assert list(quantized) == list(fused) == list(folded) == list(original) == [o.name for o in proto.graph.output]

    accuracy = result.report["accuracy"]
    assert accuracy["samples"] == samples and list(accuracy["outputs"]) == list(original)
    refs = [r for name in folded for r in folded[name]]
    gots = [g for name in folded for g in quantized[name]]
    assert accuracy["sqnr_db"] == pytest.approx(_sqnr_db(refs, gots), rel=1e-9, abs=1e-9)
    for name in original:
        ref = np.concatenate([r.ravel() for r in folded[name]]).astype(np.float64)
        got = np.concatenate([g.ravel() for g in quantized[name]]).astype(np.float64)
        orig = np.concatenate([o.ravel() for o in original[name]]).astype(np.float64)
        reported = accuracy["outputs"][name]
        assert reported["max_abs_error"] == float(np.max(np.abs(ref - got)))
        assert reported["sqnr_db"] == pytest.approx(_sqnr_db([ref], [got]), rel=1e-9, abs=1e-9)
        fold_error = float(np.max(np.abs(orig - ref)))
        assert _relative_error(orig, ref) <= FOLD_RTOL
        # The error a user sees against the model they gave us is bounded by what we report.
        assert float(np.max(np.abs(orig - got))) <= reported["max_abs_error"] + fold_error
        assert all(np.isfinite(f).all() for f in fused[name])


def test_a_model_input_that_is_also_an_output_keeps_its_name():
    """Found by the property above: the input was renamed `x_float`, so no feed matched."""
    spec = GraphSpec(1, 1, 1, (Op("bn"),), extra_output=0)
    result = quantize(ir.serde.deserialize_model(spec.build()), calibration_samples(spec, 2, 0), report_samples=2)
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert [v.name for v in result.model.graph.outputs] == ["batchnormalization_0", "x"]
    assert result.report["accuracy"]["outputs"]["x"]["max_abs_error"] == 0.0  # passed through, exact


# ------------------------------------------------------------------ malformed model bytes

_mutation = st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "delete"]), st.integers(0, 2**20), st.integers(0, 255))


def _mutate(data: bytes, mutations) -> bytes:
    data = bytearray(data)
    for kind, position, value in mutations:
        if not data:
            break
        position %= len(data)
        if kind == "flip":
            data[position] ^= 1 << (value % 8)
        elif kind == "set":
            data[position] = value
        elif kind == "cut":
            del data[position:]
        elif kind == "insert":
            data[position:position] = bytes([value])
        else:
            del data[position:position + 1 + value % 8]
    return bytes(data)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder for the files of every example (module-scoped, as Hypothesis wants)."""
    return tmp_path_factory.mktemp("examples")


@given(spec=graphs(max_ops=4), mutations=st.lists(_mutation, min_size=1, max_size=3))
def test_mutated_model_bytes_are_refused_by_name_or_handled(scratch, spec: GraphSpec, mutations, tally):
    """Flipped, overwritten, inserted, deleted and cut bytes: `load_model` refuses the file
    with a message naming it, or loads it; a loaded model is optimized and quantized, or
    refused with a `ZenithError`: never another exception."""
    path = scratch / "m.onnx"
    path.write_bytes(_mutate(spec.build().SerializeToString(), mutations))
    tally["hypothesis examples: mutated model files"] += 1
    try:
        model = load_model(path)
    except ZenithError as e:
        assert str(e).startswith(f"{path}: "), e
        return
    tally["mutated model files that still load"] += 1
    try:
        build_pipeline(DEFAULT_OPTIMIZE)(model)
        quantize(load_model(path), calibration_samples(spec, 2, seed=0), report_samples=2)
    except ZenithError:
        pass


# ------------------------------------------------------------------ malformed ranges

_finite = st.one_of(
    st.floats(-1e3, 1e3), st.floats(-1e-30, 1e-30), st.integers(-10, 10),
    st.sampled_from([0, 0.0, -0.0, 5e-324, 1e-45, 3.4e38, -3.4e38]),
)
_number = st.one_of(
    _finite, _finite, _finite,
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**40), 10**40),
    st.sampled_from([3.5e38, -1e300]), st.booleans(), st.none(), st.text(max_size=3),
)
_entry = st.integers(0, 9).flatmap(lambda k: st.tuples(_finite, _finite).map(
    lambda t: {"min": min(t), "max": max(t)}) if k < 8 else st.one_of(  # 80 % well formed
    st.fixed_dictionaries({"min": _number, "max": _number}),
    st.dictionaries(st.sampled_from(["min", "max", "mean"]), _number, max_size=3),
    _number, st.lists(_number, max_size=2),
))
_TENSORS = ["x", "conv_0", "relu_1", "nowhere"]


@st.composite
def _ranges_documents(draw):
    doc = {
        "format": draw(st.sampled_from([FORMAT] * 8 + ["zenith-onnx-ranges/2", None])),
        "method": draw(st.sampled_from(["minmax"] * 8 + ["", None])),
        "tensors": draw(st.dictionaries(st.sampled_from(_TENSORS), _entry, max_size=4) if draw(st.integers(0, 9)) else _number),
    }
    if not draw(st.integers(0, 4)):
        doc["scales"] = draw(st.one_of(st.dictionaries(st.sampled_from(_TENSORS), _number, max_size=3), _number))
    if not draw(st.integers(0, 9)):
        del doc[draw(st.sampled_from(["format", "method", "tensors"]))]
    return doc


_RANGES_MODEL = GraphSpec(8, 3, 3, (Op("conv", channels=4, kernel=3, pad=True, bias=True), Op("relu", a=1)))


@given(doc=_ranges_documents())
def test_random_ranges_files_are_refused_or_give_sound_scales(scratch, doc, tally):
    """Any ranges document: `Ranges.load` refuses it in one line naming the file, or the
    model quantized with it has only finite, normal scales."""
    path = scratch / "r.json"
    path.write_text(json.dumps(doc, allow_nan=True, default=str))
    tally["hypothesis examples: ranges files"] += 1
    try:
        ranges = Ranges.load(path)
    except ZenithError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), e
        return
    tally["ranges files accepted"] += 1
    for r in ranges.tensors.values():
        assert np.isfinite([r.min, r.max]).all() and r.min <= r.max and max(abs(r.min), abs(r.max)) <= 3.4028235e38
    result = quantize(ir.serde.deserialize_model(_RANGES_MODEL.build()), ranges=ranges, check_fusion=False)
    # x and relu_1 (the range of the Conv's output, its Relu absorbed) are the observed tensors
    assert (_assert_scales_sound(result.model) >= 1) == bool(ranges.tensors.keys() & {"x", "relu_1"})
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)


# ------------------------------------------------------------------ malformed calibration arrays

_DATA_MODEL = GraphSpec(8, 3, 3, (
    Op("conv", channels=4, kernel=3, pad=True, bias=True), Op("bn", a=1), Op("relu", a=2),
    Op("reshape", a=3), Op("matmul", a=4, channels=3),
))
_DTYPES = [np.float32] * 4 + [np.float64, np.float16, np.int8, np.int32, np.int64, np.uint8, np.bool_, np.complex64]
_FINITE_SPECIAL = [0.0, -0.0, 1e-40, -1e-42, 1e-30, 1e20, -1e20]
_SPECIAL = [*_FINITE_SPECIAL, 1e38, -1e38, 3e38, 1e300, np.nan, np.inf, -np.inf]


@st.composite
def _calibration_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    count = draw(st.sampled_from([1, 2, 3, 3, 0]))
    good = [(count, 1, 8, 3, 3), (count, 8, 3, 3)]
    shape = draw(st.sampled_from(good * 4 + [(count, 8, 3, 2), (count, 8, 3), (count, 2, 8, 3, 3)]))
    if dtype.kind == "f":  # drawn as float64, then cast (what overflows a float16 becomes inf)
        fill = draw(st.sampled_from([None, None, 0.0, 1e-40, 1e38]))
        if fill is not None:
            values = np.full(shape, fill)
        else:
            special = st.sampled_from(_SPECIAL if not draw(st.integers(0, 2)) else _FINITE_SPECIAL)
            values = draw(hnp.arrays(np.float64, shape, elements=st.one_of(st.floats(-4, 4), special)))
        with np.errstate(over="ignore"):
            array = values.astype(dtype)
    else:  # integers mostly small (exact in float32), sometimes any
        elements = st.integers(-100, 100) if dtype.kind in "iu" and draw(st.integers(0, 2)) else hnp.from_dtype(dtype)
        if dtype.kind == "u":
            elements = elements.filter(lambda v: v >= 0)
        array = draw(hnp.arrays(dtype, shape, elements=elements))
    return {"x": array} if draw(st.integers(0, 19)) else {"x": array, "extra": array}


@given(arrays=_calibration_arrays())
def test_random_calibration_arrays_are_refused_or_give_sound_scales(arrays, tally):
    """Any dtype, shape and values (NaN, Inf, 1e38, denormals, zeros, huge integers): a
    `ZenithError` in one line, or a model whose every scale, int32 bias scales included, is
    finite and normal and whose reported accuracy is a number."""
    tally["hypothesis examples: calibration arrays"] += 1
    try:
        result = quantize(ir.serde.deserialize_model(_DATA_MODEL.build()), arrays, report_samples=3, check_fusion=False)
    except ZenithError as e:
        assert "\n" not in str(e), e
        return
    tally["calibration arrays accepted"] += 1
    assert _assert_scales_sound(result.model) >= 1
    assert any(n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT32 for n in result.model.graph)
    assert np.isfinite(result.report["accuracy"]["sqnr_db"])


@given(
    base=st.floats(-1e30, 1e30, allow_nan=False, allow_infinity=False),
    spread_exp=st.floats(-8.0, 3.0),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_histogram_observers_bin_any_band_soundly(base, spread_exp, sizes, dtype, seed, tally):
    """Batches in a band ``base + [0, spread)`` at any distance from 0 and any width
    (down to ten float32 ulps, where float32 arithmetic cannot place a value to a bin):
    every value is counted, and every method's range lies in ``[min, max]`` with lo <= hi."""
    from zenith_onnx.observers import observer_for

    rng = np.random.default_rng(seed)
    spread = max(abs(base), 1e-30) * 10.0**spread_exp
    with np.errstate(over="ignore"):
        batches = [(base + rng.random(n) * spread * (1 + k)).astype(dtype) for k, n in enumerate(sizes)]
    if not all(np.isfinite(b).all() for b in batches):
        return
    data = np.concatenate(batches).astype(np.float64)
    for method in ("percentile", "entropy", "mse"):
        obs = observer_for(method, percentile=99.0)
        for b in batches:
            obs.observe(b)
        h = obs.histogram
        counted = h._point_count if h.counts is None else int(h.counts.sum())
        assert counted == data.size, method
        lo, hi = obs.compute_range()
        assert data.min() <= lo <= hi <= data.max(), (method, lo, hi)
    tally["histogram bands observed"] += 1
