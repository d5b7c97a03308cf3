"""The numpy QAT API (zenith_onnx.qat without torch): the Zenith documentation's examples
run with only the import line changed, and every number agrees with zenith_onnx.kernels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from zenith_onnx import kernels
from zenith_onnx.errors import DataError, UsageError, ZenithError
from zenith_onnx.qat import (
    QATConfig,
    QuantizedTensor,
    convert_qat_to_quantized,
    fold_bn_into_conv,
    prepare_model_for_qat,
)

SEED = Path(__file__).parent / "data" / "seed_000_aa555936d174d224.txt"
SHARED_SEED = Path(__file__).parents[2] / "shared" / "seeds" / SEED.name.removeprefix("seed_")
DOCUMENTED_IMPORT = "from zenith.optimization.qat import"


def seed_blocks() -> tuple[list[str], list[str]]:
    """The python code blocks (import line rewritten) and the documented output blocks."""
    text = SEED.read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    outputs = re.findall(r"\*\*Output:\*\*\n```\n(.*?)```", text, flags=re.S)
    assert all(DOCUMENTED_IMPORT in block or "import numpy" in block for block in code)
    return [block.replace(DOCUMENTED_IMPORT, "from zenith_onnx.qat import") for block in code], outputs


def test_seed_copy_matches_the_shared_seed():
    if not SHARED_SEED.exists():
        pytest.skip("the shared seeds folder is not beside this clone")
    assert SEED.read_bytes() == SHARED_SEED.read_bytes()


def test_seed_examples_run_and_print_the_documented_output(capsys):
    code, outputs = seed_blocks()
    assert len(code) == 5 and outputs == ["Folded weight shape: (4, 3, 3, 3)\n"]
    namespace: dict = {}
    with pytest.warns(UserWarning, match="'fc2' was never calibrated") as caught:
        for block in code:
            exec(compile(block, str(SEED), "exec"), namespace)  # noqa: S102 (the documented examples)
    assert len(caught) == 1, [str(w.message) for w in caught]  # fc1 was calibrated: no warning
    assert capsys.readouterr().out == outputs[0]

    # What the examples produced, checked beyond the printed line.
    quantized = namespace["quantized_weights"]
    assert set(quantized) == {"fc1", "fc2"}
    fc1 = quantized["fc1"]
    assert isinstance(fc1, QuantizedTensor)
    assert fc1.values.dtype == np.int8 and fc1.values.shape == (256, 784)
    assert fc1.scale.shape == (256,) and fc1.axis == 0 and fc1.bits == 8
    assert np.all(fc1.zero_point == 0) and fc1.values.min() >= -127 and fc1.values.max() <= 127
    folded_w, folded_b = namespace["folded_weight"], namespace["folded_bias"]
    assert folded_w.dtype == np.float32 and folded_b.dtype == np.float32  # var was float64
    assert namespace["trainer"].activation_quantization("fc1") is not None
    assert namespace["trainer"].activation_quantization("fc2") is None


def test_seed_examples_run_without_torch(tmp_path):
    """`import zenith_onnx.qat` and the whole seed API work when torch cannot be imported."""
    code, outputs = seed_blocks()
    script = tmp_path / "seed.py"
    script.write_text(
        "import sys, warnings\n"
        "sys.modules['torch'] = None  # any 'import torch' now fails\n"
        "warnings.simplefilter('ignore')\n" + "\n".join(code)
        + "\nimport zenith_onnx.qat as qat\n"
        "from zenith_onnx.errors import UsageError\n"
        "assert sys.modules['torch'] is None\n"
        "try:\n"
        "    qat.prepare_qat\n"
        "except UsageError as e:\n"
        "    print('needs torch:', e)\n"
    )
    repo = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(outputs[0])
    assert "needs torch: zenith_onnx.qat.prepare_qat needs torch: install the qat extra" in done.stdout


# ------------------------------------------------------------------ QATConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_bits": 1}, "weight_bits must be between 2 and 16, got 1"),
        ({"activation_bits": 17}, "activation_bits must be between 2 and 16, got 17"),
        ({"weight_bits": 8.0}, "weight_bits must be an integer"),
        ({"weight_bits": True}, "weight_bits must be an integer"),
        ({"symmetric_weights": "yes"}, "symmetric_weights must be True or False"),
        ({"observe_steps": -1}, "observe_steps must be an integer >= 0"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_error(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        QATConfig(**kwargs)
    assert isinstance(info.value, ZenithError)


def test_config_repr_and_ranges():
    config = QATConfig(weight_bits=4, activation_bits=8)
    assert repr(config).startswith(
        "QATConfig(weight_bits=4, activation_bits=8, symmetric_weights=True, per_channel_weights=True"
    )
    assert config.weight_range == kernels.int_range(4, signed=True, narrow=True) == (-7, 7)
    assert config.activation_range == (0, 255)
    assert QATConfig(symmetric_weights=False).weight_range == (-128, 127)
    assert QATConfig(signed_activations=True).activation_range == (-128, 127)
    assert QATConfig(per_channel_weights=False).weight_axis is None
    QATConfig(weight_bits=4).check_exportable()
    with pytest.raises(UsageError, match="weight_bits=6 has no ONNX QuantizeLinear type"):
        QATConfig(weight_bits=6).check_exportable()


# ------------------------------------------------------------------ trainer and convert


def test_trainer_rejects_unknown_layers_and_bad_names():
    trainer = prepare_model_for_qat(["fc1", "fc2"], QATConfig())
    with pytest.raises(UsageError, match=r"unknown layer 'fc9' \(layers: fc1, fc2\)"):
        trainer.calibrate("fc9", np.ones((2, 2), np.float32), np.ones((1, 2), np.float32))
    with pytest.raises(UsageError, match="unknown layer 'fc9'"):
        convert_qat_to_quantized(trainer, {"fc9": np.ones((2, 2), np.float32)})
    with pytest.raises(UsageError, match="repeated: fc1"):
        prepare_model_for_qat(["fc1", "fc1"])
    with pytest.raises(UsageError, match="not one string"):
        prepare_model_for_qat("fc1")
    with pytest.raises(DataError, match=r"layer 'fc1': weights must be \(out, in\) or \(out, in, kh, kw\)"):
        trainer.calibrate("fc1", np.ones(3, np.float32), None)
    trainer.calibrate("fc1", np.ones((4, 3), np.float32), None)
    with pytest.raises(DataError, match="weights have 5 output channels but the layer was calibrated with 4"):
        convert_qat_to_quantized(trainer, {"fc1": np.ones((5, 3), np.float32)})
    with pytest.raises(DataError, match="not finite"):
        trainer.calibrate("fc2", np.ones((4, 3), np.float32), np.array([np.nan], np.float32))


def test_trainer_records_ranges_and_converts_with_the_kernels():
    rng = np.random.default_rng(0)
    trainer = prepare_model_for_qat(["conv", "fc"], QATConfig())
    acts = [rng.normal(size=(8, 3, 6, 6)).astype(np.float32) for _ in range(3)]
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    for a in acts:
        trainer.calibrate("conv", w, a)
    scale, zp = trainer.activation_quantization("conv")
    expected = kernels.scale_zero_point(min(a.min() for a in acts), max(a.max() for a in acts),
                                        kernels.int_range(8, signed=False), symmetric=False)
    assert scale == expected[0] and zp == expected[1]

    w2 = (w * 1.5).astype(np.float32)  # trained further after calibration
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: no warning
        q = convert_qat_to_quantized(trainer, {"conv": w2})["conv"]
    qrange = kernels.int_range(8, signed=True, narrow=True)
    ref_scale, ref_zp = kernels.scale_zero_point(w2.min(axis=(1, 2, 3)), w2.max(axis=(1, 2, 3)), qrange, True)
    np.testing.assert_array_equal(q.scale, ref_scale)
    np.testing.assert_array_equal(q.values, kernels.quantize(w2, ref_scale, ref_zp, qrange, axis=0))
    # The largest weight of each channel lands on +/-127 and rounding error is at most half a step.
    assert np.all(np.abs(q.values).reshape(4, -1).max(axis=1) == 127)
    err = np.abs(q.dequantize() - w2).reshape(4, -1).max(axis=1)
    assert np.all(err <= q.scale / 2 * (1 + 1e-6))
    np.testing.assert_array_equal(trainer.fake_quantize("conv", w2), q.dequantize())
    assert "bits=8" in repr(q) and "per channel (axis 0)" in repr(q)


@pytest.mark.parametrize(
    "config, qmin, qmax, dtype",
    [
        (QATConfig(weight_bits=4), -7, 7, np.int8),
        (QATConfig(weight_bits=4, symmetric_weights=False), -8, 7, np.int8),
        (QATConfig(weight_bits=16), -32767, 32767, np.int16),
        (QATConfig(per_channel_weights=False), -127, 127, np.int8),
    ],
)
def test_convert_other_bit_widths_and_layouts(config, qmin, qmax, dtype):
    rng = np.random.default_rng(1)
    w = (rng.normal(size=(6, 5)) + 0.3).astype(np.float32)
    trainer = prepare_model_for_qat(["fc"], config)
    with pytest.warns(UserWarning, match="activation range is unknown"):
        q = convert_qat_to_quantized(trainer, {"fc": w})["fc"]
    assert q.values.dtype == dtype and q.values.min() >= qmin and q.values.max() <= qmax
    assert q.bits == config.weight_bits and q.qrange == (qmin, qmax)
    if config.per_channel_weights:
        assert q.axis == 0 and q.scale.shape == (6,)
    else:
        assert q.axis is None and q.scale.shape == ()
    if not config.symmetric_weights:
        assert np.any(q.zero_point != 0)  # the range is not centred on zero
        assert q.values.min() == qmin and q.values.max() == qmax
    step = q.scale if q.axis is None else q.scale.reshape(-1, 1)
    assert np.all(np.abs(q.dequantize() - w) <= step / 2 * (1 + 1e-6))


def test_convert_calls_the_shared_kernels(monkeypatch):
    """PTQ and QAT agree because both go through zenith_onnx.kernels."""
    calls = []
    for name in ("scale_zero_point", "quantize", "dequantize"):
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, name, spy)
    trainer = prepare_model_for_qat(["fc"])
    trainer.calibrate("fc", np.eye(3, dtype=np.float32), np.ones((2, 3), np.float32))
    q = convert_qat_to_quantized(trainer, {"fc": np.eye(3, dtype=np.float32)})["fc"]
    q.dequantize()
    assert {"scale_zero_point", "quantize", "dequantize"} <= set(calls)


# ------------------------------------------------------------------ BatchNorm folding


def _bn(rng, channels, var_dtype=np.float32):
    return (
        rng.normal(size=channels).astype(np.float32),
        (np.abs(rng.normal(size=channels)) + 0.1).astype(var_dtype),
        rng.normal(size=channels).astype(np.float32),
        rng.normal(size=channels).astype(np.float32),
    )


def test_fold_bn_into_conv_math_dtype_and_kernel(monkeypatch):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=4).astype(np.float32)
    mean, var, gamma, beta = _bn(rng, 4, np.float64)
    calls = []
    original = kernels.fold_batchnorm_into_weight
    monkeypatch.setattr(kernels, "fold_batchnorm_into_weight",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    fw, fb = fold_bn_into_conv(w, b, mean, var, gamma, beta)
    assert calls == [1]  # the kernel of the ONNX BatchNorm-folding pass
    assert fw.dtype == np.float32 and fb.dtype == np.float32 and fw.shape == w.shape
    a = gamma.astype(np.float64) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(fw, w * a.reshape(-1, 1, 1, 1), rtol=1e-6)
    np.testing.assert_allclose(fb, a * (b - mean) + beta, rtol=1e-6, atol=1e-6)
    # Exactly what the kernel computes, and BN(conv(x)) == folded conv(x) for a 1x1 input patch.
    kw, kb = original(w, b, gamma, beta, mean, var, 1e-5)
    np.testing.assert_array_equal(fw, kw)
    np.testing.assert_array_equal(fb, kb)
    x = rng.normal(size=(3, 3, 3)).astype(np.float32)
    conv = np.tensordot(w, x, axes=3) + b
    bn = gamma * (conv - mean) / np.sqrt(var + 1e-5) + beta
    np.testing.assert_allclose(np.tensordot(fw, x, axes=3) + fb, bn, rtol=1e-5, atol=1e-5)


def test_fold_bn_into_conv_without_bias_linear_and_eps():
    rng = np.random.default_rng(3)
    mean, var, gamma, beta = _bn(rng, 5)
    w = rng.normal(size=(5, 7)).astype(np.float32)
    fw, fb = fold_bn_into_conv(w, None, mean, var, gamma, beta, eps=1e-3)
    a = gamma / np.sqrt(var.astype(np.float64) + 1e-3)
    np.testing.assert_allclose(fb, beta - a * mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fw, w * a[:, None], rtol=1e-6)
    w16 = w.astype(np.float16)
    assert fold_bn_into_conv(w16, None, mean, var, gamma, beta)[0].dtype == np.float16


def test_fold_bn_into_conv_checks_shapes():
    rng = np.random.default_rng(4)
    mean, var, gamma, beta = _bn(rng, 4)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    with pytest.raises(DataError, match=r"gamma has shape \(3,\), expected \(4,\) \(one value per output channel"):
        fold_bn_into_conv(w, None, mean, var, gamma[:3], beta)
    with pytest.raises(DataError, match=r"bias has shape \(5,\), expected \(4,\)"):
        fold_bn_into_conv(w, np.zeros(5, np.float32), mean, var, gamma, beta)
    with pytest.raises(DataError, match="weight must be a float array of rank >= 2"):
        fold_bn_into_conv(np.zeros(4, np.float32), None, mean, var, gamma, beta)
    with pytest.raises(DataError, match="var \\+ eps must be positive"):
        fold_bn_into_conv(w, None, mean, -np.ones(4), gamma, beta, eps=0.0)
