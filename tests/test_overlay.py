"""Overlays a person can read (issue 23): the photo shows, classes are outlined, a legend."""

from __future__ import annotations

import numpy as np
from PIL import Image

from segdeploy.runtime.overlay import (
    ALPHA,
    LEGEND_MIN_SIDE,
    OUTLINE,
    class_edges,
    legend_rows,
    render_overlay,
)
from segdeploy.runtime.palette import palette_for


def _scene(side: int) -> tuple[Image.Image, np.ndarray]:
    """A grey gradient photo; classes 0 (left half), 2 (right half), 1 (a square)."""
    ramp = np.linspace(40, 220, side, dtype=np.float32)
    photo = np.stack([np.add.outer(ramp, ramp) / 2] * 3, -1).astype(np.uint8)
    labels = np.zeros((side, side), np.uint8)
    labels[:, side // 2 :] = 2
    labels[side // 2 : side // 2 + side // 8, side // 8 : side // 4] = 1
    return Image.fromarray(photo), labels


def test_the_photo_shows_through_and_classes_are_outlined():
    image, labels = _scene(96)  # below the legend size
    palette = palette_for(3)
    out = np.asarray(render_overlay(image, labels, palette, {0: "a", 1: "b", 2: "c"}))
    photo = np.asarray(image).astype(np.float32)
    inside = (80, 80)  # class 2, far from any edge
    expected = (1 - ALPHA) * photo[inside] + ALPHA * palette[2]
    assert np.abs(out[inside].astype(np.float32) - expected).max() <= 1
    assert ALPHA <= 0.4  # the photo keeps at least 60% of each pixel
    edges = class_edges(labels)
    assert edges[:, 47].all() and not edges[:, 60].any()  # the 0|2 border, column 47|48
    assert (out[edges] == OUTLINE).all()
    assert not (out[~edges] == OUTLINE).all(axis=-1).any()


def test_large_images_get_a_legend_of_the_classes_present():
    side = LEGEND_MIN_SIDE + 64
    image, labels = _scene(side)
    names = {0: "road", 1: "car", 2: "sky", 3: "never-seen"}
    palette = palette_for(4)
    rows = legend_rows(labels, names)
    assert [text.split()[0] for _, text in rows] == ["sky", "road", "car"]  # by share
    assert rows[0][1].endswith("%") and all(cls is not None for cls, _ in rows)
    with_legend = np.asarray(render_overlay(image, labels, palette, names))
    plain = np.asarray(render_overlay(image.crop((0, 0, 96, 96)), labels[:96, :96], palette, names))
    corner = with_legend[:96, :96]
    assert not np.array_equal(corner, plain)  # the legend panel sits in the top-left corner
    # Each swatch holds its class colour exactly (drawn, not blended).
    for cls in (0, 1, 2):
        assert (corner == palette[cls]).all(axis=-1).sum() >= 25
    assert not (with_legend == palette[3]).all(axis=-1).any()  # absent classes are not listed


def test_many_classes_end_with_a_count_of_the_rest():
    labels = np.arange(30, dtype=np.uint8).repeat(10).reshape(15, 20)
    rows = legend_rows(labels, {i: f"c{i}" for i in range(30)}, max_rows=5)
    assert len(rows) == 5 and rows[-1] == (None, "+26 more classes")


def test_ade20k_models_get_the_ade_palette():
    from segdeploy.runtime.palette import ade20k_palette

    assert np.array_equal(palette_for(150), ade20k_palette())
    assert palette_for(150)[2].tolist() == [6, 230, 230]  # "sky", as in the guide
