"""Prepare a torch module for quantization-aware training (the ``qat`` extra).

`prepare_qat(module, config)` traces the module with ``torch.fx`` and rewrites it:

Before::

    x -> Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> BatchNorm2d -> ReLU -> flatten -> Linear

After (``fq`` = `ActivationFakeQuantize`, ``wfq`` = `WeightFakeQuantize`)::

    x -> fq -> QATConv2d[wfq(fold(W, BN))] -> ReLU -> fq -> QATConv2d[...] -> ReLU -> fq
      -> flatten -> QATLinear[wfq(W)]

- Conv2d followed by its BatchNorm2d becomes one `QATConv2d` that trains on the
  fake-quantized *folded* weight ``W * gamma / sqrt(var + eps)`` (the weight that is
  deployed after BatchNorm folding). Linear becomes `QATLinear`.
- Activation quantizers sit on tensors, not on layers: on every tensor a quantized layer
  reads (walking back through reshapes, transposes, (un)squeeze, repeat/expand, max-pool,
  dropout and identity, which commute with per-tensor fake quantization and which
  onnxruntime runs on integers) and
  on every quantized layer's output, after its ReLU when the layer's only consumer is a
  ReLU (so the range starts at 0 and the zero point is qmin, which lets onnxruntime fuse
  Conv+ReLU+Q into QLinearConv). A tensor is quantized once; all its consumers read the
  quantized tensor. Graph outputs stay float.

BatchNorm during training (the approach of Jacob et al. 2018 and torch.ao's ConvBn2d):

    train:  s = gamma / sqrt(running_var + eps)
            y = BN_batch( conv(x, fq(W * s)) / s + b )      batch statistics, running stats update
    eval, or after `freeze_bn_stats`:
            y = conv(x, fq(W'), b')   with (W', b') = fold(W, b, BN running statistics)

The weight that is fake-quantized is always the running-statistics fold, i.e. what is
deployed; in training the output is rescaled to batch statistics so BatchNorm still
normalises. The eval path computes the fold in float64 exactly like
`zenith_onnx.kernels.fold_batchnorm_into_weight` (bit for bit), so the eval model, the
exported model and the ONNX BN-folding pass agree.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from zenith_onnx.errors import DataError, UsageError
from zenith_onnx.qat.config import QATConfig
from zenith_onnx.qat.fake_quant import ActivationFakeQuantize, WeightFakeQuantize

__all__ = [
    "QATConv2d",
    "QATLinear",
    "fold_batchnorm",
    "prepare_qat",
    "calibrate_qat",
    "calibrating",
    "freeze_activation_ranges",
    "freeze_bn_stats",
    "quantizers",
    "qat_config",
]

logger = logging.getLogger(__name__)

ACTIVATION_QUANTIZERS = "activation_fq"


def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d):
    """``(W * a, a * b + beta - a * mean)`` with ``a = gamma / sqrt(running_var + eps)``,
    computed in float64 and rounded once to the weight's dtype: the same operations in
    the same order as `zenith_onnx.kernels.fold_batchnorm_into_weight`, differentiable."""
    a = bn.weight.double() / torch.sqrt(bn.running_var.double() + float(bn.eps))
    c = bn.bias.double() - a * bn.running_mean.double()
    shape = [-1] + [1] * (weight.dim() - 1)
    folded_w = (weight.double() * a.reshape(shape)).to(weight.dtype)
    b = torch.zeros_like(a) if bias is None else bias.double()
    return folded_w, (a * b + c).to(weight.dtype)


class QATConv2d(nn.Conv2d):
    """Conv2d, with the BatchNorm2d that followed it (``bn``), trained on its
    fake-quantized, BatchNorm-folded weight (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, config: QATConfig):
        # Built on the meta device (no allocation, no draw from the random generator),
        # then given the conv's own parameters.
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.bn = bn
        self.bn_frozen = False
        self.weight_fq = WeightFakeQuantize(config, conv.out_channels)

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the deployed conv has (BatchNorm folded with running stats)."""
        if self.bn is None:
            return self.weight, self.bias
        return fold_batchnorm(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training and not self.bn_frozen:
            return self._forward_batch_stats(x)
        weight, bias = self.folded_weight_bias()
        return self._conv_forward(x, self.weight_fq(weight), bias)

    def _forward_batch_stats(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
        y = self._conv_forward(x, self.weight_fq(self.weight * s), None) / s.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return bn(y)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", bn folded" if self.bn is not None else "")


class QATLinear(nn.Linear):
    """Linear trained on its fake-quantized weight."""

    def __init__(self, linear: nn.Linear, config: QATConfig):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_fq = WeightFakeQuantize(config, linear.out_features)

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fq(self.weight), self.bias)


QAT_LAYERS = (QATConv2d, QATLinear)


# ------------------------------------------------------------------ graph matching

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
# Ops that only move, repeat or select values (onnxruntime runs their ONNX forms on
# integers: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Tile, Expand, MaxPool).
_TRANSPARENT_MODULES = (nn.Flatten, nn.Unflatten, nn.MaxPool2d, nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    F.max_pool2d, F.dropout,
}
_TRANSPARENT_METHODS = {
    "flatten", "view", "reshape", "contiguous", "transpose", "permute", "squeeze", "unsqueeze",
    "repeat", "expand",
}


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that commute with per-tensor fake quantization (reshapes, max-pool, and
    dropout/identity, which are identities in the exported eval model)."""
    if node.op == "call_module":
        return isinstance(_module(gm, node), _TRANSPARENT_MODULES)
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCTIONS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fusable_bn(gm: fx.GraphModule, conv_node: fx.Node, conv: nn.Conv2d, calls: dict) -> fx.Node | None:
    """The BatchNorm2d node that is the conv output's only consumer, when it can be folded."""
    users = list(conv_node.users)
    bn_node = users[0] if len(users) == 1 else None
    bn = _module(gm, bn_node) if bn_node is not None else None
    if not isinstance(bn, nn.BatchNorm2d) or bn_node.args[:1] != (conv_node,):
        logger.debug("%s: no BatchNorm2d to fold (its output has %d consumers, the first %s)",
                     conv_node.target, len(users), users[0].format_node() if users else None)
        return None
    if not (bn.affine and bn.track_running_stats) or bn.num_features != conv.out_channels:
        logger.debug("not folding %s into %s: BatchNorm without affine parameters or running stats, "
                     "or channel count differs", bn_node.target, conv_node.target)
        return None
    if calls[conv_node.target] > 1 or calls[bn_node.target] > 1:
        logger.debug("not folding %s into %s: the module is called more than once",
                     bn_node.target, conv_node.target)
        return None
    return bn_node


def _replace_layers(gm: fx.GraphModule, config: QATConfig) -> list[fx.Node]:
    """Swap Conv2d(+BatchNorm2d)/Linear modules for QAT layers; returns the nodes calling them
    (a module called twice is converted once and listed twice)."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    layers, erased, converted = [], set(), set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        module = _module(gm, node)
        if node.target in converted:
            layers.append(node)
        elif type(module) is nn.Conv2d:
            bn_node = _fusable_bn(gm, node, module, calls)
            bn = _module(gm, bn_node) if bn_node is not None else None
            _set_module(gm, node.target, QATConv2d(module, bn, config))
            if bn_node is not None:
                bn_node.replace_all_uses_with(node)
                gm.graph.erase_node(bn_node)
                erased.add(bn_node)
                gm.delete_submodule(bn_node.target)
            layers.append(node)
            converted.add(node.target)
        elif type(module) is nn.Linear:
            _set_module(gm, node.target, QATLinear(module, config))
            layers.append(node)
            converted.add(node.target)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            logger.debug("%s: %s is a subclass of Conv2d/Linear; left float", node.target, type(module).__name__)
    return layers


class _Quantizers(nn.Module):
    """Container of the activation quantizers, one per quantized tensor, keyed by the fx
    node name of that tensor (``x``, ``features_2``, ...); it also keeps the config
    (a GraphModule's own attributes do not survive ``copy.deepcopy``)."""

    def __init__(self, config: QATConfig):
        super().__init__()
        self.config = config


def _insert_quantizer(gm: fx.GraphModule, tensor: fx.Node, config: QATConfig, done: dict) -> None:
    """Quantize ``tensor`` once; every consumer except the graph output reads the result."""
    if tensor in done:
        return
    users = [u for u in tensor.users if u.op != "output"]
    if not users:
        logger.debug("%s: only a graph output reads it; left float", tensor.name)
        return
    container = gm.get_submodule(ACTIVATION_QUANTIZERS)
    key = tensor.name
    while hasattr(container, key):
        key += "_"
    target = f"{ACTIVATION_QUANTIZERS}.{key}"
    container.add_module(key, ActivationFakeQuantize(config, target))
    anchor = tensor
    if tensor.op == "placeholder":  # keep the placeholders together at the top
        anchor = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(anchor):
        quantized = gm.graph.call_module(target, (tensor,))
    for user in users:
        user.replace_input_with(tensor, quantized)
    done[tensor] = quantized
    done[quantized] = quantized


def _input_source(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    while _is_transparent(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def prepare_qat(module: nn.Module, config: QATConfig | None = None) -> fx.GraphModule:
    """A copy of ``module`` with fake quantization on the weights of its Conv2d (folded
    with the BatchNorm2d after it) and Linear layers and on the activations around them.

    The result is a ``torch.fx.GraphModule`` that trains like the original (same
    parameters, plus LSQ scales when ``config.learn_activation_scales``). Record the
    activation ranges with `calibrate_qat` or let the first ``config.observe_steps``
    training steps record them, then train and `export_qat`.
    """
    config = config or QATConfig()
    if not isinstance(config, QATConfig):
        raise UsageError(f"config must be a QATConfig, got {type(config).__name__}")
    config.check_exportable()
    if not isinstance(module, nn.Module):
        raise UsageError(f"prepare_qat needs a torch.nn.Module, got {type(module).__name__}")
    if any(isinstance(m, (*QAT_LAYERS, ActivationFakeQuantize, WeightFakeQuantize)) for m in module.modules()):
        raise UsageError("the module is already prepared for QAT (prepare_qat was called on it)")
    try:
        gm = fx.symbolic_trace(copy.deepcopy(module))
    except Exception as e:  # fx raises many types for untraceable Python
        raise UsageError(
            f"prepare_qat cannot trace {type(module).__name__} with torch.fx ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); move data-dependent control flow out of "
            "forward or prepare the traceable submodules separately"
        ) from None
    layers = _replace_layers(gm, config)
    if not layers:
        raise UsageError(f"{type(module).__name__} has no Conv2d or Linear layer to quantize")
    if hasattr(gm, ACTIVATION_QUANTIZERS):
        raise UsageError(f"the module already has an attribute '{ACTIVATION_QUANTIZERS}'")
    gm.add_module(ACTIVATION_QUANTIZERS, _Quantizers(config))
    done: dict[fx.Node, fx.Node] = {}
    for node in layers:
        if not node.args or not isinstance(node.args[0], fx.Node):
            logger.debug("%s: no activation input argument; its input stays float", node.target)
            continue
        _insert_quantizer(gm, _input_source(gm, node.args[0]), config, done)
    for node in layers:
        users = list(node.users)
        output = users[0] if len(users) == 1 and _is_relu(gm, users[0]) else node
        _insert_quantizer(gm, output, config, done)
    gm.graph.lint()
    gm.recompile()
    gm.train(module.training)
    logger.debug("prepared %d layers, %d activation quantizers", len(layers),
                 len(list(gm.get_submodule(ACTIVATION_QUANTIZERS).children())))
    return gm


# ------------------------------------------------------------------ ranges and state


def quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """``{fully qualified name: quantizer}`` for every weight and activation quantizer."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, (WeightFakeQuantize, ActivationFakeQuantize))
    }


def qat_config(model: nn.Module) -> QATConfig | None:
    """The config a model was prepared with, or None."""
    container = getattr(model, ACTIVATION_QUANTIZERS, None)
    return container.config if isinstance(container, _Quantizers) else None


def _activation_quantizers(model: nn.Module) -> list[ActivationFakeQuantize]:
    found = [m for m in model.modules() if isinstance(m, ActivationFakeQuantize)]
    if not found and not any(isinstance(m, QAT_LAYERS) for m in model.modules()):
        raise UsageError("the model has no QAT layers: call prepare_qat first")
    return found


def freeze_activation_ranges(model: nn.Module) -> int:
    """Freeze every activation quantizer that is still recording; returns how many.
    Raises `UsageError` naming the quantizers that have recorded nothing."""
    pending = [q for q in _activation_quantizers(model) if not q.frozen]
    empty = [q.label for q in pending if not q.seen]
    if empty:
        raise UsageError(
            f"activation quantizers with no recorded range: {', '.join(empty)}; run "
            "calibrate_qat (or training steps) on data that reaches them"
        )
    for q in pending:
        q.freeze()
    return len(pending)


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every forward (in eval mode, no gradients) records activation ranges of
    the quantizers that are not frozen yet; on exit they are frozen."""
    pending = [q for q in _activation_quantizers(model) if not q.frozen]
    was_training = model.training
    model.eval()
    for q in pending:
        q.calibrating = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for q in pending:
            q.calibrating = False
        model.train(was_training)
    freeze_activation_ranges(model)


def calibrate_qat(model: nn.Module, batches: Iterable) -> int:
    """Run ``model`` on ``batches`` (tensors, or tuples of positional inputs) in eval
    mode, record the activation ranges, freeze them. Returns the number of batches."""
    count = 0
    with calibrating(model):
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
            count += 1
        if not count:
            raise DataError("calibrate_qat: no calibration batches")
    return count


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) BatchNorm statistics updates: training then uses the running
    statistics, i.e. exactly the folded conv that is deployed."""
    for m in model.modules():
        if isinstance(m, QATConv2d):
            m.bn_frozen = frozen
