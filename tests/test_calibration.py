"""Calibration end to end: the observe pass, the runner, ranges JSON and the CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from zenith_onnx import passes, runtime
from zenith_onnx.calibration import calibrate, calibrate_file
from zenith_onnx.cli import main
from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.observers import DEFAULT_BINS
from zenith_onnx.passes.observe import ObservePass
from zenith_onnx.ranges import FORMAT, MIN_RANGE_WIDTH, Ranges, TensorRange, safe_range

METHODS = ("minmax", "moving_average", "percentile", "entropy", "mse")


def _proto(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    """No value_info: intermediate tensors have unknown types, as in many exports."""
    proto = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[helper.make_opsetid("", opset)]
    )
    proto.ir_version = 8
    return proto


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def _cnn_proto(batch="N") -> onnx.ModelProto:
    """x -> Conv -> Relu -> MaxPool -> Reshape (shape from Shape/Gather/Concat) -> Gemm -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(rng.standard_normal((5, 64)).astype(np.float32), "fc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv_node", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu_node"),
        helper.make_node("MaxPool", ["relu"], ["pool"], name="pool_node", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Shape", ["pool"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Concat", ["batch", "minus_one"], ["flat_shape"], axis=0),
        helper.make_node("Reshape", ["pool", "flat_shape"], ["flat"], name="reshape_node"),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], name="gemm_node", transB=1),
    ]
    return _proto(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])],
        inits,
    )


CNN_TENSORS = ["x", "conv", "relu", "pool", "flat", "y"]


def _cnn_samples(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": (rng.standard_normal((1, 3, 8, 8)) * (1 + i % 3)).astype(np.float32)} for i in range(n)]


def _all_activations(proto: onnx.ModelProto, names: list[str], samples) -> dict[str, np.ndarray]:
    """Direct computation: every tensor as a graph output of a protobuf copy, all samples
    concatenated."""
    wide = onnx.ModelProto()
    wide.CopyFrom(proto)
    existing = {o.name for o in wide.graph.output}
    wide.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
    session = runtime.session(wide.SerializeToString())
    got: dict[str, list] = {n: [] for n in names}
    for feed in samples:
        for name, value in zip(names, session.run(names, feed)):
            got[name].append(value.ravel())
    return {n: np.concatenate(v).astype(np.float64) for n, v in got.items()}


# ------------------------------------------------------------------ observe pass


def test_observe_pass_is_registered_and_float_preserving():
    spec = next(s for s in passes.available() if s.name == "observe")
    assert spec.float_preserving
    model = _ir(_cnn_proto())
    reference = _ir(_cnn_proto())
    pipeline = passes.build_pipeline(["observe"])
    pipeline(model)
    assert [o.name for o in model.graph.outputs][:5] == ["y", "conv", "relu", "pool", "shape"]
    feeds = _cnn_samples(2)
    ref = runtime.run(runtime.session(reference), feeds[0])["y"]
    got = runtime.run(runtime.session(model), feeds[0], ["y"])["y"]
    np.testing.assert_array_equal(ref, got)


def test_default_selection_skips_constants_and_integer_tensors():
    model = _ir(_cnn_proto())
    observe = ObservePass()
    observe(model)
    # Gather/Concat/Reshape touch int64 tensors of unknown type: they are candidates
    # here (onnxruntime reports their type) and dropped by calibrate.
    assert set(observe.outputs) == {"conv", "relu", "pool", "flat", "y", "shape", "batch", "flat_shape"}
    assert observe.inputs == ["x"] and observe.constants == [] and observe.skipped == {}
    ranges = calibrate(_ir(_cnn_proto()), _cnn_samples(2))
    assert list(ranges.tensors) == ["conv", "relu", "pool", "flat", "y", "x"]


def test_named_tensors_inputs_and_constants():
    observe = ObservePass(["relu", "x", "fc"])
    model = _ir(_cnn_proto())
    observe(model)
    assert (observe.outputs, observe.inputs, observe.constants) == (["relu"], ["x"], ["fc"])
    ranges = calibrate(_ir(_cnn_proto()), _cnn_samples(3), tensors=["relu", "x", "fc"], method="minmax")
    fc = numpy_helper.to_array(next(i for i in _cnn_proto().graph.initializer if i.name == "fc"))
    assert ranges.tensors["fc"] == TensorRange(float(fc.min()), float(fc.max()))
    with pytest.raises(UsageError, match="tensor 'nope' to observe is not in the model"):
        calibrate(_ir(_cnn_proto()), _cnn_samples(1), tensors=["nope"])


# ------------------------------------------------------------------ runner against numpy


def test_minmax_equals_numpy_on_every_tensor_and_model_is_unchanged():
    proto = _cnn_proto()
    model = _ir(proto)
    before = runtime.model_bytes(model)
    samples = _cnn_samples(4)
    ranges = calibrate(model, samples, method="minmax")
    assert runtime.model_bytes(model) == before
    direct = _all_activations(proto, CNN_TENSORS, samples)
    # The reference runs at ORT_DISABLE_ALL, calibration at ORT_ENABLE_ALL: onnxruntime
    # picks other convolution kernels there (another summation order), so the activations
    # agree within float32 rounding of the sums, not bit for bit. The observer itself is
    # exact (test_observers); the input, which onnxruntime does not compute, is too.
    assert ranges.tensors["x"] == TensorRange(float(direct["x"].min()), float(direct["x"].max()))
    for name in CNN_TENSORS:
        r = ranges.tensors[name]
        np.testing.assert_allclose([r.min, r.max], [direct[name].min(), direct[name].max()], rtol=1e-6, err_msg=name)
    assert ranges.method == "minmax"


@pytest.mark.parametrize("percentile", [99.0, 99.99])
def test_percentile_within_one_bin_of_numpy(percentile):
    proto = _cnn_proto()
    samples = _cnn_samples(12)
    ranges = calibrate(_ir(proto), samples, method="percentile", percentile=percentile)
    direct = _all_activations(proto, CNN_TENSORS, samples)
    for name in CNN_TENSORS:
        data = direct[name]
        # After growth the data fills at least half of the bins.
        bin_width = 2 * (data.max() - data.min()) / (DEFAULT_BINS - 4)
        r = ranges.tensors[name]
        assert abs(r.min - np.percentile(data, 100 - percentile)) <= bin_width, name
        assert abs(r.max - np.percentile(data, percentile)) <= bin_width, name


@pytest.mark.parametrize("method", METHODS)
def test_every_method_stays_inside_the_observed_range(method):
    proto = _cnn_proto()
    samples = _cnn_samples(6)
    minmax = calibrate(_ir(proto), samples, method="minmax")
    ranges = calibrate(_ir(proto), samples, method=method, activation_bits=8)
    assert ranges.method == method and list(ranges.tensors) == list(minmax.tensors)
    for name, r in ranges.tensors.items():
        m = minmax.tensors[name]
        assert m.min <= r.min < r.max <= m.max, (name, r, m)
    assert 0.0 <= ranges.tensors["relu"].min < 1e-3


@pytest.mark.parametrize("method", ["percentile", "moving_average"])
def test_relu_and_reshape_outputs_are_derived_not_fetched(method, caplog, monkeypatch):
    derived = ["relu", "flat"]
    sessions, real_session = [], runtime.session

    def spy(model, level="disable_all", **kwargs):
        sessions.append(([v.name for v in model.graph.outputs], level))
        return real_session(model, level, **kwargs)

    monkeypatch.setattr(runtime, "session", spy)
    with caplog.at_level(logging.INFO, logger="zenith_onnx.calibration"):
        ranges = calibrate(_ir(_cnn_proto()), _cnn_samples(4), method=method)
    # Reshape's output holds its input's values; Relu's state follows from its input's.
    assert f"observing 6 tensors: {5 - len(derived)} fetched from onnxruntime, {len(derived)} derived" in caplog.text
    assert ranges.tensors["flat"] == ranges.tensors["pool"]
    # Derived tensors are not even graph outputs of the session (an output blocks
    # fusions); the model's own output stays; the session runs optimized.
    [(outputs, level)] = sessions
    assert outputs[0] == "y" and not set(derived) & set(outputs) and level == "all"
    assert {"conv", "pool"} <= set(outputs)


def test_dynamic_batch_with_batch_size_above_one_matches_one_at_a_time():
    # minmax: exact whatever the batching (a histogram's window grows batch by batch)
    samples = _cnn_samples(10)
    one = calibrate(_ir(_cnn_proto()), samples, batch_size=1, method="minmax")
    four = calibrate(_ir(_cnn_proto()), samples, batch_size=4, method="minmax")
    assert one.tensors == four.tensors
    stacked = {"x": np.concatenate([s["x"] for s in samples])}
    assert calibrate(_ir(_cnn_proto()), stacked, batch_size=3, method="minmax").tensors == one.tensors


def _two_input_proto(b_dim="N") -> onnx.ModelProto:
    return _proto(
        [
            helper.make_node("Add", ["a", "b"], ["sum"], name="add_node"),
            helper.make_node("Mul", ["sum", "a"], ["prod"]),
            helper.make_node("Concat", ["prod", "b"], ["out"], axis=1),
        ],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", "K"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", b_dim])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", None])],
    )


def test_multi_input_model():
    rng = np.random.default_rng(3)
    samples = [{"a": rng.standard_normal((1, 4)).astype(np.float32),
                "b": rng.standard_normal((1, 4)).astype(np.float32) * 3} for _ in range(5)]
    proto = _two_input_proto()
    ranges = calibrate(_ir(proto), samples, batch_size=2, method="minmax")
    names = ["a", "b", "sum", "prod", "out"]
    assert list(ranges.tensors) == ["sum", "prod", "out", "a", "b"]
    direct = _all_activations(proto, names, samples)
    for name in names:
        assert ranges.tensors[name] == TensorRange(float(direct[name].min()), float(direct[name].max()))


@pytest.mark.parametrize("method", ["minmax", "percentile"])  # feeds read by this thread / the worker
def test_onnxruntime_failure_names_the_samples(method):
    samples = [{"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)},
               {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 3), np.float32)},  # symbolic dims pass
               {"a": np.ones((1, 4), np.float32), "b": np.ones((1, 4), np.float32)}]
    with pytest.raises(DataError, match="onnxruntime failed on calibration samples 1..1: .*add_node"):
        calibrate(_ir(_two_input_proto("M")), samples, method=method)


def test_data_sources_give_the_same_ranges(tmp_path):
    samples = _cnn_samples(5)
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.concatenate([s["x"] for s in samples]))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(samples)

        def get_next(self):
            return next(self.items, None)

    results = [calibrate(_ir(_cnn_proto()), source).tensors
               for source in (samples, iter(samples), Reader(), str(path), path)]
    assert all(r == results[0] for r in results)


# ------------------------------------------------------------------ degenerate and bad activations


def test_constant_and_empty_activations_get_safe_ranges_and_a_warning(caplog):
    proto = _proto(
        [
            helper.make_node("Mul", ["x", "zeros"], ["zeroed"]),
            helper.make_node("Add", ["zeroed", "three"], ["threes"]),
            helper.make_node("Slice", ["x", "two", "two", "one"], ["empty"]),
            helper.make_node("Relu", ["empty"], ["empty_relu"]),
            helper.make_node("Concat", ["threes", "empty_relu"], ["y"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.zeros(4, np.float32), "zeros"),
         numpy_helper.from_array(np.full(4, 3.0, np.float32), "three"),
         numpy_helper.from_array(np.array([2], np.int64), "two"),
         numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    samples = [{"x": np.ones((1, 4), np.float32)}, {"x": np.full((1, 4), 2.0, np.float32)}]
    for method in METHODS:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            ranges = calibrate(_ir(proto), samples, method=method)
        assert ranges.tensors["zeroed"] == TensorRange(0.0, MIN_RANGE_WIDTH)
        assert ranges.tensors["threes"] == TensorRange(0.0, 3.0)
        assert ranges.tensors["empty"] == ranges.tensors["empty_relu"] == TensorRange(0.0, MIN_RANGE_WIDTH)
        assert "received no values" in caplog.text and "'empty'" in caplog.text
        assert "constant on the calibration data" in caplog.text and "'zeroed'" in caplog.text
        assert all(np.isfinite([r.min, r.max]).all() for r in ranges.tensors.values())


def test_nan_activation_names_tensor_and_node():
    proto = _proto(
        [helper.make_node("Sub", ["x", "ten"], ["shifted"], name="sub_node"),
         helper.make_node("Sqrt", ["shifted"], ["root"], name="sqrt_node")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("root", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array(10.0, np.float32), "ten")],
    )
    samples = [{"x": np.full((1, 2), 20.0, np.float32)}, {"x": np.ones((1, 2), np.float32)}]
    with pytest.raises(DataError, match=r"activation 'root' \(output of node 'sqrt_node', Sqrt\) has NaN values "
                                        r"in sample 1;"):
        calibrate(_ir(proto), samples)


@pytest.mark.parametrize("method", ["minmax", "entropy"])  # feeds read by this thread / the worker
def test_bad_data_error_reaches_the_caller_from_either_thread(method):
    x = np.zeros((3, 3, 8, 8), np.float32)
    x[2, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="input 'x' has NaN values in sample 2"):
        calibrate(_ir(_cnn_proto()), {"x": x}, method=method)


def test_feed_reading_switches_threads_without_reading_twice_at_once(monkeypatch):
    """Reading goes to whichever thread had less to do on the last batch. Observing is
    made slow on every other batch, so the reader changes thread at almost every batch:
    the feeds (a generator, which raises if entered from two threads at once) are still
    read one at a time, in order, each once, and the ranges equal those of a plain run."""
    import threading
    import time

    from zenith_onnx import calibration

    samples = _cnn_samples(12)
    readers, observed = [], []

    def feeds():
        for i, s in enumerate(samples):
            readers.append(threading.current_thread().name)
            time.sleep(0.002)  # widen the window for a second reader
            yield s

    feed = calibration._Observation.feed

    def slow_every_other(self, name, array, span):
        if name == "x":
            observed.append(span)
            if span[0] % 2:
                time.sleep(0.03)  # much longer than the worker's inference
        feed(self, name, array, span)

    monkeypatch.setattr(calibration._Observation, "feed", slow_every_other)
    ranges = calibrate(_ir(_cnn_proto()), feeds(), method="minmax")
    assert observed == [(i, i + 1) for i in range(12)]
    assert len({r.startswith("zenith-calibrate") for r in readers}) == 2  # both threads read
    monkeypatch.setattr(calibration._Observation, "feed", feed)
    assert ranges.tensors == calibrate(_ir(_cnn_proto()), samples, method="minmax").tensors


def test_subgraph_tensors_are_skipped_with_a_warning(caplog):
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["inner_relu"])], "then", [],
        [helper.make_tensor_value_info("inner_relu", TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["inner_sigmoid"])], "else", [],
        [helper.make_tensor_value_info("inner_sigmoid", TensorProto.FLOAT, None)],
    )
    proto = _proto(
        [helper.make_node("Mul", ["x", "x"], ["sq"]),
         helper.make_node("If", ["flag"], ["branch"], name="if_node", then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Add", ["branch", "sq"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    samples = [{"x": np.ones((1, 3), np.float32), "flag": np.array(True)}]
    with caplog.at_level(logging.WARNING):
        ranges = calibrate(_ir(proto), samples)
    assert "inner_relu" in caplog.text and "inner_sigmoid" in caplog.text and "subgraph" in caplog.text
    assert set(ranges.tensors) == {"x", "sq", "branch", "y"}
    assert set(ranges.skipped) == {"inner_relu", "inner_sigmoid"} and "if_node" in ranges.skipped["inner_relu"]
    named = calibrate(_ir(proto), samples, tensors=["inner_relu", "sq"])
    assert set(named.tensors) == {"sq"} and "If" in named.skipped["inner_relu"]


def test_bad_options():
    for kwargs, message in (({"method": "kl"}, "unknown calibration method 'kl'"),
                            ({"percentile": 30.0}, "percentile must be in"),
                            ({"activation_bits": 1}, "activation bits")):
        with pytest.raises(UsageError, match=message):
            calibrate(_ir(_cnn_proto()), _cnn_samples(1), **kwargs)


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys):
    calibrate(_ir(_cnn_proto()), _cnn_samples(3))
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    calibrate(_ir(_cnn_proto()), _cnn_samples(3), progress=True)
    assert "calibrating" in capsys.readouterr().err


# ------------------------------------------------------------------ ranges file


def test_ranges_roundtrip(tmp_path):
    ranges = Ranges("entropy", {"a": TensorRange(-1.5, 2.0), "b/c:0": TensorRange(0.0, 1e-3)}, scales={"a": 0.01})
    path = tmp_path / "r.json"
    ranges.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["tensors"]["a"] == {"min": -1.5, "max": 2.0}
    assert Ranges.load(path) == ranges
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": "other/1", "method": "minmax", "tensors": {}}', "format is 'other/1'"),
        ('{"format": "zenith-onnx-ranges/1", "tensors": {}}', "'method' must be"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax"}', "'tensors' must be"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {"a": {"min": 1}}}', "tensor 'a' must be"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {"a": {"min": 2, "max": 1}}}',
         "min 2.0 > max 1.0"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {"a": {"min": NaN, "max": 1}}}',
         "not valid JSON"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {"a": {"min": "0", "max": 1}}}',
         "tensor 'a' min must be a finite number"),
        ('{"format": "zenith-onnx-ranges/1", "method": "minmax", "tensors": {}, "scales": {"a": -1}}',
         "scale of 'a' must be positive"),
    ],
)
def test_bad_ranges_files(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        Ranges.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        Ranges.load(tmp_path / "missing.json")


def test_saving_non_finite_ranges_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        Ranges("minmax", {"a": TensorRange(float("nan"), 1.0)}).save(tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_safe_range():
    assert safe_range(-1.0, 2.0) == (TensorRange(-1.0, 2.0), False)
    assert safe_range(0.0, 0.0) == (TensorRange(0.0, MIN_RANGE_WIDTH), True)
    assert safe_range(5.0, 5.0) == (TensorRange(0.0, 5.0), True)
    assert safe_range(-2.0, -2.0) == (TensorRange(-2.0, 0.0), True)
    assert safe_range(-1e-9, -1e-9) == (TensorRange(-MIN_RANGE_WIDTH, 0.0), True)
    with pytest.raises(ValueError):
        safe_range(float("nan"), 1.0)


# ------------------------------------------------------------------ calibrate_file and the CLI


@pytest.fixture
def cnn_files(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(_cnn_proto(), model)
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.concatenate([s["x"] for s in _cnn_samples(6)]))
    return model, data


def test_cli_calibrate_writes_ranges_json(cnn_files, tmp_path, capsys):
    model, data = cnn_files
    out = tmp_path / "ranges.json"
    assert main(["calibrate", str(model), "--data", str(data), "-o", str(out), "--method", "entropy"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "6 tensor ranges (entropy) from 6 samples" in printed[0]
    ranges = Ranges.load(out)
    assert ranges.method == "entropy" and set(ranges.tensors) == set(CNN_TENSORS)
    direct = calibrate_file(model, data, tmp_path / "again.json", method="entropy")
    assert direct.tensors == ranges.tensors


def test_cli_bad_npz_exit_2_one_line_no_output(cnn_files, tmp_path, capsys):
    model, _ = cnn_files
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((2, 3, 8, 8), np.float32))
    out = tmp_path / "ranges.json"
    assert main(["calibrate", str(model), "--data", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zenith-onnx: error:") and "key 'image'" in err[0]
    assert not out.exists() and not list(tmp_path.glob(".ranges.json*"))


def test_cli_nan_in_data_and_bad_method(cnn_files, tmp_path, capsys):
    model, _ = cnn_files
    bad = tmp_path / "nan.npz"
    x = np.zeros((3, 3, 8, 8), np.float32)
    x[2, 0, 0, 0] = np.nan
    np.savez(bad, x=x)
    out = tmp_path / "ranges.json"
    assert main(["calibrate", str(model), "--data", str(bad), "-o", str(out)]) == 2
    assert "input 'x' has NaN values in sample 2" in capsys.readouterr().err
    assert not out.exists()
    assert main(["calibrate", str(model), "--data", str(bad), "-o", str(out), "--method", "kl"]) == 2
    assert "invalid choice: 'kl'" in capsys.readouterr().err
    assert main(["calibrate", str(model), "--data", str(bad), "-o", str(model)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err


def test_cli_as_a_process(cnn_files, tmp_path):
    model, data = cnn_files
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "zenith_onnx", "calibrate", str(model), "--data", str(data), "-o", str(out),
         "--method", "percentile", "--percentile", "99.9", "--batch-size", "4"],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and Ranges.load(out).method == "percentile"


def test_thread_count_changes_no_range(monkeypatch):
    from zenith_onnx.runtime import THREADS_ENV, default_threads, using_threads

    model, samples = _ir(_cnn_proto()), _cnn_samples(6)
    one = calibrate(model, samples, method="percentile", threads=1)
    assert calibrate(model, samples, method="percentile", threads=2).tensors == one.tensors
    monkeypatch.setenv(THREADS_ENV, "0")
    assert default_threads() == 0
    with using_threads(2):
        with using_threads(None):
            assert default_threads() == 2
        assert calibrate(model, samples, method="percentile").tensors == one.tensors
    assert default_threads() == 0
    monkeypatch.setenv(THREADS_ENV, "2.5")
    with pytest.raises(UsageError, match="ZENITH_ONNX_THREADS"):
        calibrate(model, samples)
    with pytest.raises(UsageError, match="threads"):
        calibrate(model, samples, threads=-2)
