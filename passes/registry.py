"""Graph passes by name.

Every pass module registers its class here under a short string name with
`@register("name")`; the first line of the class docstring is the one-line description
that `zenith-onnx optimize --list-passes` prints. `build_pipeline(["a", "b"])` returns a
pass that runs them in order and, when one fails, raises `PassFailedError` naming it and
the passes that ran before it (the habit of torch.fx's pass manager).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence

import onnx_ir as ir

from zenith_onnx.errors import PassFailedError, UsageError, ZenithError

__all__ = [
    "PassSpec",
    "register",
    "available",
    "create",
    "build_pipeline",
    "Pipeline",
    "DEFAULT_OPTIMIZE",
    "QUANTIZE_PREPARE",
]

logger = logging.getLogger(__name__)

# The float-preserving pipeline `zenith-onnx optimize` runs by default.
DEFAULT_OPTIMIZE: tuple[str, ...] = (
    "lift_constants", "fuse_bias_add", "fold_batchnorm", "fuse_hardswish", "fuse_layernorm", "cleanup",
)
# The float-preserving passes quantize runs before planning Q/DQ: the same folds, and
# activations written with ops that onnxruntime runs on integers (the second
# fuse_bias_add takes the "+ 3" of an expanded hard-sigmoid into the Conv before it).
QUANTIZE_PREPARE: tuple[str, ...] = (
    "lift_constants", "fuse_bias_add", "fold_batchnorm", "fuse_layernorm", "fuse_hardswish",
    "expand_hard_activations", "fuse_bias_add", "div_to_mul", "fold_scale_into_conv", "cleanup", "infer_shapes",
)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    factory: Callable[..., ir.passes.PassBase]
    summary: str
    float_preserving: bool
    # False for passes that need inputs only the quantize pipeline gives (ranges).
    standalone: bool = True


_REGISTRY: dict[str, PassSpec] = {}


def register(name: str, *, float_preserving: bool = True, standalone: bool = True):
    """Class decorator: make a pass available by ``name``. ``standalone=False`` marks a
    pass that needs what only `zenith-onnx quantize` provides (calibration ranges)."""

    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name].factory is not cls:
            raise ValueError(f"pass name '{name}' is registered twice")
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        _REGISTRY[name] = PassSpec(name, cls, summary, float_preserving, standalone)
        cls.pass_name = name
        return cls

    return decorate


def _load_all() -> None:
    # Importing the package imports every pass module, which registers itself.
    import zenith_onnx.passes  # noqa: F401


def available() -> list[PassSpec]:
    """All registered passes, sorted by name."""
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def create(name: str, **options) -> ir.passes.PassBase:
    _load_all()
    try:
        spec = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UsageError(f"unknown pass '{name}' (known passes: {known})") from None
    if not spec.standalone and not options:
        raise UsageError(f"pass '{name}' needs calibration ranges: use `zenith-onnx quantize`")
    return spec.factory(**options)


class Pipeline(ir.passes.InPlacePass):
    """Run passes in order; a failing pass is reported by name with those before it."""

    def __init__(self, passes: Sequence[ir.passes.PassBase]):
        super().__init__()
        self.passes = list(passes)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for i, pass_ in enumerate(self.passes):
            name = _name_of(pass_)
            before = ", ".join(_name_of(p) for p in self.passes[:i]) or "none"
            logger.info("running pass %s", name)
            try:
                result = pass_(model)
            except ZenithError as e:
                raise PassFailedError(f"pass '{name}': {e}") from e
            except Exception as e:
                raise PassFailedError(
                    f"pass '{name}' failed (passes run before it: {before}): "
                    f"{type(e).__name__}: {_root_message(e)}"
                ) from e
            if result.model is not model:
                raise RuntimeError(f"pass '{name}' returned a new model; pipeline passes work in place")
            modified = modified or result.modified
        return ir.passes.PassResult(model, modified)


def _name_of(pass_: ir.passes.PassBase) -> str:
    return getattr(pass_, "pass_name", type(pass_).__name__)


def _root_message(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return (str(e).splitlines() or [""])[0][:300]


def build_pipeline(names: Iterable[str], **options_by_pass: dict) -> Pipeline:
    """A pipeline of registered passes; ``options_by_pass[name]`` is passed to that pass."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UsageError("empty pass list")
    return Pipeline([create(n, **options_by_pass.get(n, {})) for n in names])
