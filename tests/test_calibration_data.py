"""Calibration data: npz files, mappings, iterables and readers, validated against a model."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader

from zenith_onnx.calibration_data import as_feeds, load_npz, model_inputs
from zenith_onnx.errors import DataError, UsageError


def _model(inputs: dict[str, tuple[int, list]]) -> ir.Model:
    """One Identity per input: ``{name: (onnx elem type, shape)}``."""
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in inputs]
    outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, (t, s) in inputs.items()]
    proto = helper.make_model(
        helper.make_graph(nodes, "g", graph_inputs, outputs), opset_imports=[helper.make_opsetid("", 17)]
    )
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


IMAGE = _model({"x": (TensorProto.FLOAT, [1, 3, 4, 4])})
DYNAMIC = _model({"x": (TensorProto.FLOAT, ["N", 3, 4, 4])})
TWO = _model({"a": (TensorProto.FLOAT, ["N", 5]), "ids": (TensorProto.INT64, ["N", 2])})


def _collect(feeds) -> list[dict[str, np.ndarray]]:
    return [dict(f) for f in feeds]


def _save(tmp_path, compressed=False, **arrays):
    path = tmp_path / "calib.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_model_inputs():
    (spec,) = model_inputs(DYNAMIC)
    assert spec.name == "x" and spec.dtype == np.float32 and spec.shape == (None, 3, 4, 4)
    assert spec.dynamic_batch and spec.batch_of_one and spec.describe() == "(?, 3, 4, 4)"


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_and_without_the_batch_axis_of_one(tmp_path, compressed):
    x = np.random.default_rng(0).standard_normal((6, 3, 4, 4)).astype(np.float32)
    with_axis = load_npz(_save(tmp_path, compressed, x=x[:, None]), IMAGE)
    assert with_axis.count == 6
    a = _collect(as_feeds(with_axis, IMAGE))
    b = _collect(as_feeds(_save(tmp_path, compressed, x=x), IMAGE))
    assert len(a) == len(b) == 6
    for i in range(6):
        assert a[i]["x"].shape == b[i]["x"].shape == (1, 3, 4, 4)
        np.testing.assert_array_equal(a[i]["x"][0], x[i])
        np.testing.assert_array_equal(b[i]["x"][0], x[i])


def test_npz_fortran_order(tmp_path):
    x = np.asfortranarray(np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32))
    feeds = _collect(as_feeds(_save(tmp_path, x=x), IMAGE))
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), x)


def test_npz_batches_on_dynamic_axis(tmp_path):
    x = np.arange(7 * 48, dtype=np.float32).reshape(7, 3, 4, 4)
    feeds = as_feeds(_save(tmp_path, x=x), DYNAMIC, batch_size=3)
    assert feeds.count == 7 and feeds.batch_size == 3
    got = []
    for feed in feeds:
        got.append((feeds.span, feed["x"].shape))
    assert got == [((0, 3), (3, 3, 4, 4)), ((3, 6), (3, 3, 4, 4)), ((6, 7), (1, 3, 4, 4))]


def test_npz_rows_that_are_batches_concatenate(tmp_path):
    x = np.arange(4 * 2 * 48, dtype=np.float32).reshape(4, 2, 3, 4, 4)  # 4 samples of batch 2
    feeds = _collect(as_feeds(_save(tmp_path, x=x), DYNAMIC, batch_size=2))
    assert [f["x"].shape for f in feeds] == [(4, 3, 4, 4), (4, 3, 4, 4)]
    np.testing.assert_array_equal(feeds[1]["x"], x[2:].reshape(4, 3, 4, 4))


def test_batch_size_on_a_static_batch_model_warns_and_goes_one_by_one(tmp_path, caplog):
    x = np.zeros((3, 3, 4, 4), np.float32)
    with caplog.at_level(logging.WARNING):
        feeds = as_feeds(_save(tmp_path, x=x), IMAGE, batch_size=4)
    assert feeds.batch_size == 1 and len(_collect(feeds)) == 3
    assert "input 'x'" in caplog.text and "one at a time" in caplog.text


def test_multi_input_npz_and_int_inputs(tmp_path):
    a = np.ones((5, 5), np.float32)
    ids = np.arange(10, dtype=np.int32).reshape(5, 2)  # int32 -> int64 is lossless
    feeds = _collect(as_feeds(_save(tmp_path, a=a, ids=ids), TWO))
    assert len(feeds) == 5
    assert feeds[2]["ids"].dtype == np.int64 and feeds[2]["ids"].tolist() == [[4, 5]]
    assert feeds[2]["a"].shape == (1, 5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"a": np.ones((5, 5), np.float32)}, "no data for model input 'ids'"),
        ({"a": np.ones((5, 5), np.float32), "ids": np.ones((5, 2), np.int64), "b": np.ones(5)},
         "key 'b' is not an input of the model"),
        ({"a": np.ones((5, 7), np.float32), "ids": np.ones((5, 2), np.int64)},
         r"input 'a' has shape \(5, 7\); the model expects \(\?, 5\), so the array should be "
         r"\(N, \?, 5\) or \(N, 5\)"),
        ({"a": np.ones((5, 1, 5, 1), np.float32), "ids": np.ones((5, 2), np.int64)}, "input 'a' has shape"),
        ({"a": np.ones((5, 5), np.float32), "ids": np.ones((4, 2), np.int64)}, "different numbers of samples"),
        ({"a": np.ones((0, 5), np.float32), "ids": np.ones((0, 2), np.int64)}, "no samples"),
        ({"a": np.ones((5, 5), np.float32), "ids": np.ones((5, 2), np.float32)},
         "input 'ids' is float32 but the model wants int64; refusing to round"),
        ({"a": np.ones((5, 5), np.complex64), "ids": np.ones((5, 2), np.int64)}, "not a numeric array"),
        ({"a": np.float32(1.0), "ids": np.ones((5, 2), np.int64)}, "is a scalar"),
    ],
)
def test_npz_problems_are_one_line_data_errors(tmp_path, arrays, message):
    path = _save(tmp_path, **arrays)
    with pytest.raises(DataError, match=message) as info:
        _collect(as_feeds(path, TWO))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_static_dim_mismatch_names_the_expected_shape(tmp_path):
    path = _save(tmp_path, x=np.ones((2, 3, 5, 4), np.float32))
    with pytest.raises(DataError, match=r"input 'x' has shape \(2, 3, 5, 4\); the model expects \(1, 3, 4, 4\)"):
        load_npz(path, IMAGE)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([object(), 1], dtype=object))
    with pytest.raises(DataError, match="Python objects"):
        load_npz(path, IMAGE)


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_inputs_name_the_sample(tmp_path, bad, kind):
    x = np.zeros((6, 3, 4, 4), np.float32)
    x[4, 1, 2, 3] = bad
    with pytest.raises(DataError, match=f"input 'x' has {kind} values in sample 4"):
        _collect(as_feeds(_save(tmp_path, x=x), DYNAMIC, batch_size=2))


def test_float64_is_cast_with_a_warning_once(tmp_path, caplog):
    x = np.random.default_rng(0).standard_normal((3, 3, 4, 4))
    with caplog.at_level(logging.WARNING):
        feeds = _collect(as_feeds(_save(tmp_path, x=x), IMAGE))
    assert all(f["x"].dtype == np.float32 for f in feeds)
    assert caplog.text.count("float64, cast to the model's float32") == 1


def test_float64_overflowing_float16_is_an_inf_error(tmp_path):
    model = _model({"h": (TensorProto.FLOAT16, [1, 2])})
    x = np.array([[1.0, 1e6]] * 2)
    with pytest.raises(DataError, match="input 'h' has values too large for float16 in sample 0"):
        _collect(as_feeds(_save(tmp_path, h=x), model))


def test_integers_cast_to_float_only_when_exact(tmp_path):
    exact = np.arange(96, dtype=np.int64).reshape(2, 3, 4, 4)
    feeds = _collect(as_feeds(_save(tmp_path, x=exact), IMAGE))
    assert feeds[1]["x"].dtype == np.float32 and feeds[1]["x"][0, 0, 0, 0] == 48.0
    huge = exact.copy()
    huge[1, 0, 0, 0] = 2**40 + 1
    with pytest.raises(DataError, match="values that float32 cannot hold exactly"):
        _collect(as_feeds(_save(tmp_path, x=huge), IMAGE))


@pytest.mark.parametrize("content", [b"", b"not a zip file at all"])
def test_not_an_npz(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.npz"):
        load_npz(path, IMAGE)


def test_missing_file_and_npy_instead_of_npz(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_npz(tmp_path / "nope.npz", IMAGE)
    np.save(tmp_path / "one.npy", np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(DataError, match="single .npy array"):
        load_npz(tmp_path / "one.npy", IMAGE)


def test_truncated_member(tmp_path):
    path = _save(tmp_path, x=np.ones((4, 3, 4, 4), np.float32))
    with zipfile.ZipFile(path) as z:
        payload = z.read("x.npy")
    broken = tmp_path / "short.npz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("x.npy", payload[:-100])
    with pytest.raises(DataError, match="short.npz.*(truncated|cannot be read)"):
        _collect(as_feeds(broken, IMAGE))


def test_mapping_of_stacked_arrays():
    x = np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32)
    feeds = as_feeds({"x": x}, DYNAMIC, batch_size=4)
    (feed,) = _collect(feeds)
    np.testing.assert_array_equal(feed["x"], x)
    assert feeds.count == 4


def test_iterable_is_consumed_one_feed_at_a_time():
    pulled = []

    def samples():
        for i in range(5):
            pulled.append(i)
            yield {"x": np.full((3, 4, 4), i, np.float32)}  # batch axis added

    feeds = as_feeds(samples(), IMAGE)
    assert feeds.count is None and pulled == []
    first = next(feeds)
    assert pulled == [0] and first["x"].shape == (1, 3, 4, 4)
    assert len(_collect(feeds)) == 4


def test_iterable_batches_on_dynamic_axis():
    items = [{"x": np.full((1, 3, 4, 4), i, np.float32)} for i in range(5)]
    feeds = as_feeds(items, DYNAMIC, batch_size=2)
    assert feeds.count == 5
    shapes = [(feeds.span, f["x"].shape, float(f["x"][-1, 0, 0, 0])) for f in feeds]
    assert shapes == [((0, 2), (2, 3, 4, 4), 1.0), ((2, 4), (2, 3, 4, 4), 3.0), ((4, 5), (1, 3, 4, 4), 4.0)]


def test_iterable_items_that_cannot_be_batched():
    model = _model({"t": (TensorProto.FLOAT, ["N", "T"])})
    items = [{"t": np.ones((1, 3), np.float32)}, {"t": np.ones((1, 4), np.float32)}]
    assert len(_collect(as_feeds(items, model))) == 2  # fine one at a time
    with pytest.raises(DataError, match="samples 0..1 of input 't' have different shapes"):
        _collect(as_feeds(items, model, batch_size=2))


@pytest.mark.parametrize(
    "items, message",
    [
        ([{"x": np.ones((1, 3, 4, 4), np.float32)}, [1, 2]], "item 1 is a list"),
        ([{}], "sample 0: no data for model input 'x'"),
        ([{"x": np.ones((1, 3, 4, 4), np.float32), "y": np.ones(1)}], "key 'y' is not an input"),
        ([{"x": np.ones((2, 3, 4, 4), np.float32)}], r"sample 0: input 'x' has shape \(2, 3, 4, 4\)"),
        ([{"x": np.array([None] * 48).reshape(1, 3, 4, 4)}], "Python objects"),
        ([{"x": np.full((1, 3, 4, 4), np.nan, np.float32)}], "input 'x' has NaN values in sample 0"),
        ([], "no samples"),
    ],
)
def test_iterable_problems(items, message):
    with pytest.raises(DataError, match=message):
        _collect(as_feeds(items, IMAGE))


def test_onnxruntime_calibration_data_reader():
    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": np.full((1, 3, 4, 4), i, np.float32)} for i in range(3)])

        def get_next(self):
            return next(self.items, None)

    feeds = as_feeds(Reader(), IMAGE)
    assert [float(f["x"].max()) for f in feeds] == [0.0, 1.0, 2.0]


def test_duck_typed_reader_ending_with_an_empty_dict():
    class Reader:
        def __init__(self):
            self.left = 2

        def get_next(self):
            self.left -= 1
            return {"x": np.zeros((1, 3, 4, 4), np.float32)} if self.left >= 0 else {}

    assert len(_collect(as_feeds(Reader(), IMAGE))) == 2


def test_unsupported_sources():
    with pytest.raises(UsageError, match="got int"):
        as_feeds(3, IMAGE)
    with pytest.raises(UsageError, match="batch size must be a positive integer"):
        as_feeds([], IMAGE, batch_size=0)


def test_initializer_backed_inputs_are_optional():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(np.ones(2, np.float32), "bias")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    assert [s.optional for s in model_inputs(model)] == [False, True]
    assert len(_collect(as_feeds([{"x": np.ones((1, 2), np.float32)}], model))) == 1
