"""Decode every row once and report the first bad file by name.

Load time only checks what file headers tell (pairing, readability, sizes).
A truncated image or an out-of-range label only shows when pixels are
decoded; inside a Trainer that would surface as a bare traceback from a
DataLoader worker, so `segdeploy train` runs this first.
"""

from __future__ import annotations

import os

from segdeploy.data.labels import label_array
from segdeploy.data.spec import SegmentationData
from segdeploy.errors import SegdeployError


def check_dataset(data: SegmentationData, num_labels: int | None = None) -> int:
    """Decode all train and eval rows; raise SegdeployError naming the first bad file.

    Checks that images and masks decode, that each mask has its image's size,
    and that every label value (after reduce_labels) is a class or the ignore
    index. Returns the number of rows checked.
    """
    num_labels = len(data.id2label) if num_labels is None else num_labels
    checked = 0
    for ds in (data.train, data.eval):
        if ds is None:
            continue
        for row in _undecoded(ds):
            image = _decode(row["image"], row["name"], mode="RGB")
            mask = _decode(row["annotation"], row["name"], mode=None)
            where = _where(row["annotation"], row["name"])
            if image.size != mask.size:
                raise SegdeployError(
                    where,
                    f"mask is {mask.size[0]}x{mask.size[1]} but its image "
                    f"{_where(row['image'], row['name'])} is {image.size[0]}x{image.size[1]}",
                )
            label_array(
                mask,
                reduce_labels=bool(data.spec.reduce_labels),
                ignore_index=data.spec.ignore_index,
                num_labels=num_labels,
                where=where,
            )
            checked += 1
    return checked


def _undecoded(ds):
    import datasets

    # Raw {"path", "bytes"} values, so that decoding errors are ours to report.
    return ds.cast_column("image", datasets.Image(decode=False)).cast_column(
        "annotation", datasets.Image(decode=False)
    )


def _decode(value: dict, name: str, *, mode: str | None):
    import datasets

    try:
        return datasets.Image(mode=mode).decode_example(value)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise SegdeployError(
            _where(value, name), f"cannot read image: {' '.join(str(err).split())}"
        ) from None


def _where(value: dict, name: str) -> str:
    path = value.get("path")
    return path if path and os.path.exists(path) else name
