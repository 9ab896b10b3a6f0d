"""upsample_argmax against torch's bilinear interpolation + argmax (the reference SegFormer path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segdeploy import upsample_argmax
from segdeploy.runtime.upsample import label_dtype, source_index

# The bar: at least 99.999% of pixels equal to torch.
MIN_AGREEMENT = 0.99999


def torch_reference(logits: np.ndarray, size) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if x.ndim == 3:
        x = x[None]
    up = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return up.argmax(1).numpy()


def assert_agrees(logits, size):
    ref = torch_reference(logits, size)
    got = upsample_argmax(logits, size)
    got = got[None] if got.ndim == 2 else got
    assert got.shape == ref.shape
    agreement = float((got == ref).mean())
    assert agreement >= MIN_AGREEMENT, (
        f"{agreement:.7f} of pixels agree for {logits.shape} -> {size}"
    )
    return agreement


def region_logits(rng, classes, h, w, regions=10, margin=6.0, noise=1.0):
    """Logits shaped like a segmentation model's: Voronoi class regions, a margin for the
    region's class, Gaussian noise on every class."""
    pts = rng.uniform(0, 1, (regions, 2)) * (h, w)
    cls = rng.choice(classes, regions, replace=classes < regions)
    yy, xx = np.mgrid[0:h, 0:w]
    dist = (yy[None] - pts[:, :1, None]) ** 2 + (xx[None] - pts[:, 1:, None]) ** 2
    label = cls[dist.argmin(0)]
    logits = rng.normal(0, noise, (classes, h, w)).astype(np.float32)
    logits[label, yy, xx] += margin
    return logits


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((150, 32, 43), (128, 171)),  # SegFormer's 1/4 logits, ADE20K classes
        ((5, 16, 16), (64, 64)),
        ((5, 16, 16), (37, 91)),  # non-integer scales
        ((3, 120, 160), (480, 640)),  # few classes: almost every cell is a border
        ((7, 17, 13), (8, 5)),  # downsampling
        ((4, 1, 13), (3, 50)),  # a single source row
        ((4, 9, 1), (30, 2)),  # a single source column
        ((6, 20, 30), (20, 30)),  # same size: plain argmax
    ],
)
def test_random_logits_agree_with_torch(shape, size):
    rng = np.random.default_rng(sum(shape) + sum(size))
    assert_agrees(rng.normal(size=shape).astype(np.float32), size)


def test_full_size_150_classes_agree_with_torch():
    """The benchmark's case, 128x171 -> 512x683, random and region-shaped logits."""
    rng = np.random.default_rng(1)
    assert_agrees(rng.normal(size=(150, 128, 171)).astype(np.float32), (512, 683))
    assert_agrees(region_logits(rng, 150, 128, 171), (512, 683))


def test_region_logits_many_sizes():
    rng = np.random.default_rng(2)
    for h, w, out in [(16, 16, (64, 64)), (25, 34, (100, 135)), (48, 64, (191, 257))]:
        assert_agrees(region_logits(rng, 19, h, w, regions=6), out)


def test_ties_follow_torch_first_index_rule():
    """Exact ties everywhere: quantised and binary logits, all-equal logits."""
    rng = np.random.default_rng(3)
    quantised = np.round(rng.normal(size=(6, 40, 50)) * 2).astype(np.float32) / 2
    binary = rng.integers(0, 2, size=(6, 40, 50)).astype(np.float32)
    for logits in (quantised, binary):
        for size in [(160, 200), (123, 77)]:
            assert_agrees(logits, size)
    flat = np.zeros((4, 10, 10), np.float32)
    assert (upsample_argmax(flat, (40, 40)) == 0).all()  # first class wins a tie, as in torch
    assert_agrees(flat, (40, 40))


def test_fp16_precision_logits():
    """fp16 graphs give logits on a coarse grid, where near-ties are common."""
    rng = np.random.default_rng(4)
    logits = region_logits(rng, 150, 64, 85).astype(np.float16).astype(np.float32)
    assert_agrees(logits, (256, 341))


def test_real_model_logits(tiny_onnx_dir):
    """Logits of the exported tiny SegFormer on synthetic images of several sizes."""
    from PIL import Image

    from segdeploy import Segmenter
    from segdeploy.data.synthetic import synthetic_sample

    seg = Segmenter(tiny_onnx_dir, provider="cpu", threads=1)
    images = [Image.fromarray(synthetic_sample(i, size=64)[0]) for i in range(4)]
    logits = seg.logits(seg.preprocessor.batch(images)[0])
    assert logits.shape == (4, 5, 16, 16)
    for size in [(64, 64), (480, 640), (97, 131)]:
        assert_agrees(logits, size)


def test_batch_and_single_shapes_and_dtypes():
    rng = np.random.default_rng(5)
    batch = rng.normal(size=(3, 5, 8, 8)).astype(np.float32)
    out = upsample_argmax(batch, (32, 24))
    assert out.shape == (3, 32, 24) and out.dtype == np.uint8
    for i in range(3):
        assert np.array_equal(out[i], upsample_argmax(batch[i], (32, 24)))
    # float64 and float16 inputs are accepted (computed in float32)
    assert upsample_argmax(batch[0].astype(np.float64), (32, 24)).shape == (32, 24)
    many = rng.normal(size=(300, 4, 4)).astype(np.float32)
    got = upsample_argmax(many, (8, 8))
    assert got.dtype == np.uint16
    assert np.array_equal(got, torch_reference(many, (8, 8))[0])


def test_label_dtype():
    assert label_dtype(2) == np.uint8 and label_dtype(256) == np.uint8
    assert label_dtype(257) == np.uint16 and label_dtype(65536) == np.uint16
    assert label_dtype(65537) == np.int32


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shape"):
        upsample_argmax(np.zeros((4, 4)), (8, 8))
    with pytest.raises(ValueError, match="cannot upsample"):
        upsample_argmax(np.zeros((3, 4, 4), np.float32), (0, 8))


def test_source_index_matches_torch_weights():
    """One-hot columns through torch give its exact weights; ours must equal them."""
    for in_size, out_size in [(16, 64), (171, 683), (7, 3), (5, 5), (1, 4)]:
        eye = torch.eye(in_size, dtype=torch.float32)[None, :, :, None]  # [1, in, in, 1]
        # Interpolating an identity along one axis: row r of the result holds the
        # weights of output r on every source index.
        w = torch.nn.functional.interpolate(
            eye.permute(0, 3, 1, 2), size=(out_size, in_size), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        i0, i1, w0, w1 = source_index(in_size, out_size)
        ours = np.zeros((out_size, in_size), np.float32)
        np.add.at(ours, (np.arange(out_size), i0), w0)
        np.add.at(ours, (np.arange(out_size), i1), w1)
        np.testing.assert_array_equal(ours, w)
