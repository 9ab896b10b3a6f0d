"""Decode rows ourselves so that a bad file is reported by name.

Load time only checks what file headers tell (pairing, readability, sizes).
A truncated image or an out-of-range label only shows when pixels are
decoded; inside a Trainer that would surface as a bare traceback from a
DataLoader, so `segdeploy train` runs `check_dataset` first, and evaluation
loops can read rows through `iter_examples`, which raises the same errors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from segdeploy.data.labels import label_array
from segdeploy.data.spec import SegmentationData
from segdeploy.errors import SegdeployError


def iter_examples(
    data: SegmentationData, which: str = "eval", num_labels: int | None = None
) -> Iterator[tuple[Image.Image, np.ndarray, str]]:
    """(RGB image, checked int64 label map, name) for each row of data.train or data.eval.

    Labels are reduced per data.spec and checked against num_labels (default:
    len(data.id2label)); any bad file raises SegdeployError naming it.
    """
    if which not in ("train", "eval"):
        raise ValueError(f"which must be 'train' or 'eval', got {which!r}")
    ds = getattr(data, which)
    if ds is None:
        return
    num_labels = len(data.id2label) if num_labels is None else num_labels
    for row in undecoded(ds):
        image = _decode(row["image"], row["name"], mode="RGB")
        mask = _decode(row["annotation"], row["name"], mode=None)
        where = _where(row["annotation"], row["name"])
        if image.size != mask.size:
            raise SegdeployError(
                where,
                f"mask is {mask.size[0]}x{mask.size[1]} but its image "
                f"{_where(row['image'], row['name'])} is {image.size[0]}x{image.size[1]}",
            )
        labels = label_array(
            mask,
            reduce_labels=bool(data.spec.reduce_labels),
            ignore_index=data.spec.ignore_index,
            num_labels=num_labels,
            where=where,
        )
        yield image, labels, row["name"]


def check_dataset(data: SegmentationData, num_labels: int | None = None) -> int:
    """Decode all train and eval rows; raise SegdeployError naming the first bad file.

    Checks that images and masks decode, that each mask has its image's size,
    and that every label value (after reduce_labels) is a class or the ignore
    index. Returns the number of rows checked.
    """
    checked = 0
    for which in ("train", "eval"):
        for _ in iter_examples(data, which, num_labels):
            checked += 1
    return checked


def undecoded(ds):
    import datasets

    # Raw {"path", "bytes"} values, so that decoding errors are ours to report.
    return ds.cast_column("image", datasets.Image(decode=False)).cast_column(
        "annotation", datasets.Image(decode=False)
    )


def decode_annotation(row: dict) -> Image.Image:
    """The mask of an undecoded row (see `undecoded`); a bad file raises naming it."""
    return _decode(row["annotation"], row["name"], mode=None)


def _decode(value: dict, name: str, *, mode: str | None) -> Image.Image:
    import datasets

    try:
        # datasets' own decoder, so EXIF orientation and modes match what the Trainer sees.
        return datasets.Image(mode=mode).decode_example(value)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise SegdeployError(
            _where(value, name), f"cannot read image: {' '.join(str(err).split())}"
        ) from None


def _where(value: dict, name: str) -> str:
    path = value.get("path")
    return path if path and os.path.exists(path) else name
