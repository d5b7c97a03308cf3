"""Builds the optional compiled helper `zenith_onnx._native`; the metadata is in pyproject.toml.

Without a C compiler the build skips it (``optional=True``) and the observers bin with numpy
(the same counts, about twice the time): see `zenith_onnx.observers`.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "zenith_onnx._native",
            ["zenith_onnx/_native.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
            optional=True,
        )
    ]
)
