"""The torch-free processors of segdeploy.runtime.processors equal transformers' slow ones, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image

from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import to_rgb
from segdeploy.runtime.processors import (
    BUILDERS,
    center_crop,
    processor_from_dict,
    processor_from_dir,
)

# (width, height) and mode of the generated photos: landscape, portrait, smaller than the
# crops, odd sizes, and modes that the runtime converts to RGB first (as load_image does).
PHOTOS = [
    ((97, 61), "RGB"),
    ((40, 130), "L"),
    ((300, 200), "RGBA"),
    ((33, 33), "P"),
    ((513, 341), "RGB"),
]

CONFIGS = {
    "SegformerImageProcessor": [
        {"size": {"height": 64, "width": 64}},
        {"size": {"height": 96, "width": 128}, "resample": 3},
    ],
    "BeitImageProcessor": [
        {"size": {"height": 64, "width": 64}, "do_center_crop": False},  # segmentation Hub configs
        {},  # defaults: 256 then crop 224, bicubic
        {
            "size": {"height": 40, "width": 50},
            "crop_size": {"height": 48, "width": 45},
        },  # crop pads
    ],
    "DPTImageProcessor": [
        {"size": {"height": 64, "width": 64}},
        {"size": {"height": 96, "width": 96}, "keep_aspect_ratio": True, "ensure_multiple_of": 32},
        {
            "size": {"height": 70, "width": 50},
            "keep_aspect_ratio": True,
            "ensure_multiple_of": 7,
            "do_pad": True,
            "size_divisor": 16,
        },
    ],
    "MobileNetV2ImageProcessor": [
        {},  # shortest_edge 256, crop 224
        {"size": {"shortest_edge": 65}, "crop_size": {"height": 64, "width": 64}},
        {"size": {"shortest_edge": 40}, "crop_size": {"height": 64, "width": 50}},  # pads
        {"size": {"height": 64, "width": 80}, "do_center_crop": False, "resample": 3},
    ],
    "MobileViTImageProcessor": [
        {},  # shortest_edge 224, crop 256 (pads), BGR
        {"size": {"shortest_edge": 72}, "crop_size": {"height": 64, "width": 64}},
        {"size": {"shortest_edge": 64}, "do_center_crop": False, "do_flip_channel_order": False},
    ],
}


def photo(index: int, size, mode: str) -> Image.Image:
    image = Image.fromarray(synthetic_sample(index, size=size[::-1])[0])
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    return to_rgb(image)


@pytest.mark.parametrize(
    "kind,cfg", [(kind, cfg) for kind, cfgs in CONFIGS.items() for cfg in cfgs]
)
def test_equal_to_transformers_slow_processor(kind, cfg):
    reference = getattr(transformers, kind)(**cfg)
    ours = processor_from_dict({"image_processor_type": kind, **reference.to_dict()})
    for i, (size, mode) in enumerate(PHOTOS):
        image = photo(i, size, mode)
        expected = reference(images=image, return_tensors="np")["pixel_values"][0]
        got, geometry = ours(image)
        assert got.dtype == np.float32 and got.shape == expected.shape, (size, mode)
        assert np.array_equal(got, expected), (kind, cfg, size, mode, np.abs(got - expected).max())
        assert geometry.original == (image.height, image.width)


@pytest.mark.parametrize("kind", ["MobileNetV2ImageProcessor", "MobileViTImageProcessor"])
def test_legacy_int_sizes_read_as_transformers_reads_them(kind):
    raw = {"size": 70, "crop_size": 64}  # an int size is the shortest edge, an int crop square
    reference = getattr(transformers, kind)(**raw)
    ours = processor_from_dict({"image_processor_type": kind, **raw})
    image = photo(0, (97, 61), "RGB")
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(ours(image)[0], expected)


def test_every_processor_of_the_registry_is_reproduced():
    from segdeploy.families import FAMILIES

    assert {f.image_processor for f in FAMILIES.values()} <= set(BUILDERS)
    assert set(CONFIGS) == {f.image_processor for f in FAMILIES.values()}


def test_mobilevit_flips_to_bgr_without_normalising():
    image = Image.new("RGB", (8, 8), (255, 0, 51))
    out, _ = processor_from_dict(
        {
            "image_processor_type": "MobileViTImageProcessor",
            "size": {"shortest_edge": 8},
            "crop_size": {"height": 8, "width": 8},
        }
    )(image)
    assert out[:, 0, 0].tolist() == pytest.approx([0.2, 0.0, 1.0])


def test_crop_geometry_maps_back_to_the_photo():
    proc = processor_from_dict(
        {
            "image_processor_type": "MobileNetV2ImageProcessor",
            "size": {"shortest_edge": 100},
            "crop_size": {"height": 100, "width": 100},
        }
    )
    _, geometry = proc(Image.new("RGB", (400, 200)))  # resized to 200x100, crop its middle
    assert geometry.resized == (100, 200) and geometry.crop == (0, 50, 100, 100)
    assert geometry.crop_in_original() == (0.0, 100.0, 200.0, 200.0)


def test_center_crop_pads_like_transformers():
    from transformers.image_transforms import center_crop as hf_center_crop

    rng = np.random.default_rng(0)
    for shape, crop in [((5, 7, 3), (8, 4)), ((6, 6, 3), (9, 9)), ((9, 4, 3), (3, 10))]:
        a = rng.integers(1, 255, shape, dtype=np.uint8)
        expected = hf_center_crop(a, crop, input_data_format="channels_last")
        assert np.array_equal(center_crop(a, crop, channel_axis=-1)[0], expected)


def test_unknown_processor_is_one_clear_error(tmp_path):
    with pytest.raises(
        SegdeployError, match="unsupported image_processor_type 'ViTImageProcessor'"
    ):
        processor_from_dict({"image_processor_type": "ViTImageProcessor"})
    with pytest.raises(SegdeployError, match="missing"):
        processor_from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{broken")
    with pytest.raises(SegdeployError, match="unreadable"):
        processor_from_dir(tmp_path)
