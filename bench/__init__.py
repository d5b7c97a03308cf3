"""Benchmarks: zenith-onnx against onnxruntime's quantizer (``python -m bench``, ``make bench``).

Modules: `run` (the whole benchmark, writes bench/results.md and results.json),
`compare_models` (latency, fusion, accuracy per model), `tool_scaling` (quantize time and
peak RSS vs graph size), `latency` (interleaved latency of any .onnx files),
`fold_scale`, `calib_memory`, and `_measure` (shared measuring helpers).
"""
