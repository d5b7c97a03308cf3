"""Export a QAT model to ONNX with standard QuantizeLinear/DequantizeLinear (opset 21).

Before (the QAT module in torch)::

    x -> fq -> QATConv2d[wfq(fold(W, BN))] -> ReLU -> fq -> ... -> QATLinear[wfq(V)]

After (ONNX, the handoff format of docs/qat-handoff.md)::

    x -> Q -> DQ -> Conv(DQ(Q(W')), b') -> Relu -> Q -> DQ -> ... -> Gemm(DQ(Q(V)), c)

`to_deploy` makes the exported copy: eval mode, BatchNorm folded into the conv with
`zenith_onnx.kernels.fold_batchnorm_into_weight` (the kernel of the ONNX BN-folding pass;
the QAT eval path computes the same fold bit for bit), weight scales frozen from the
final weights, learned activation scales turned into constants. `export_qat` exports it
with ``torch.onnx.export(dynamo=True, opset_version=21, optimize=False)`` and the
translation of ``zenith::fake_quant`` (``optimize=False`` keeps every initializer under
its state_dict name and never folds fake-quantized weights off the integer grid), lifts
the zero-point constants to initializers and names every quantizer's nodes and tensors
after the quantizer's module path.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import warnings

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import LiftConstantsToInitializersPass
from torch import nn

from zenith_onnx import kernels, modelio, runtime
from zenith_onnx.errors import ModelError, UsageError
from zenith_onnx.qat.fake_quant import ActivationFakeQuantize, fake_quant_onnx
from zenith_onnx.qat.torch_qat import QAT_LAYERS, QATConv2d, freeze_activation_ranges, qat_config, quantizers

__all__ = ["OPSET", "METADATA_KEY", "to_deploy", "export_qat", "ExportCheck", "verify_export"]

logger = logging.getLogger(__name__)

OPSET = 21
METADATA_KEY = "zenith_onnx.qat"
METADATA_FORMAT = "zenith-onnx-qat/1"


def _numpy(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


def _fold_bn(conv: QATConv2d) -> None:
    """Fold the conv's BatchNorm into its weight and bias with the shared kernel."""
    bn = conv.bn
    weight, bias = kernels.fold_batchnorm_into_weight(
        _numpy(conv.weight), _numpy(conv.bias), _numpy(bn.weight), _numpy(bn.bias),
        _numpy(bn.running_mean), _numpy(bn.running_var), bn.eps,
    )
    conv.weight = nn.Parameter(torch.from_numpy(weight).to(conv.weight.device))
    conv.bias = nn.Parameter(torch.from_numpy(bias).to(conv.weight.device))
    conv.bn = None


def to_deploy(model: nn.Module) -> nn.Module:
    """The model as it is exported: a copy in eval mode with BatchNorm folded, weight
    scales frozen and learned activation scales made constant.

    Activation quantizers of ``model`` that are still recording are frozen first (on
    ``model`` itself, so that ``model.eval()`` computes what the export computes); one
    that recorded nothing is a `UsageError`.
    """
    frozen_now = freeze_activation_ranges(model)
    if frozen_now:
        logger.info("froze %d activation ranges that were still being recorded", frozen_now)
    deploy = copy.deepcopy(model).eval()
    for m in deploy.modules():
        if isinstance(m, QATConv2d) and m.bn is not None:
            _fold_bn(m)
        if isinstance(m, QAT_LAYERS):
            m.weight_fq.freeze(m.weight)
        if isinstance(m, ActivationFakeQuantize):
            m.make_constant()
    deploy.requires_grad_(False)
    return deploy


@contextlib.contextmanager
def _quiet_exporter():
    # The exporter logs optional-package notes (torchvision) and deprecation warnings
    # that are not about the user's model.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise UsageError("example_inputs must be a tensor or a tuple of tensors")


class _Names:
    """Unique names in one graph."""

    def __init__(self, graph: ir.Graph):
        self.used = {v.name for v in graph.inputs} | set(graph.initializers)
        self.used |= {o.name for n in graph for o in n.outputs} | {n.name for n in graph}

    def fresh(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.used:
            candidate, i = f"{name}_{i}", i + 1
        self.used.add(candidate)
        return candidate


def _rename(value: ir.Value, name: str, names: _Names, renamed: set) -> None:
    if value not in renamed and not value.is_graph_output():
        value.name = names.fresh(name)
        renamed.add(value)


def _name_quantizers(model: ir.Model) -> dict[str, str]:
    """Name Q/DQ nodes, their outputs and zero points after the quantizer whose scale they
    read (``<fqn>.scale`` -> ``<fqn>/QuantizeLinear``, ``<fqn>.quantized``,
    ``<fqn>.zero_point``, ``<fqn>/DequantizeLinear``, ``<fqn>.dequantized``). Returns
    ``{quantizer fqn: dequantized tensor name}``."""
    names = _Names(model.graph)
    renamed: set[ir.Value] = set()  # a zero point is shared by its Q and DQ
    dequantized = {}
    for node in model.graph:
        if node.domain != "" or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = node.inputs[1]
        if scale is None or not scale.name or not scale.name.endswith(".scale"):
            continue
        fqn = scale.name[: -len(".scale")]
        node.name = names.fresh(f"{fqn}/{node.op_type}")
        zero_point = node.inputs[2]
        if zero_point is not None:
            _rename(zero_point, f"{fqn}.zero_point", names, renamed)
        suffix = "quantized" if node.op_type == "QuantizeLinear" else "dequantized"
        _rename(node.outputs[0], f"{fqn}.{suffix}", names, renamed)
        if node.op_type == "DequantizeLinear":
            dequantized.setdefault(fqn, node.outputs[0].name)
    return dequantized


def _metadata(deploy: nn.Module, model: ir.Model, dequantized: dict[str, str]) -> str:
    config = qat_config(deploy)
    entries = {}
    for fqn, q in quantizers(deploy).items():
        if f"{fqn}.scale" not in model.graph.initializers:
            continue  # defined but never called in forward
        entries[fqn] = {**q.describe(), "scale": f"{fqn}.scale", "zero_point": f"{fqn}.zero_point",
                        "dequantized": dequantized.get(fqn)}
    return json.dumps({
        "format": METADATA_FORMAT,
        "config": dataclasses.asdict(config) if config is not None else None,
        "quantizers": entries,
    }, sort_keys=True)


def export_qat(model: nn.Module, example_inputs, path: str | os.PathLike | None = None) -> ir.Model:
    """Export a model prepared with `prepare_qat` to ONNX (opset 21) for the zenith-onnx
    passes and onnxruntime; write it atomically to ``path`` when given. Returns the
    `onnx_ir.Model`. See docs/qat-handoff.md for what the file contains."""
    if not any(isinstance(m, QAT_LAYERS) for m in model.modules()):
        raise UsageError("export_qat needs a model prepared with prepare_qat")
    args = _as_args(example_inputs)
    deploy = to_deploy(model)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                deploy, args, dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
                custom_translation_table={torch.ops.zenith.fake_quant.default: fake_quant_onnx},
            )
    except Exception as e:  # the exporter raises its own error types for unsupported models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"torch.onnx.export could not export {type(model).__name__}: {first}") from e
    onnx_model = program.model
    dequantized = _name_quantizers(onnx_model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(onnx_model)
    onnx_model.metadata_props[METADATA_KEY] = _metadata(deploy, onnx_model, dequantized)
    if path is not None:
        modelio.save_model(onnx_model, path)
    return onnx_model


# ------------------------------------------------------------------ verification


@dataclasses.dataclass
class ExportCheck:
    """How an exported model compares with the torch QAT model (eval mode) in
    onnxruntime at ``ORT_DISABLE_ALL``: per activation quantizer, the fraction of elements
    that are equal and within one quantization step; per output, the largest difference."""

    activations: dict[str, dict[str, float]]
    outputs: dict[str, dict[str, float]]

    def worst_within_one_step(self) -> float:
        return min((a["within_one_step"] for a in self.activations.values()), default=1.0)

    def worst_exact(self) -> float:
        return min((a["exact"] for a in self.activations.values()), default=1.0)


def verify_export(model: nn.Module, onnx_model: ir.Model | str | os.PathLike, inputs) -> ExportCheck:
    """Run ``model`` (eval mode) and the exported model on ``inputs`` and compare every
    fake-quantized activation and every output (see `ExportCheck`)."""
    args = _as_args(inputs)
    onnx_model = onnx_model if isinstance(onnx_model, ir.Model) else modelio.load_model(onnx_model)
    meta = json.loads(onnx_model.metadata_props.get(METADATA_KEY, "{}"))
    probes = {
        fqn: entry["dequantized"] for fqn, entry in meta.get("quantizers", {}).items()
        if entry["kind"] == "activation" and entry.get("dequantized")
    }
    probed = ir.from_proto(ir.to_proto(onnx_model))  # a copy whose extra outputs we may add
    values = {o.name: o for n in probed.graph for o in n.outputs}
    output_names = [v.name for v in probed.graph.outputs]
    for name in probes.values():
        if name not in output_names:
            probed.graph.outputs.append(values[name])
    feeds = {v.name: _numpy(t) for v, t in zip(probed.graph.inputs, args)}
    got = runtime.run(runtime.session(runtime.model_bytes(probed), "disable_all"), feeds)

    captured: dict[str, np.ndarray] = {}
    handles = []
    modules = dict(model.named_modules())
    for fqn in probes:
        def hook(_module, _inputs, out, fqn=fqn):
            captured[fqn] = _numpy(out)

        handles.append(modules[fqn].register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            expected = model(*args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)

    activations = {}
    for fqn, name in probes.items():
        ref, out = captured[fqn], got[name]
        step = float(modules[fqn].effective_scale().detach())
        diff = np.abs(ref.astype(np.float64) - out)
        activations[fqn] = {
            "exact": float(np.mean(diff == 0)),
            "within_one_step": float(np.mean(diff <= step * (1 + 1e-6))),
            "max_steps": float(diff.max() / step) if diff.size else 0.0,
        }
    outputs = {}
    for name, ref in zip(output_names, expected):
        ref = _numpy(ref).astype(np.float64)
        diff = np.abs(ref - got[name])
        outputs[name] = {"max_abs": float(diff.max()), "max_ref": float(np.abs(ref).max()),
                         "exact": float(np.mean(diff == 0))}
    return ExportCheck(activations, outputs)

