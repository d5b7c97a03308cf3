"""zenith-onnx: make exported ONNX models fast under ONNX Runtime without losing accuracy.

The ONNX path never imports torch; the QAT stage (`zenith_onnx.qat`) imports it lazily.
"""

from zenith_onnx.errors import DataError, ModelError, PassFailedError, UsageError, ZenithError

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ZenithError",
    "ModelError",
    "DataError",
    "UsageError",
    "PassFailedError",
    "optimize",
]


def optimize(model, passes=None):
    """Run graph passes on an `onnx_ir.Model` in place (default: the float-preserving
    pipeline: lift constants, fold BatchNorm, clean up) and return it."""
    from zenith_onnx.passes import DEFAULT_OPTIMIZE, build_pipeline

    build_pipeline(passes or DEFAULT_OPTIMIZE)(model)
    return model
