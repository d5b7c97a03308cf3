"""The torch QAT stage: fake quantization (STE/LSQ), BatchNorm folding during training,
export to standard Q/DQ at opset 21, agreement with onnxruntime and fusion."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnx_ir as ir  # noqa: E402
from torch import nn  # noqa: E402

from zenith_onnx import kernels, runtime  # noqa: E402
from zenith_onnx.errors import DataError, UsageError  # noqa: E402
from zenith_onnx.qat import (  # noqa: E402
    QATConfig,
    calibrate_qat,
    export_qat,
    freeze_bn_stats,
    prepare_qat,
    quantizers,
)
from zenith_onnx.qat.export import METADATA_KEY, verify_export  # noqa: E402
from zenith_onnx.summary import op_counts  # noqa: E402
from zenith_onnx.qat.fake_quant import ActivationFakeQuantize, fake_quantize  # noqa: E402
from zenith_onnx.qat.torch_qat import fold_batchnorm  # noqa: E402

pytestmark = pytest.mark.torch

U8 = kernels.int_range(8, signed=False)
S8N = kernels.int_range(8, signed=True, narrow=True)


class ConvNet(nn.Module):
    """Conv-BN-ReLU x2 + Linear on a 3x8x8 input."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def batches(n, seed, batch=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def train(model, steps, seed=1, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for x in batches(steps, seed):
        target = torch.randint(0, 10, (x.shape[0],), generator=g)
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def make_qat(config=None, steps=4, seed=0):
    torch.manual_seed(seed)
    model = prepare_qat(ConvNet(), config or QATConfig())
    calibrate_qat(model, batches(4, seed=10))
    train(model, steps)
    return model


def ort_optimized(path, tmp_path, **kwargs) -> ir.Model:
    out = tmp_path / "optimized.onnx"
    runtime.session(str(path), "extended", optimized_model_filepath=str(out), **kwargs)
    return ir.load(out)


def init_array(model: ir.Model, name: str) -> np.ndarray:
    return model.graph.initializers[name].const_value.numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The 8-bit model, trained a few steps with BatchNorm batch statistics, and its export."""
    model = make_qat()
    path = tmp_path_factory.mktemp("qat") / "convnet.onnx"
    x = batches(1, seed=99, batch=16)[0]
    onnx_model = export_qat(model, (x,), path)
    return model, onnx_model, path, x


# ------------------------------------------------------------------ kernels


def test_fold_kernel_matches_torch_fuse_conv_bn_weights():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    ref_w, ref_b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    np_ = lambda t: t.detach().numpy()  # noqa: E731
    w, b = kernels.fold_batchnorm_into_weight(
        np_(conv.weight), np_(conv.bias), np_(bn.weight), np_(bn.bias), np_(bn.running_mean),
        np_(bn.running_var), bn.eps)
    # torch folds in float32, the kernel in float64 rounded once: a few float32 ulps apart.
    np.testing.assert_allclose(w, np_(ref_w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, np_(ref_b), rtol=1e-5, atol=1e-6)
    # The QAT training/eval path folds with exactly the kernel's operations: bit for bit.
    for bias in (conv.bias, None):
        tw, tb = fold_batchnorm(conv.weight, bias, bn)
        kw, kb = kernels.fold_batchnorm_into_weight(
            np_(conv.weight), None if bias is None else np_(bias), np_(bn.weight), np_(bn.bias),
            np_(bn.running_mean), np_(bn.running_var), bn.eps)
        assert np.array_equal(np_(tw), kw) and np.array_equal(np_(tb), kb)


@pytest.mark.parametrize(
    "bits, signed, axis, zero_point",
    [(8, False, None, [37]), (8, True, 0, [0, 0, 0, 0, 0]), (4, True, 0, [0, 0, 0, 0, 0]),
     (4, False, None, [3]), (16, False, None, [100])],
)
def test_fake_quant_op_equals_the_kernels_bit_for_bit(bits, signed, axis, zero_point):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 7, 3, generator=g) * 4  # wide enough to saturate
    qrange = kernels.int_range(bits, signed)
    scale = torch.rand(5 if axis is not None else (), generator=g) * 0.1 + 0.01
    got = fake_quantize(x, scale, zero_point, axis, *qrange).numpy()
    zp = np.array(zero_point if axis is not None else zero_point[0])
    want = kernels.fake_quantize(x.numpy(), scale.numpy(), zp, qrange, axis)
    assert np.array_equal(got, want)
    assert np.any(got != x.numpy())


def test_ste_and_lsq_gradients():
    x = torch.tensor([-3.0, -0.26, -0.1, 0.0, 0.12, 0.5, 1.27, 1.3, 9.0], requires_grad=True)
    scale = torch.tensor(0.01, requires_grad=True)
    y = fake_quantize(x, scale, [0], None, -128, 127)  # range [-1.28, 1.27]
    upstream = torch.arange(1.0, 10.0)
    (y * upstream).sum().backward()
    inside = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(x.grad, upstream * inside)  # identity inside, zero outside
    v = x.detach() / 0.01
    d = torch.where(v.round() < -128, -128.0, torch.where(v.round() > 127, 127.0, v.round() - v))
    expected = (upstream * d).sum() / np.sqrt(x.numel() * 255)
    assert scale.grad != 0
    torch.testing.assert_close(scale.grad, expected)
    # Per channel: one scale gradient per channel, summed over the other axes.
    w = torch.randn(3, 4, requires_grad=True)
    s = torch.full((3,), 0.02, requires_grad=True)
    fake_quantize(w, s, [0, 0, 0], 0, -128, 127).sum().backward()
    assert s.grad.shape == (3,) and torch.all(s.grad != 0)


# ------------------------------------------------------------------ training


def test_training_follows_the_deployed_folded_weights():
    torch.manual_seed(0)
    model = prepare_qat(ConvNet(), QATConfig())
    conv = model.get_submodule("features.0")
    assert type(conv).__name__ == "QATConv2d" and conv.bn is not None
    assert not hasattr(model.features, "1")  # the BatchNorm moved into the conv
    calibrate_qat(model, batches(2, seed=5))
    before = conv.bn.running_mean.clone()
    losses = train(model, 3)
    assert all(np.isfinite(losses))
    assert not torch.equal(before, conv.bn.running_mean)  # batch statistics were used and tracked
    for p in (conv.weight, conv.bn.weight, conv.bn.bias, model.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # With BN statistics frozen, a training forward is the deployed (eval) computation.
    freeze_bn_stats(model)
    x = batches(1, seed=6)[0]
    model.train()
    with torch.no_grad():
        train_out = model(x)
    model.eval()
    with torch.no_grad():
        eval_out = model(x)
    assert torch.equal(train_out, eval_out)


def test_observers_freeze_after_observe_steps_and_scales_come_from_the_kernels():
    torch.manual_seed(0)
    model = prepare_qat(ConvNet(), QATConfig(observe_steps=2))
    acts = {k: q for k, q in quantizers(model).items() if isinstance(q, ActivationFakeQuantize)}
    assert sorted(acts) == ["activation_fq.features_2", "activation_fq.features_5", "activation_fq.x"]
    train(model, 1)
    assert not any(q.frozen for q in acts.values())
    train(model, 1, seed=2)
    assert all(q.frozen for q in acts.values())
    for q in acts.values():
        scale, zp = kernels.scale_zero_point(q.min_val.numpy(), q.max_val.numpy(), U8, symmetric=False)
        assert q.scale.numpy() == scale and q.zero_point == [int(zp)]
    # After a ReLU the range starts at 0, so the zero point is qmin (ReLU fuses into the Q).
    assert acts["activation_fq.features_2"].zero_point == [0]


def test_lsq_learns_activation_scales_and_exports(tmp_path):
    model = make_qat(QATConfig(learn_activation_scales=True), steps=0)
    acts = {k: q for k, q in quantizers(model).items() if isinstance(q, ActivationFakeQuantize)}
    gains = {k: q.log_gain for k, q in acts.items()}
    assert all(isinstance(g, nn.Parameter) for g in gains.values())
    assert all(torch.equal(q.effective_scale(), q.scale) for q in acts.values())  # the kernel's scale
    assert {id(g) for g in gains.values()} <= {id(p) for p in model.parameters()}
    train(model, 3)
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gains.values())
    assert all(g.detach() != 0 for g in gains.values())
    x = batches(1, seed=7)[0]
    onnx_model = export_qat(model, (x,), tmp_path / "lsq.onnx")
    for k, q in acts.items():
        assert init_array(onnx_model, f"{k}.scale") == q.effective_scale().detach().numpy()
    meta = json.loads(onnx_model.metadata_props[METADATA_KEY])
    assert meta["quantizers"]["activation_fq.x"]["learned"] is True
    check = verify_export(model, onnx_model, (x,))
    assert check.worst_within_one_step() >= 0.999, check


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)) + x)
        y = torch.relu(self.fc(y.mean((2, 3))))
        return self.fc(y.unsqueeze(1).squeeze(1))  # fc called twice


def test_placement_on_residual_and_shared_layers():
    torch.manual_seed(0)
    net = Residual()
    rng_state = torch.get_rng_state()
    model = prepare_qat(net, QATConfig(observe_steps=1))
    assert torch.equal(rng_state, torch.get_rng_state())  # preparing draws no random numbers
    fq = {n.target: n for n in model.graph.nodes if n.op == "call_module" and n.target.startswith("activation_fq.")}
    # x is quantized once for both of its consumers (c1 and the Add); c2's output (no ReLU
    # right after it) is quantized; the ReLU after c1 carries c1's output pair.
    # The mean (not an op with an integer kernel here) is quantized as fc's input; the
    # ReLU after the first fc call carries its output pair, which the second call reads
    # through unsqueeze/squeeze; the second call's output is the graph output (float).
    assert sorted(fq) == ["activation_fq.c2", "activation_fq.mean", "activation_fq.relu",
                          "activation_fq.relu_2", "activation_fq.x"]
    assert {u.name for u in fq["activation_fq.x"].users} == {"c1", "add"}
    add = next(n for n in model.graph.nodes if n.name == "add")
    assert add.args[0] is fq["activation_fq.c2"]
    fc_calls = [n for n in model.graph.nodes if n.op == "call_module" and n.target == "fc"]
    assert fc_calls[0].args[0] is fq["activation_fq.mean"]
    assert fc_calls[1].args[0].args[0].args[0] is fq["activation_fq.relu_2"]
    assert "bn1" not in dict(model.named_modules()) and model.c1.bn is not None
    # Gradient accumulation over two forwards (the weight scale buffer is rewritten at
    # every forward; the op must not have saved it for backward).
    x = torch.randn(2, 4, 5, 5)
    model(x)
    (model(x).sum() + model(x).sum()).backward()
    assert model.fc.weight.grad.abs().sum() > 0 and model.c1.bn.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ export


def test_export_structure_names_and_dtypes(exported):
    model, onnx_model, path, _ = exported
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert onnx_model.opset_imports[""] == 21
    ops = op_counts(onnx_model)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 6  # 3 activations + 3 weights
    assert ops["Conv"] == 2 and ops["Gemm"] == 1 and "BatchNormalization" not in ops
    assert not any(n.op_type == "Constant" for n in onnx_model.graph)
    zp_types = {n: v.dtype for n, v in onnx_model.graph.initializers.items() if n.endswith(".zero_point")}
    assert zp_types == {
        "activation_fq.x.zero_point": ir.DataType.UINT8,
        "activation_fq.features_2.zero_point": ir.DataType.UINT8,
        "activation_fq.features_5.zero_point": ir.DataType.UINT8,
        "features.0.weight_fq.zero_point": ir.DataType.INT8,
        "features.3.weight_fq.zero_point": ir.DataType.INT8,
        "fc.weight_fq.zero_point": ir.DataType.INT8,
    }
    nodes = {n.name: n for n in onnx_model.graph}
    conv0 = nodes["features.0.weight_fq/DequantizeLinear"].outputs[0].consumers()[0]
    assert conv0.op_type == "Conv"
    assert conv0.inputs[0].producer().name == "activation_fq.x/DequantizeLinear"
    assert conv0.outputs[0].consumers()[0].op_type == "Relu"
    relu_q = conv0.outputs[0].consumers()[0].outputs[0].consumers()[0]
    assert relu_q.name == "activation_fq.features_2/QuantizeLinear"
    assert nodes["features.0.weight_fq/QuantizeLinear"].attributes["axis"].value == 0
    assert init_array(onnx_model, "activation_fq.x.scale").shape == ()  # per tensor

    # The exported conv weight is the BN-folded weight computed by the kernel; its Q/DQ
    # scales are the kernel's per-channel symmetric scales of that weight.
    conv, bn = model.get_submodule("features.0"), model.get_submodule("features.0").bn
    np_ = lambda t: t.detach().numpy()  # noqa: E731
    w, b = kernels.fold_batchnorm_into_weight(
        np_(conv.weight), np_(conv.bias), np_(bn.weight), np_(bn.bias), np_(bn.running_mean),
        np_(bn.running_var), bn.eps)
    assert np.array_equal(init_array(onnx_model, "features.0.weight"), w)
    assert np.array_equal(init_array(onnx_model, "features.0.bias"), b)
    scale, zp = kernels.scale_zero_point(w.min(axis=(1, 2, 3)), w.max(axis=(1, 2, 3)), S8N, True)
    assert np.array_equal(init_array(onnx_model, "features.0.weight_fq.scale"), scale)
    assert np.all(zp == 0)
    assert "features.3.bias" in onnx_model.graph.initializers  # the folded BN gave it a bias
    for k, q in quantizers(model).items():
        if isinstance(q, ActivationFakeQuantize):
            assert init_array(onnx_model, f"{k}.scale") == q.scale.detach().numpy()
            assert init_array(onnx_model, f"{k}.zero_point") == q.zero_point[0]

    meta = json.loads(onnx_model.metadata_props[METADATA_KEY])
    assert meta["format"] == "zenith-onnx-qat/1" and meta["config"]["weight_bits"] == 8
    assert meta["quantizers"]["features.0.weight_fq"] == {
        "kind": "weight", "bits": 8, "onnx_type": "INT8", "qmin": -127, "qmax": 127,
        "symmetric": True, "axis": 0, "learned": False, "scale": "features.0.weight_fq.scale",
        "zero_point": "features.0.weight_fq.zero_point",
        "dequantized": "features.0.weight_fq.dequantized",
    }
    assert meta["quantizers"]["activation_fq.x"]["onnx_type"] == "UINT8"


def test_export_matches_torch_in_onnxruntime(exported):
    model, onnx_model, path, x = exported
    check = verify_export(model, path, (x,))
    assert len(check.activations) == 3
    assert check.worst_within_one_step() >= 0.999, check
    # Bit-exact here (measured on 20 batches); a Conv accumulating in another order on
    # another CPU may move a value across a rounding boundary: one step, rarely.
    assert check.worst_exact() >= 0.99, check
    (out,) = check.outputs.values()
    # Float Gemm accumulation order only, unless an activation moved by one step.
    tolerance = 1e-5 if check.worst_exact() == 1.0 else 1e-2
    assert out["max_abs"] <= tolerance * out["max_ref"], check


def _complete_gemm_bias(model: ir.Model) -> None:
    """What the quantize pass adds to a QAT export: the Gemm's float bias as int32 with
    scale s_x * s_w (onnxruntime itself does this for Conv, not for Gemm)."""
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    a, w_dq, bias = gemm.inputs
    while a.producer().op_type != "DequantizeLinear":
        a = a.producer().inputs[0]
    s_x = a.producer().inputs[1].const_value.numpy()
    s_w = w_dq.producer().inputs[1].const_value.numpy()
    s_b = (s_x * s_w).astype(np.float32)
    int32 = kernels.IntRange(-(2**31), 2**31 - 1)
    q = kernels.quantize(bias.const_value.numpy(), s_b, 0, int32, axis=0).astype(np.int32)
    q_value = ir.Value(name="fc.bias_int32", const_value=ir.tensor(q), shape=ir.Shape(q.shape),
                       type=ir.TensorType(ir.DataType.INT32))
    s_value = ir.Value(name="fc.bias_scale", const_value=ir.tensor(s_b), shape=ir.Shape(s_b.shape),
                       type=ir.TensorType(ir.DataType.FLOAT))
    model.graph.register_initializer(q_value)
    model.graph.register_initializer(s_value)
    dq = ir.node("DequantizeLinear", [q_value, s_value], attributes={"axis": 0}, name="fc.bias_dq")
    model.graph.insert_before(gemm, dq)
    gemm.replace_input_with(2, dq.outputs[0])


def test_onnxruntime_fuses_the_8bit_export(exported, tmp_path):
    _, onnx_model, path, x = exported
    optimized = op_counts(ort_optimized(path, tmp_path))
    assert optimized.get("QLinearConv") == 2, optimized
    assert "Conv" not in optimized and "BatchNormalization" not in optimized
    assert optimized.get("Gemm") == 1  # float bias: left for the quantize pass to complete
    completed = ir.from_proto(ir.to_proto(onnx_model))
    _complete_gemm_bias(completed)
    completed_path = tmp_path / "completed.onnx"
    ir.save(completed, completed_path)
    optimized = op_counts(ort_optimized(completed_path, tmp_path))
    assert optimized.get("QLinearConv") == 2 and optimized.get("com.microsoft::QGemm") == 1, optimized
    assert "Gemm" not in optimized and "Conv" not in optimized
    feeds = {"x": x.numpy()}
    ref = runtime.run(runtime.session(str(path)), feeds)
    fused = runtime.run(runtime.session(str(completed_path), "extended"), feeds)
    (name,) = ref
    assert np.abs(ref[name] - fused[name]).max() <= 0.05 * np.abs(ref[name]).max()


@pytest.mark.parametrize(
    "config, weight_type, act_type",
    [
        (QATConfig(weight_bits=4), ir.DataType.INT4, ir.DataType.UINT8),
        (QATConfig(weight_bits=4, activation_bits=4), ir.DataType.INT4, ir.DataType.UINT4),
        (QATConfig(signed_activations=True), ir.DataType.INT8, ir.DataType.INT8),
    ],
    ids=["w4a8", "w4a4", "w8a8-signed"],
)
def test_low_bit_and_signed_exports_match_torch(config, weight_type, act_type, tmp_path):
    model = make_qat(config, steps=2)
    x = batches(1, seed=8)[0]
    onnx_model = export_qat(model, (x,), tmp_path / "m.onnx")
    zps = {n: v.dtype for n, v in onnx_model.graph.initializers.items() if n.endswith(".zero_point")}
    assert {t for n, t in zps.items() if "weight_fq" in n} == {weight_type}
    assert {t for n, t in zps.items() if n.startswith("activation_fq")} == {act_type}
    w = init_array(onnx_model, "features.3.weight")
    s = init_array(onnx_model, "features.3.weight_fq.scale")
    q = kernels.quantize(w, s, 0, config.weight_range, axis=0)
    assert q.min() >= config.weight_range.qmin and q.max() <= config.weight_range.qmax
    check = verify_export(model, tmp_path / "m.onnx", (x,))
    assert check.worst_within_one_step() >= 0.999, check


# ------------------------------------------------------------------ errors and state


def test_user_errors_are_clear():
    with pytest.raises(UsageError, match="weight_bits=6 has no ONNX QuantizeLinear type"):
        prepare_qat(ConvNet(), QATConfig(weight_bits=6))
    model = prepare_qat(ConvNet(), QATConfig())
    with pytest.raises(UsageError, match="already prepared"):
        prepare_qat(model)
    with pytest.raises(UsageError, match=r"no recorded range: activation_fq.x, activation_fq.features_2"):
        export_qat(model, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(DataError, match="no calibration batches"):
        calibrate_qat(model, [])
    with pytest.raises(UsageError, match="has no Conv2d or Linear layer"):
        prepare_qat(nn.Sequential(nn.ReLU()))

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(UsageError, match="cannot trace Branchy with torch.fx"):
        prepare_qat(Branchy())
    with pytest.raises(UsageError, match="call prepare_qat first"):
        calibrate_qat(ConvNet(), [torch.randn(1, 3, 8, 8)])


def test_state_dict_round_trip_keeps_frozen_ranges(exported):
    model, _, _, x = exported
    fresh = prepare_qat(ConvNet(), QATConfig())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert all(q.frozen for q in quantizers(fresh).values() if isinstance(q, ActivationFakeQuantize))
