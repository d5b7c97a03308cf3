"""Demos run by `zenith-onnx demo NAME`: ``digits`` (the main one, no torch needed) and
``sine`` (PTQ vs QAT, needs the qat extra). Each module exposes
``run_demo(out_dir=None, quick=False)``."""
