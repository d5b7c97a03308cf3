"""Graph passes on onnx_ir, one per module, registered by name in `registry`.

Installed as ``zenith_onnx.passes``. Importing this package registers every pass.
"""

from zenith_onnx.passes import cleanup, insert_qdq, strip_qdq  # noqa: F401
from zenith_onnx.passes import fold_batchnorm  # noqa: F401
from zenith_onnx.passes import fuse_bias_add  # noqa: F401
from zenith_onnx.passes import div_to_mul, expand_hard_activations, fold_scale_into_conv, rewrite_activations  # noqa: F401
from zenith_onnx.passes import equalize_channels, fuse_layernorm, split_channels  # noqa: F401
from zenith_onnx.passes import observe  # noqa: F401
from zenith_onnx.passes.registry import DEFAULT_OPTIMIZE, QUANTIZE_PREPARE, available, build_pipeline, create, register

__all__ = ["DEFAULT_OPTIMIZE", "QUANTIZE_PREPARE", "available", "build_pipeline", "create", "register"]
