"""The built-in "synthetic" dataset as an in-memory `datasets.Dataset`.

"synthetic" has a "train" split (samples 0..TRAIN_SIZE-1) and a "validation"
split (samples from VALIDATION_START on), so the two never share a sample
whatever slice is asked for. "synthetic:SIZE" makes SIZExSIZE samples (default
256); tests and quick demos use "synthetic:64". Only the rows a split
expression selects are drawn, so "train[:16]" costs 16 samples, not 400.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from segdeploy.data import synthetic
from segdeploy.data.splits import resolve_split
from segdeploy.errors import SegdeployError

TRAIN_SIZE = 400
VALIDATION_SIZE = 60
VALIDATION_START = 1_000_000
DEFAULT_SIZE = 256
DATA_SEED = 0  # the data never changes with --seed; --seed only drives splitting and training
LENGTHS = {"train": TRAIN_SIZE, "validation": VALIDATION_SIZE}
_FIRST_INDEX = {"train": 0, "validation": VALIDATION_START}


def is_synthetic(name: str) -> bool:
    return name == "synthetic" or name.startswith("synthetic:")


def synthetic_image_size(name: str) -> int:
    if name == "synthetic":
        return DEFAULT_SIZE
    text = name.split(":", 1)[1]
    if not text.isdigit() or not 16 <= int(text) <= 2048:
        raise SegdeployError(
            "--dataset", f"{name!r}: expected synthetic or synthetic:SIZE with SIZE in 16..2048"
        )
    return int(text)


def synthetic_split(name: str, expr: str, *, option: str = "--split"):
    """Rows of the synthetic dataset `name` selected by split expression `expr`."""
    import datasets

    size = synthetic_image_size(name)
    ranges = resolve_split(expr, LENGTHS, where=name, option=option)
    images, masks, names = [], [], []
    for split, start, stop in ranges:
        for i in range(start, stop):
            index = _FIRST_INDEX[split] + i
            img, label = synthetic.synthetic_sample(index, seed=DATA_SEED, size=size)
            images.append({"bytes": _encode(img, "BMP"), "path": None})
            masks.append({"bytes": _encode(label, "PNG"), "path": None})
            names.append(f"{name}/{split}/{i}")
    features = datasets.Features(
        image=datasets.Image(mode="RGB"), annotation=datasets.Image(), name=datasets.Value("string")
    )
    # Built as an Arrow table directly: Dataset.from_dict would re-encode and hash
    # every image, tripling peak memory for the full 256 px set.
    table = pa.table(
        {
            "image": pa.array(images, type=features["image"].pa_type),
            "annotation": pa.array(masks, type=features["annotation"].pa_type),
            "name": pa.array(names, type=pa.string()),
        }
    )
    fingerprint = hashlib.sha256(f"segdeploy {name} {expr} {DATA_SEED}".encode()).hexdigest()[:16]
    return datasets.Dataset(
        table, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint
    )


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    # Encoded by hand rather than by datasets: its default PNG encoder spends more
    # time on these noisy images than drawing them. BMP (images) is lossless and
    # ~50x faster; masks compress well at PNG level 1.
    buf = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()
