"""Label maps and class names: turn a mask into checked class ids, read id2label files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError


def mask_values(annotation: Image.Image | np.ndarray, *, where: str) -> np.ndarray:
    """The raw label values of a mask as an HxW integer array.

    Palette (P) masks carry the label as the palette index, so they are read
    as-is; converting them to L would replace labels by colour luminance.
    """
    if isinstance(annotation, Image.Image):
        if annotation.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
            arr = np.asarray(annotation)
        else:
            arr = np.asarray(annotation)
            if arr.ndim == 3 and arr.shape[2] in (2, 4):
                arr = arr[..., : arr.shape[2] - 1]  # drop alpha
            if arr.ndim == 3 and not (arr == arr[..., :1]).all():
                raise SegdeployError(
                    where,
                    f"mask is a colour ({annotation.mode}) image; expected a single-channel "
                    "label map (mode L or P, one class id per pixel)",
                )
            if arr.ndim == 3:
                arr = arr[..., 0]
    else:
        arr = np.asarray(annotation)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise SegdeployError(where, f"mask must be 2-D (height x width), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        raise SegdeployError(where, f"mask values must be integers, got {arr.dtype}")
    return arr


def label_array(
    annotation: Image.Image | np.ndarray,
    *,
    reduce_labels: bool,
    ignore_index: int,
    num_labels: int,
    where: str,
) -> np.ndarray:
    """Class ids (int64, HxW) of a mask, checked against `num_labels`.

    reduce_labels follows Transformers' `do_reduce_labels` and evaluate's
    `reduce_labels`: 0 becomes ignore_index, v becomes v - 1, and a raw 255
    stays 255 (the usual "void" value of PNG masks).
    Raises SegdeployError(where, ...) for values outside 0..num_labels-1 that are
    not the ignore index, so a bad mask is reported by file, not by a loss crash.
    """
    raw = mask_values(annotation, where=where).astype(np.int64)
    if reduce_labels:
        labels = raw - 1
        labels[raw == 0] = ignore_index
        labels[raw == 255] = 255
    else:
        labels = raw
    bad = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:8]) + (" ..." if len(values) > 8 else "")
        how = " after reducing labels (0 -> ignore, v -> v-1)" if reduce_labels else ""
        hint = (
            " (is --reduce-labels wrong for this data?)"
            if reduce_labels or (values == num_labels).all()
            else ""
        )
        raise SegdeployError(
            where,
            f"mask values {shown} fall outside the {num_labels} classes 0..{num_labels - 1}"
            f"{how} and are not the ignore index {ignore_index}{hint}",
        )
    return labels


def read_id2label(path: str | os.PathLike) -> dict[int, str]:
    """Read and check an id2label JSON file: {"0": "name", ...} with ids 0..N-1."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SegdeployError(path, "id2label file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SegdeployError(path, f"cannot read id2label file: {err}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise SegdeployError(path, f"id2label file is not valid JSON: {err}") from None
    return check_id2label(obj, where=str(path))


def check_id2label(obj: object, *, where: str) -> dict[int, str]:
    """Validate a mapping of class ids to names; keys may be ints or digit strings."""
    expected = 'a JSON object of class ids to names, e.g. {"0": "road", "1": "car"}'
    if not isinstance(obj, dict) or not obj:
        raise SegdeployError(where, f"id2label must be {expected}")
    id2label: dict[int, str] = {}
    for key, value in obj.items():
        try:
            idx = int(key)
        except (TypeError, ValueError):
            raise SegdeployError(
                where, f"id2label key {key!r} is not an integer; expected {expected}"
            ) from None
        if isinstance(key, bool) or str(idx) != str(key).strip():
            raise SegdeployError(
                where, f"id2label key {key!r} is not an integer; expected {expected}"
            )
        if not isinstance(value, str) or not value:
            raise SegdeployError(
                where, f"id2label value for {key!r} is not a class name; expected {expected}"
            )
        id2label[idx] = value
    if sorted(id2label) != list(range(len(id2label))):
        raise SegdeployError(
            where,
            f"id2label ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)[:10]}",
        )
    return dict(sorted(id2label.items()))
