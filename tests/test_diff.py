"""zenith_onnx.diff: structural diff stable under renaming/reordering, value tolerance,
numeric diff under onnxruntime, the `diff` command's exit codes and assert_graphs_equal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from zenith_onnx import runtime
from zenith_onnx.diff import diff_models
from zenith_onnx.testing import assert_graphs_equal, sqnr_db

OPSET = 17
IR_VERSION = 8  # pinned: onnxruntime 1.32 reads it, and onnx.helper would stamp the newest


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(4).astype(np.float32),
        "w2": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
        "w3": rng.standard_normal((4, 4, 3, 3)).astype(np.float32),
    }


def residual_model(
    weights: dict[str, np.ndarray] | None = None,
    *,
    rename=lambda name: name,
    order: list[int] | None = None,
    strides=(1, 1),
    extra_sigmoid: bool = False,
) -> onnx.ModelProto:
    """x -> Conv(w1,b1) -> Relu -> {Conv(w2), Conv(w3)} -> Add -> y.

    ``rename`` maps every node and value name; ``order`` permutes the node list (it must
    stay topologically valid); ``extra_sigmoid`` inserts Sigmoid after the w3 branch."""
    w = weights or _weights()
    n = rename
    inits = [numpy_helper.from_array(w[k], n(k)) for k in ("w1", "b1", "w2", "w3")]
    branch = "c3"
    nodes = [
        helper.make_node("Conv", [n("x"), n("w1"), n("b1")], [n("c1")], name=n("conv1"), pads=[1] * 4, strides=list(strides)),
        helper.make_node("Relu", [n("c1")], [n("r1")], name=n("relu1")),
        helper.make_node("Conv", [n("r1"), n("w2")], [n("c2")], name=n("conv2"), pads=[1] * 4),
        helper.make_node("Conv", [n("r1"), n("w3")], [n("c3")], name=n("conv3"), pads=[1] * 4),
    ]
    if extra_sigmoid:
        nodes.append(helper.make_node("Sigmoid", [n("c3")], [n("s3")], name=n("sigmoid")))
        branch = "s3"
    nodes.append(helper.make_node("Add", [n("c2"), n(branch)], [n("y")], name=n("add")))
    if order is not None:
        nodes = [nodes[i] for i in order]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info(n("x"), TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(n("y"), TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def as_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)


def perturbed(delta: float, key: str = "w2") -> dict[str, np.ndarray]:
    w = _weights()
    w[key] = w[key].copy()
    w[key][1, 2, 0, 1] += delta
    return w


# ------------------------------------------------------------------ structure


def test_identical_models_are_same():
    report = diff_models(as_ir(residual_model()), as_ir(residual_model()))
    assert report.same
    assert report.summary() == "SAME"
    assert not (report.only_in_a or report.only_in_b or report.changed or report.values or report.ports)


def test_renamed_and_reordered_model_is_same():
    # Every node and value renamed (inputs, outputs, initializers too); the two branch
    # Convs swapped in the node list (still topologically sorted).
    renamed = residual_model(rename=lambda name: f"renamed/{name[::-1]}_7", order=[0, 1, 3, 2, 4])
    report = diff_models(as_ir(residual_model()), as_ir(renamed))
    assert report.same, report.format()
    # Renamed graph inputs/outputs are notes, not differences.
    assert any("renamed" in note for note in report.notes)


def test_a_node_reordering_that_is_not_topological_order_is_still_same():
    # The IR keeps the stored order; signatures follow the data flow, not the list.
    unsorted = residual_model(order=[4, 3, 2, 1, 0])
    assert diff_models(as_ir(residual_model()), as_ir(unsorted)).same


def test_changed_attribute_is_reported_on_the_node():
    report = diff_models(as_ir(residual_model()), as_ir(residual_model(strides=(2, 2))))
    assert not report.same
    assert [(c.op, c.name_a) for c in report.changed] == [("Conv", "conv1")]
    assert report.changed[0].details == ["attribute strides: [1, 1] -> [2, 2]"]
    text = report.format()
    assert "Conv 'conv1': attribute strides: [1, 1] -> [2, 2]" in text
    # The nodes below conv1 differ only through it: counted, not listed as changes.
    assert report.downstream + report.rewired == 4
    assert not report.only_in_a and not report.only_in_b


def test_changed_attribute_is_found_in_a_renamed_model_and_named_by_both_names():
    renamed = residual_model(rename=lambda name: "n_" + name, strides=(2, 2))
    report = diff_models(as_ir(residual_model()), as_ir(renamed))
    assert [(c.name_a, c.name_b) for c in report.changed] == [("conv1", "n_conv1")]
    assert "Conv 'conv1' (B: 'n_conv1')" in report.format()


def test_schema_default_attribute_written_out_equals_absent():
    a = residual_model()
    b = residual_model()
    b.graph.node[0].attribute.append(helper.make_attribute("group", 1))  # Conv's default
    assert diff_models(as_ir(a), as_ir(b)).same


def test_initializer_changed_by_1e_3_is_reported_with_its_error():
    report = diff_models(as_ir(residual_model()), as_ir(residual_model(perturbed(1e-3))), rtol=1e-5, atol=1e-6)
    assert not report.same
    assert len(report.values) == 1, report.format()
    value = report.values[0]
    assert (value.name_a, value.name_b) == ("w2", "w2")
    assert value.read_by == "Conv 'conv2' input 1"
    assert value.type == "float[4x4x3x3]"
    assert value.max_abs == pytest.approx(1e-3, rel=1e-3)  # float32 rounding of w + 1e-3
    assert value.max_rel == pytest.approx(value.max_abs / np.abs(_weights()["w2"]).max())
    assert (value.elements_differing, value.elements) == (1, 144)
    assert not report.changed and not report.only_in_a and not report.only_in_b
    assert "w2 -> Conv 'conv2' input 1: float[4x4x3x3], max abs 0.001" in report.format()


def test_initializer_matched_by_role_not_by_name():
    # Initializer names swapped between w2 and w3 AND w2's value changed: the report
    # must pair each tensor with the tensor in the same role (conv2 input 1).
    names = {"w2": "w3", "w3": "w2"}
    b = residual_model(perturbed(1e-2), rename=lambda name: names.get(name, name))
    report = diff_models(as_ir(residual_model()), as_ir(b))
    assert [(v.name_a, v.name_b, v.read_by) for v in report.values] == [("w2", "w3", "Conv 'conv2' input 1")]
    assert report.values[0].max_abs == pytest.approx(1e-2, rel=1e-3)


def test_change_within_tolerance_is_same_and_beyond_is_not():
    a = as_ir(residual_model())
    tiny = as_ir(residual_model(perturbed(1e-7)))
    assert diff_models(a, tiny, rtol=1e-5, atol=1e-6).same
    assert not diff_models(a, tiny, rtol=0.0, atol=0.0).same
    small = as_ir(residual_model(perturbed(1e-3)))
    assert not diff_models(a, small, rtol=1e-5, atol=1e-6).same
    assert diff_models(a, small, rtol=0.0, atol=2e-3).same


def test_many_equal_shaped_scalars_pair_within_tolerance():
    # A quantized model has hundreds of scalar scales of one shape: tolerance matching
    # must pair each with its counterpart (and only flag the one that really moved).
    rng = np.random.default_rng(3)
    scales = rng.uniform(0.01, 0.02, 300).astype(np.float32)

    def chain(values):
        nodes, inits, prev = [], [], "x"
        for i, s in enumerate(values):
            inits.append(numpy_helper.from_array(np.array(s, np.float32), f"s{i}"))
            nodes.append(helper.make_node("Mul", [prev, f"s{i}"], [f"m{i}"]))
            prev = f"m{i}"
        graph = helper.make_graph(
            nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [4])], inits,
        )
        return as_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION))

    jitter = scales * (1 + rng.uniform(-2e-6, 2e-6, scales.size)).astype(np.float32)
    assert diff_models(chain(scales), chain(jitter), rtol=1e-5, atol=0).same
    moved = jitter.copy()
    moved[123] *= 1.01
    report = diff_models(chain(scales), chain(moved), rtol=1e-5, atol=0)
    assert [(v.name_a, v.read_by) for v in report.values] == [("s123", "Mul (unnamed) input 1")]


def test_added_node_is_reported_with_what_it_reads():
    report = diff_models(as_ir(residual_model()), as_ir(residual_model(extra_sigmoid=True)))
    assert not report.same
    assert not report.only_in_a
    assert [(n.op, n.name, n.reads) for n in report.only_in_b] == [("Sigmoid", "sigmoid", ["c3 (from Conv 'conv3')"])]
    assert report.op_counts == {"Sigmoid": (0, 1)}
    # The Add reading the new node is the same node rewired, not a removal plus an addition.
    assert report.rewired == 1 and not report.changed
    assert "Sigmoid 'sigmoid' reading c3 (from Conv 'conv3')" in report.format()


def test_swapped_outputs_and_swapped_weights_are_different():
    def two_heads(w_a, w_b, outputs=("ya", "yb")):
        graph = helper.make_graph(
            [helper.make_node("Mul", ["x", "wa"], ["ya"]), helper.make_node("Mul", ["x", "wb"], ["yb"])],
            "heads",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, [4]) for o in outputs],
            [numpy_helper.from_array(np.full(4, w_a, np.float32), "wa"), numpy_helper.from_array(np.full(4, w_b, np.float32), "wb")],
        )
        return as_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION))

    # Same node multiset either way; only the outputs tell them apart.
    for other in (two_heads(2.0, 1.0), two_heads(1.0, 2.0, outputs=("yb", "ya"))):
        report = diff_models(two_heads(1.0, 2.0), other)
        assert not report.same
        assert len(report.outputs_computed_differently) == 2
        assert "outputs reordered" in report.outputs_computed_differently[0]


def test_constant_node_equals_initializer():
    a = residual_model()
    b = residual_model()
    w1 = next(t for t in b.graph.initializer if t.name == "w1")
    b.graph.node.insert(0, helper.make_node("Constant", [], ["w1"], value=w1))
    b.graph.initializer.remove(w1)
    report = diff_models(as_ir(a), as_ir(b))
    assert report.same, report.format()
    assert report.op_counts == {"Constant": (0, 1)}


def _if_model(k: float) -> ir.Model:
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["t"], name="then_mul")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.full(4, k, np.float32), "k")],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])]
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="branch"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return as_ir(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION))


def test_subgraph_constant_difference_is_found_inside_the_if():
    assert diff_models(_if_model(2.0), _if_model(2.0)).same
    report = diff_models(_if_model(2.0), _if_model(2.5))
    assert not report.same
    assert [(v.name_a, v.read_by) for v in report.values] == [("k", "If 'branch' then_branch: Mul 'then_mul' input 1")]


def _function_model(alpha: float) -> ir.Model:
    function = helper.make_function(
        "my.domain", "Scaled", ["a"], ["b"],
        [helper.make_node("Constant", [], ["s"], value_float=alpha), helper.make_node("Mul", ["a", "s"], ["b"])],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("Scaled", ["x"], ["y"], domain="my.domain")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    return as_ir(helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("my.domain", 1)],
        ir_version=IR_VERSION, functions=[function],
    ))


def test_local_function_bodies_are_compared():
    assert diff_models(_function_model(1.0), _function_model(1.0)).same
    report = diff_models(_function_model(1.0), _function_model(2.0))
    assert not report.same
    assert report.functions == ["function my.domain::Scaled has a different body"]


def test_input_dtype_and_opset_differences():
    a = residual_model()
    b = residual_model()
    b.opset_import[0].version = 18
    report = diff_models(as_ir(a), as_ir(b))
    assert not report.same and report.opset_differences == ["ai.onnx: 17 vs 18"]
    c = residual_model()
    c.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    report = diff_models(as_ir(a), as_ir(c))
    assert [(p.kind, p.problem, p.type_a, p.type_b) for p in report.ports] == [
        ("input", "shape differs", "float[1x3x8x8]", "float[2x3x8x8]")
    ]
    assert not report.same


@st.composite
def _topological_orders(draw):
    """A random topological order of residual_model's 5 nodes and a random renaming."""
    deps = {0: set(), 1: {0}, 2: {1}, 3: {1}, 4: {2, 3}}
    order, done = [], set()
    while len(order) < 5:
        ready = sorted(k for k in deps if k not in done and deps[k] <= done)
        pick = draw(st.sampled_from(ready))
        order.append(pick)
        done.add(pick)
    salt = draw(st.text(alphabet="abcxyz_/.0123", min_size=1, max_size=6))
    return order, salt


@settings(max_examples=30, deadline=None)
@given(_topological_orders())
def test_any_renaming_and_topological_order_is_same(case):
    order, salt = case
    b = residual_model(rename=lambda name: f"{salt}{name}{len(name)}", order=order)
    assert diff_models(as_ir(residual_model()), as_ir(b)).same


# ------------------------------------------------------------------ numeric


def _calibration(path, count: int = 6, batch_axis: bool = True) -> str:
    rng = np.random.default_rng(11)
    shape = (count, 1, 3, 8, 8) if batch_axis else (count, 3, 8, 8)
    np.savez(path, x=rng.standard_normal(shape).astype(np.float32))
    return str(path)


def _ort_outputs(path, data):
    sess = runtime.session(path, "disable_all")
    return [sess.run(None, {"x": sample})[0] for sample in np.load(data)["x"]]


def test_numeric_diff_reports_errors_of_differing_models(tmp_path):
    a = save(residual_model(), tmp_path / "a.onnx")
    b = save(residual_model(perturbed(1e-2, key="w3")), tmp_path / "b.onnx")
    data = _calibration(tmp_path / "calib.npz")
    report = diff_models(a, b, data=data)
    assert not report.same
    numeric = report.numeric
    assert numeric is not None and numeric.samples == 6 and not numeric.same
    (out,) = numeric.outputs
    ref, got = _ort_outputs(a, data), _ort_outputs(b, data)
    max_abs = max(float(np.abs(r - g).max()) for r, g in zip(ref, got))
    assert out.max_abs == pytest.approx(max_abs)
    assert out.max_rel == pytest.approx(max_abs / max(float(np.abs(r).max()) for r in ref))
    assert out.sqnr_db == pytest.approx(sqnr_db(ref, got))
    assert 20 < out.sqnr_db < 120  # a 1e-2 change of one weight: small but real
    assert "SQNR dB" in report.format()


def test_numeric_diff_of_agreeing_models(tmp_path):
    # Same model renamed (inputs too): feeds map by position, outputs agree exactly.
    a = save(residual_model(), tmp_path / "a.onnx")
    b = save(residual_model(rename=lambda name: "m." + name), tmp_path / "b.onnx")
    data = _calibration(tmp_path / "calib.npz", batch_axis=False)  # (N, 3, 8, 8) for a 1x3x8x8 input
    report = diff_models(a, b, data=data)
    assert report.same, report.format()
    (out,) = report.numeric.outputs
    assert out.max_abs == 0.0 and out.sqnr_db == float("inf") and out.same
    assert report.to_dict()["numeric"]["outputs"][0]["sqnr_db"] is None  # JSON has no infinity


def test_numeric_agreement_does_not_hide_a_structural_difference(tmp_path):
    # B adds x*1 before the graph: outputs identical, graphs not.
    b_proto = residual_model()
    b_proto.graph.initializer.append(numpy_helper.from_array(np.ones(1, np.float32), "one"))
    b_proto.graph.node.insert(0, helper.make_node("Mul", ["x", "one"], ["x1"], name="times_one"))
    for node in b_proto.graph.node[1:]:
        node.input[:] = ["x1" if i == "x" else i for i in node.input]
    a = save(residual_model(), tmp_path / "a.onnx")
    b = save(b_proto, tmp_path / "b.onnx")
    report = diff_models(a, b, data=_calibration(tmp_path / "calib.npz"))
    assert report.numeric.same
    assert not report.same
    assert [n.name for n in report.only_in_b] == ["times_one"]


def test_bad_calibration_data_is_a_data_error(tmp_path):
    from zenith_onnx.errors import DataError

    a = save(residual_model(), tmp_path / "a.onnx")
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 1, 3, 8, 8), np.float32))
    # The loader is zenith_onnx.calibration_data's; here: its errors reach diff as DataError.
    with pytest.raises(DataError, match=r"wrong\.npz: .*'y'"):
        diff_models(a, a, data=tmp_path / "wrong.npz")
    np.savez(tmp_path / "rank.npz", x=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"rank\.npz: .*'x'"):
        diff_models(a, a, data=tmp_path / "rank.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match=r"junk\.npz"):
        diff_models(a, a, data=tmp_path / "junk.npz")


# ------------------------------------------------------------------ CLI and assert_graphs_equal


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zenith_onnx", *args], capture_output=True, text=True, timeout=120)


def test_cli_exit_codes(tmp_path):
    a = save(residual_model(), tmp_path / "a.onnx")
    same = save(residual_model(rename=lambda name: "z" + name, order=[0, 1, 3, 2, 4]), tmp_path / "same.onnx")
    other = save(residual_model(strides=(2, 2)), tmp_path / "other.onnx")

    result = _cli("diff", a, same)
    assert result.returncode == 0, result.stderr
    assert "result: SAME" in result.stdout

    result = _cli("diff", a, other)
    assert result.returncode == 1, result.stderr
    assert "Conv 'conv1': attribute strides: [1, 1] -> [2, 2]" in result.stdout

    result = _cli("diff", a, other, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["same"] is False and data["changed"][0]["name_a"] == "conv1"

    result = _cli("diff", a, str(tmp_path / "missing.onnx"))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"zenith-onnx: error: {tmp_path / 'missing.onnx'}: no such file"]

    data = _calibration(tmp_path / "calib.npz")
    result = _cli("diff", a, other, "--data", data)
    assert result.returncode == 1 and "SQNR dB" in result.stdout
    result = _cli("diff", a, same, "--data", str(tmp_path / "nope.npz"))
    assert result.returncode == 2 and "nope.npz: no such file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_assert_graphs_equal(tmp_path):
    a = residual_model()
    assert_graphs_equal(as_ir(a), as_ir(residual_model(rename=lambda name: "q" + name)))
    assert_graphs_equal(save(a, tmp_path / "a.onnx"), as_ir(a))
    with pytest.raises(AssertionError) as info:
        assert_graphs_equal(as_ir(a), as_ir(residual_model(strides=(2, 2))))
    message = str(info.value)
    assert message.startswith("graphs differ:\n")
    assert "Conv 'conv1': attribute strides: [1, 1] -> [2, 2]" in message


def test_folded_batchnorm_is_explained_layer_by_layer(tmp_path):
    # A: Conv -> BatchNormalization -> Relu; B: the BN folded into the Conv (new weight,
    # new bias input). The report pairs the Convs across the removed BN, shows the new
    # bias input and the weight's change, and the outputs agree numerically.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    mean, var = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    a_scale = gamma / np.sqrt(var + 1e-5)

    def graph(nodes, inits):
        g = helper.make_graph(
            nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)

    a = graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
            helper.make_node("Relu", ["n"], ["y"], name="relu"),
        ],
        {"w": w, "g": gamma, "b": beta, "m": mean, "v": var},
    )
    b = graph(
        [
            helper.make_node("Conv", ["x", "w_folded", "bias"], ["c"], name="conv", pads=[1] * 4),
            helper.make_node("Relu", ["c"], ["y"], name="relu"),
        ],
        {"w_folded": (w * a_scale[:, None, None, None]).astype(np.float32), "bias": (beta - a_scale * mean).astype(np.float32)},
    )
    report = diff_models(save(a, tmp_path / "a.onnx"), save(b, tmp_path / "b.onnx"), data=_calibration(tmp_path / "c.npz"), rtol=1e-4)
    assert [n.op for n in report.only_in_a] == ["BatchNormalization"] and not report.only_in_b
    assert [(c.name_a, c.details) for c in report.changed] == [
        ("conv", ["input 2: absent -> constant bias float[4]"])
    ]
    assert [(v.name_a, v.name_b, v.read_by) for v in report.values] == [("w", "w_folded", "Conv 'conv' input 1")]
    assert report.numeric.same and not report.same
