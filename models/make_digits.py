"""Make the digits demo's shipped files (run once by us; the demo itself needs no torch).

    .venv/bin/pip install scikit-learn          # only this script needs it
    .venv/bin/python models/make_digits.py      # all files below
    .venv/bin/python models/make_digits.py --qat-only   # only digits_qat4.onnx (reuses the float weights)

Writes, beside this script:

- ``digits.npz``: the 8x8 UCI digits that ship inside scikit-learn (no network), scaled to
  [0, 1], upsampled 2x (nearest) to 1x16x16 so the convolutions have some work to do, split
  1,437 train / 360 test (stratified, seed 0). Keys x_train, y_train, x_test, y_test
  (float32 (N, 1, 16, 16) / int64 (N,)).
- ``digits_cnn.onnx``: a small CNN, 4 x (Conv + BatchNorm + ReLU) with two max-pools and a
  Linear head, trained in torch with fixed seeds and exported with its BatchNormalization
  nodes kept (dynamo exporter, ``optimize=False``, opset 18), input ``x`` [1, 1, 16, 16],
  output logits [1, 10].
- ``digits_calib.npz``: 128 training samples keyed by the input name, shaped
  (128, 1, 1, 16, 16): one (1, 1, 16, 16) feed per sample.
- ``digits_qat4.onnx``: the same network fine-tuned with 4-bit weight / 8-bit activation
  fake quantization (`zenith_onnx.qat.prepare_qat`) and exported with
  `zenith_onnx.qat.export_qat` (standard QuantizeLinear/DequantizeLinear, opset 21).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
TEST_SIZE = 360
CALIB_SAMPLES = 128
UPSAMPLE = 2
INPUT_NAME = "x"
OPSET = 18


# --------------------------------------------------------------------------- data


def load_split() -> dict[str, np.ndarray]:
    """The scikit-learn digits, scaled, upsampled and split (deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x = x.repeat(UPSAMPLE, axis=1).repeat(UPSAMPLE, axis=2)[:, None]  # (N, 1, 16, 16)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def calibration_set(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CALIB_SAMPLES training images, one batch-1 feed each: (N, 1, 1, 16, 16)."""
    rng = np.random.default_rng(SEED)
    pick = rng.choice(len(data["x_train"]), size=CALIB_SAMPLES, replace=False)
    return {INPUT_NAME: data["x_train"][np.sort(pick)][:, None]}


# --------------------------------------------------------------------------- model


def build_net() -> nn.Sequential:
    """4 x (Conv3x3 + BN + ReLU), max-pool after the 2nd and 4th, Linear head: ~36k weights."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        *block(16, 32),
        nn.MaxPool2d(2),  # 16x16 -> 8x8
        *block(32, 32),
        *block(32, 48),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(48 * 4 * 4, 10),
    )


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(net: nn.Module, data: dict[str, np.ndarray], epochs: int, lr: float, label: str) -> None:
    """Adam + cosine schedule, batch 32, fixed shuffling; prints loss and test accuracy."""
    x = torch.from_numpy(data["x_train"])
    y = torch.from_numpy(data["y_train"])
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        print(f"[{label}] epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f}, "
              f"test accuracy {torch_accuracy(net, data):.4f}")


@torch.no_grad()
def torch_accuracy(net: nn.Module, data: dict[str, np.ndarray]) -> float:
    net.eval()
    logits = net(torch.from_numpy(data["x_test"]))
    return float((logits.argmax(1).numpy() == data["y_test"]).mean())


def export_float(net: nn.Module, path: Path) -> None:
    """Dynamo export, BatchNormalization kept (optimize=False), eval semantics, batch 1."""
    net.eval()
    example = (torch.zeros(1, 1, 8 * UPSAMPLE, 8 * UPSAMPLE),)
    program = torch.onnx.export(net, example, dynamo=True, optimize=False, opset_version=OPSET,
                                input_names=[INPUT_NAME], output_names=["logits"])
    save_stable(program.model, path)
    check_export(net, path)


def save_stable(model, path: Path) -> None:
    """Save without the exporter's per-node stack traces: they name source lines on this
    machine, so any edit to the QAT code would change the file while the model stays the same."""
    from zenith_onnx.modelio import save_model

    for node in model.graph:
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    save_model(model, path)


def check_export(net: nn.Module, path: Path) -> None:
    """BN must survive and ORT (no graph optimizations) must agree with torch."""
    import onnx

    from zenith_onnx.testing import reference_outputs, relative_error

    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if ops.count("BatchNormalization") != 4:
        sys.exit(f"{path}: expected 4 BatchNormalization nodes, got ops {ops}")
    x = torch.rand(1, 1, 8 * UPSAMPLE, 8 * UPSAMPLE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    got = reference_outputs(str(path), {INPUT_NAME: x.numpy()})["logits"]
    err = relative_error(ref, got)
    print(f"{path.name}: {len(ops)} nodes ({ops.count('BatchNormalization')} BatchNormalization), "
          f"ORT vs torch relative error {err:.2e}, {path.stat().st_size:,} bytes")
    if err > 1e-5:
        sys.exit(f"{path}: ORT and torch disagree (relative error {err:.2e})")


def float_weights_from_onnx(path: Path) -> dict[str, torch.Tensor]:
    """The float state dict, read back from the exported model's initializers (their
    names are the state-dict keys with optimize=False)."""
    import onnx
    from onnx import numpy_helper

    return {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx.load(str(path)).graph.initializer}


# --------------------------------------------------------------------------- QAT (4-bit)


def make_qat4(state_dict: dict[str, torch.Tensor], data: dict[str, np.ndarray], calib: dict[str, np.ndarray],
              path: Path, epochs: int = 8) -> None:
    """Fine-tune the float network with 4-bit weights / 8-bit activations and export it.

    Starts from the trained float weights, records the activation ranges on the
    calibration images (`calibrate_qat`, then frozen), trains with fake quantization
    (BatchNorm statistics frozen for the second half, so the last epochs train exactly
    the folded convolution that is deployed) and exports with `export_qat`. The graph
    input and output are renamed to the float model's names so one data file feeds both.
    """
    from zenith_onnx.qat import QATConfig, calibrate_qat, export_qat, freeze_bn_stats, prepare_qat
    from zenith_onnx.qat.export import verify_export

    seed_everything()
    net = build_net()
    net.load_state_dict(state_dict)
    qat = prepare_qat(net, QATConfig(weight_bits=4, activation_bits=8))
    calibrate_qat(qat, [torch.from_numpy(x) for x in calib[INPUT_NAME]])
    print(f"[qat w4] before fine-tuning: test accuracy {torch_accuracy(qat, data):.4f}")
    train(qat, data, epochs // 2, lr=5e-4, label="qat w4, BN statistics updating")
    freeze_bn_stats(qat)
    train(qat, data, epochs - epochs // 2, lr=2e-4, label="qat w4, BN statistics frozen")
    example = torch.from_numpy(data["x_test"][:1])
    model = export_qat(qat, (example,))
    model.graph.inputs[0].name = INPUT_NAME
    model.graph.outputs[0].name = "logits"
    save_stable(model, path)
    check = verify_export(qat, path, (example,))
    print(f"{path.name}: export vs torch: activations within one step {check.worst_within_one_step():.4f}, "
          f"outputs {check.outputs}, {path.stat().st_size:,} bytes")


# --------------------------------------------------------------------------- main


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: {', '.join(f'{k} {v.dtype}{list(v.shape)}' for k, v in arrays.items())}, "
          f"{path.stat().st_size:,} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--qat-only", action="store_true", help="only make digits_qat4.onnx from digits_cnn.onnx")
    parser.add_argument("--skip-qat", action="store_true", help="do not make digits_qat4.onnx")
    args = parser.parse_args(argv)
    seed_everything()
    start = time.perf_counter()
    data = load_split()
    calib = calibration_set(data)
    if args.qat_only:
        state = float_weights_from_onnx(HERE / "digits_cnn.onnx")
    else:
        save_npz(HERE / "digits.npz", data)
        save_npz(HERE / "digits_calib.npz", calib)
        net = build_net()
        train(net, data, args.epochs, lr=2e-3, label="float")
        export_float(net, HERE / "digits_cnn.onnx")
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if not args.skip_qat:
        make_qat4(state, data, calib, HERE / "digits_qat4.onnx")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
