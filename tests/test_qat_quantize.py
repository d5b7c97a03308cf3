"""The QAT handoff: `quantize` completes a QAT export without calibration data, keeps its
scales, quantizes nothing twice, fuses like PTQ and matches the torch model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from torch import nn  # noqa: E402

from zenith_onnx import runtime  # noqa: E402
from zenith_onnx.fusion import fusion_report  # noqa: E402
from zenith_onnx.qat import QATConfig, calibrate_qat, export_qat, prepare_qat  # noqa: E402
from zenith_onnx.qconfig import QuantConfig  # noqa: E402
from zenith_onnx.quantize import quantize  # noqa: E402

pytestmark = pytest.mark.torch


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=[8, 4], ids=["w8a8", "w4a8"])
def exported(request):
    bits = request.param
    torch.manual_seed(0)
    model = prepare_qat(Net(), QATConfig(weight_bits=bits, activation_bits=8))
    calibrate_qat(model, [torch.cat(_batches(8, 10))])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 3, 8, 8, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    onnx_model = export_qat(model, (torch.randn(1, 3, 8, 8),))
    return bits, model, onnx_model


def test_quantize_completes_a_qat_export_without_data(exported):
    bits, torch_model, onnx_model = exported
    result = quantize(onnx_model, None, config=QuantConfig(weight_bits=bits), report_samples=0)
    q = result.model
    # nothing quantized twice: at most one Q per tensor, never Q->DQ->Q->DQ
    for node in q.graph:
        if node.op_type == "QuantizeLinear":
            producer = node.inputs[0].producer()
            assert producer is None or producer.op_type != "DequantizeLinear", node.name
    # fuses like PTQ: every Conv and the Gemm run as integer kernels
    ops = fusion_report(q).to_dict()["integer_ops"]
    assert ops.get("QLinearConv", 0) == 2, ops
    assert ops.get("com.microsoft::QGemm", 0) == 1, ops
    # the QAT scales were kept, so outputs match torch's fake-quantized model
    sess = runtime.session(q)
    name = q.graph.inputs[0].name
    with torch.no_grad():
        for x in _batches(20, 99):
            ref = torch_model(x).numpy()
            got = runtime.run(sess, {name: x.numpy()})[q.graph.outputs[0].name]
            # Differences come from onnxruntime's integer kernels (int32 bias grid,
            # requantization rounding), which torch does not simulate. Measured worst
            # over 20 inputs: 1.9e-3 (w8a8) and 6.4e-3 (w4a8) of the logits' range.
            rel = np.max(np.abs(ref - got)) / np.max(np.abs(ref))
            assert rel < (5e-3 if bits == 8 else 1.5e-2), rel


def test_activation_scales_of_the_export_are_kept(exported):
    bits, _, onnx_model = exported
    before = sorted(
        float(n.inputs[1].const_value.numpy())
        for n in onnx_model.graph
        if n.op_type == "QuantizeLinear" and n.inputs[1].const_value is not None and n.inputs[1].const_value.numpy().size == 1
    )
    q = quantize(onnx_model, None, config=QuantConfig(weight_bits=bits), report_samples=0, check_fusion=False).model
    after = {float(n.inputs[1].const_value.numpy()) for n in q.graph if n.op_type == "QuantizeLinear"}
    assert set(before) <= after
