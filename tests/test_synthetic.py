import numpy as np
import pytest
from PIL import Image

from segdeploy.data.synthetic import (
    ID2LABEL,
    NUM_CLASSES,
    synthetic_sample,
    synthetic_samples,
    write_synthetic_folder,
)


def test_same_seed_same_data_other_seed_other_data():
    a = list(synthetic_samples(6, seed=3, size=96))
    b = list(synthetic_samples(6, seed=3, size=96))
    c = list(synthetic_samples(6, seed=4, size=96))
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert not all(np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c, strict=True))


def test_sample_depends_only_on_seed_and_index():
    img, label = synthetic_sample(5, seed=1, size=64)
    from_run = list(synthetic_samples(3, seed=1, size=64, start=4))[1]
    np.testing.assert_array_equal(img, from_run[0])
    np.testing.assert_array_equal(label, from_run[1])


@pytest.mark.parametrize("size", [64, (48, 80), (120, 33)])
def test_label_map_matches_image_and_labels_in_range(size):
    h, w = (size, size) if isinstance(size, int) else size
    for img, label in synthetic_samples(8, seed=0, size=size):
        assert img.shape == (h, w, 3) and img.dtype == np.uint8
        assert label.shape == (h, w) and label.dtype == np.uint8
        assert label.min() >= 0 and label.max() < NUM_CLASSES


def test_every_class_appears():
    counts = np.zeros(NUM_CLASSES, dtype=np.int64)
    for _, label in synthetic_samples(8, seed=7, size=64):
        counts += np.bincount(label.ravel(), minlength=NUM_CLASSES)
    assert (counts > 0).all(), counts
    assert len(ID2LABEL) == NUM_CLASSES


def test_labels_follow_the_drawn_colours():
    # The label map is exact: object pixels carry their class's saturated colour,
    # background pixels are grey-brown. Saturation separates them almost perfectly.
    img, label = synthetic_sample(0, seed=0, size=128)
    rgb = img.astype(np.int16)
    saturation = rgb.max(-1) - rgb.min(-1)
    assert np.median(saturation[label > 0]) > 100
    assert np.median(saturation[label == 0]) < 50


def test_write_folder_layout(tmp_path):
    root = write_synthetic_folder(tmp_path / "syn", n_train=4, n_val=2, seed=0, size=32)
    for split, n in (("train", 4), ("validation", 2)):
        images = sorted((root / "images" / split).glob("*.png"))
        masks = sorted((root / "annotations" / split).glob("*.png"))
        assert [p.name for p in images] == [p.name for p in masks]
        assert len(images) == n
        assert Image.open(masks[0]).mode == "L"
        assert Image.open(images[0]).size == Image.open(masks[0]).size
    assert (root / "id2label.json").is_file()
