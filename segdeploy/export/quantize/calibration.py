"""Calibration data for static int8: preprocessed images of the recorded training split.

Calibrating on training images keeps the evaluation split unseen, so the int8
graph's validation stays honest; the deployment preprocessor prepares them, so
calibration sees exactly the tensors that inference will.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.folders import TRAIN_ARGS_FILE, read_json

DEFAULT_CALIBRATION_IMAGES = 64


def calibration_batches(
    images: Iterable[Any],
    preprocess: Callable[[list], np.ndarray],
    *,
    batch_size: int = 1,
) -> Iterator[np.ndarray]:
    """Preprocessed float32 batches [N, 3, h, w] from PIL images, `batch_size` at a time.

    `preprocess` is the deployment preprocessor
    (segdeploy.runtime.processors.model_processor(model_dir).pixel_values), so
    calibration sees exactly the tensors that inference will.
    """
    if batch_size < 1:
        raise SegdeployError("batch_size", f"must be >= 1, got {batch_size}")
    chunk: list = []
    for image in images:
        chunk.append(image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image)
        if len(chunk) == batch_size:
            yield np.asarray(preprocess(chunk), dtype=np.float32)
            chunk = []
    if chunk:
        yield np.asarray(preprocess(chunk), dtype=np.float32)


def recorded_training_data(model_dir: str | os.PathLike):
    """The DatasetSpec that `segdeploy train` recorded in `model_dir/train_args.json`.

    Cheap (reads one JSON file): callers use it to reject a folder that cannot
    be calibrated before starting a long export.
    """
    from segdeploy.data import DatasetSpec

    args_path = Path(model_dir) / TRAIN_ARGS_FILE
    recorded = read_json(
        args_path,
        missing="missing: int8 calibration needs the training data that `segdeploy train` "
        "records there",
    )
    if not isinstance(recorded, dict) or not isinstance(recorded.get("dataset"), dict):
        raise SegdeployError(args_path, "records no 'dataset' to calibrate on")
    return DatasetSpec.from_dict(recorded["dataset"])


def training_images(model_dir: str | os.PathLike, n: int, *, seed: int = 0) -> list:
    """`n` images drawn (seeded, without replacement) from the training split recorded in
    `model_dir/train_args.json` by `segdeploy train`.

    Calibrating on training images keeps the evaluation split unseen, so the int8
    graph's validation stays honest.
    """
    from segdeploy.data import load_splits

    if n < 1:
        raise SegdeployError("--calibration-images", f"must be >= 1, got {n}")
    spec = recorded_training_data(model_dir)
    data = load_splits(spec, need_train=True)
    if data.train is None or len(data.train) == 0:
        raise SegdeployError(spec.name, "the recorded dataset has no training images")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(data.train), size=min(n, len(data.train)), replace=False))
    rows = data.train.select([int(i) for i in picks])
    return [row["image"].convert("RGB") for row in rows]


def unseen_training_images(model_dir: str | os.PathLike, n: int, *, seed: int = 1) -> list:
    """Up to `n` images (seeded) of the dataset split that `model_dir` was trained on a
    slice of ("train[:64]" -> "train"), from neither the training slice nor the
    evaluation split: images the model never saw, as validation's are. [] when there are
    none (the whole split was trained on) or the rows cannot be told apart (a split made
    of several, an evaluation split carved out of the training one).

    Why: the --max-drop search measured on images the model was trained on, where it is
    surer than on unseen ones and int8 rounding flips fewer labels: a DPT trained on
    train[:64] agreed with fp32 on 99.57% there and with PyTorch on 98.71% of val[:16].
    """
    import dataclasses

    from segdeploy.data import load_splits
    from segdeploy.data.splits import resolve_split, split_names

    spec = recorded_training_data(model_dir)
    names = split_names(spec.split)
    if len(names) != 1 or spec.split.replace(" ", "") == names[0] or spec.test_size:
        return []
    base = names[0]
    whole = load_splits(dataclasses.replace(spec, split=base), need_train=True)
    if whole.train is None or whole.spec.test_size:  # eval carved from the split: rows move
        return []
    used: set[int] = set()
    for expr in (spec.split, whole.spec.eval_split):
        if not expr or base not in split_names(expr):
            continue
        if set(split_names(expr)) != {base}:
            return []
        for _, start, stop in resolve_split(expr, {base: len(whole.train)}, where=spec.name):
            used.update(range(start, stop))
    free = [i for i in range(len(whole.train)) if i not in used]
    if not free:
        return []
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(free, size=min(n, len(free)), replace=False))
    rows = whole.train.select([int(i) for i in picks])
    return [row["image"].convert("RGB") for row in rows]


def training_calibration_batches(
    model_dir: str | os.PathLike, n: int = DEFAULT_CALIBRATION_IMAGES, *, seed: int = 0
) -> Iterator[np.ndarray]:
    """`n` training images of `model_dir`, preprocessed by its deployment preprocessor."""
    from segdeploy.runtime.processors import model_processor

    preprocess = model_processor(model_dir).pixel_values
    return calibration_batches(training_images(model_dir, n, seed=seed), preprocess)


class CalibrationReader:
    """ORT CalibrationDataReader over materialised batches, with the range protocol that
    ORT's strided calibration (CalibStridedMinMax) uses to collect one slice at a time."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches = input_name, batches
        self.set_range(0, len(batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}


def calibration_method_of(name: str):
    from onnxruntime.quantization import CalibrationMethod

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    key = str(name).lower()
    if key not in methods:
        raise SegdeployError(
            "--calibration-method", f"unknown {name!r}; choose one of {', '.join(methods)}"
        )
    return methods[key]


def collect_batches(batches: Iterable[np.ndarray], input_name: str) -> list[np.ndarray]:
    out = []
    for i, batch in enumerate(batches):
        batch = np.asarray(batch)
        if batch.ndim != 4 or batch.shape[0] < 1 or batch.shape[1] != 3:
            raise SegdeployError(
                "calibration data",
                f"batch {i} has shape {batch.shape}; expected [N, 3, height, width]",
            )
        if not np.issubdtype(batch.dtype, np.floating):
            raise SegdeployError(
                "calibration data",
                f"batch {i} is {batch.dtype}; expected preprocessed float32 pixels",
            )
        if not np.isfinite(batch).all():
            raise SegdeployError("calibration data", f"batch {i} contains NaN or infinity")
        out.append(np.ascontiguousarray(batch, dtype=np.float32))
    if not out:
        raise SegdeployError(
            "calibration data", f"no calibration images for input {input_name!r}: need at least 1"
        )
    return out
