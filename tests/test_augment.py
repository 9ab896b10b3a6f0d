"""Augmentation keeps image and labels aligned; colour jitter touches the image only."""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers import SegformerImageProcessor

from segdeploy.train import make_transform
from segdeploy.train.augment import (
    AugmentParams,
    augment_pair,
    color_jitter,
    labels_to_image,
    resize_pair,
)

COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
NO_COLOUR = AugmentParams(brightness=0, contrast=0, saturation=0, hue=0)


def blocks(h=60, w=80) -> np.ndarray:
    """A label map of big rectangles, asymmetric so that a flip shows."""
    labels = np.zeros((h, w), np.int64)
    labels[5:30, 3:40] = 1
    labels[35:55, 10:25] = 2
    labels[10:50, 55:75] = 3
    return labels


def decode(image: Image.Image) -> np.ndarray:
    """Each pixel's class by its nearest class colour."""
    rgb = np.asarray(image, np.int32)[..., None, :]
    return np.argmin(((rgb - COLOURS.astype(np.int32)) ** 2).sum(-1), axis=-1)


def test_zoom_crop_and_flip_move_image_and_labels_together():
    labels = blocks()
    image = Image.fromarray(COLOURS[labels])
    on_left = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        out_img, out_lab = augment_pair(image, labels_to_image(labels), 48, rng, NO_COLOUR)
        assert out_img.size == out_lab.size == (48, 48)
        lab = np.asarray(out_lab)
        # Nearest-neighbour: no new class ids.
        assert set(np.unique(lab)) <= {0, 1, 2, 3}
        # Bilinear blurs only edges: the image still says the same class almost everywhere.
        assert (decode(out_img) == lab).mean() > 0.95
        # Class 3 lies right of x=55 of 80; no crop brings it left of x=8, only a flip does.
        on_left.append(bool((lab[:, :8] == 3).any()))
    assert any(on_left) and not all(on_left)


def test_different_draws_give_different_crops():
    labels = blocks()
    image = Image.fromarray(COLOURS[labels])
    outs = {
        np.asarray(
            augment_pair(image, labels_to_image(labels), 32, np.random.default_rng(s))[1]
        ).tobytes()
        for s in range(6)
    }
    assert len(outs) > 3


def test_colour_jitter_changes_colours_not_geometry():
    rng = np.random.default_rng(0)
    grey = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    hue_only = AugmentParams(brightness=0, contrast=0, saturation=0, hue=0.5)
    # A hue turn cannot colour a grey pixel.
    assert np.abs(np.asarray(color_jitter(grey, rng, hue_only)).astype(int) - 128).max() <= 1
    red = Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (16, 16, 1)))
    shifted = [np.asarray(color_jitter(red, np.random.default_rng(s), hue_only)) for s in range(5)]
    assert any(np.abs(s.astype(int) - np.asarray(red)).max() > 40 for s in shifted)
    jittered = color_jitter(red, rng, AugmentParams())
    assert jittered.size == red.size and jittered.mode == "RGB"


def test_eval_transform_is_deterministic_and_reduces_labels():
    processor = SegformerImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=False)
    raw = blocks()  # 0 is "other" under reduce_labels: it becomes 255, v becomes v - 1
    batch = {
        "image": [Image.fromarray(COLOURS[raw])],
        "annotation": [Image.fromarray(raw.astype(np.uint8))],
        "name": ["x.png"],
    }
    transform = make_transform(
        processor, 32, reduce_labels=True, ignore_index=255, num_labels=3, augment=None
    )
    a, b = transform(dict(batch)), transform(dict(batch))
    assert a["pixel_values"][0].shape == (3, 32, 32) and a["pixel_values"][0].dtype == np.float32
    assert np.array_equal(a["pixel_values"][0], b["pixel_values"][0])
    labels = a["labels"][0]
    assert labels.shape == (32, 32) and labels.dtype == np.int64
    assert set(np.unique(labels)) == {0, 1, 2, 255}
    expected = np.asarray(resize_pair(batch["image"][0], labels_to_image(raw), 32)[1])
    assert np.array_equal(labels == 255, expected == 0)


def test_train_transform_draws_new_augmentations_each_call():
    processor = SegformerImageProcessor(size={"height": 32, "width": 32}, do_reduce_labels=False)
    raw = blocks()
    batch = {
        "image": [Image.fromarray(COLOURS[raw])],
        "annotation": [Image.fromarray(raw.astype(np.uint8))],
        "name": ["x.png"],
    }
    transform = make_transform(
        processor, 32, reduce_labels=False, ignore_index=255, num_labels=4, augment=AugmentParams()
    )
    outs = [transform(dict(batch))["labels"][0].tobytes() for _ in range(6)]
    assert len(set(outs)) > 1
