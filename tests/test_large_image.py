"""Large images a band of rows at a time (segdeploy.runtime.large_image): TIFF read by window
in every layout, a declared size that does not match the data refused naming the file,
the bomb guard on what is decoded at once, tiled TIFF label maps with GeoTIFF tags."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.runtime.large_image import (
    GEO_TAGS,
    TiffSource,
    open_source,
    read_labels,
    to_rgb_samples,
    write_tiff,
)

#: A GeoTIFF's tags: pixel scale, tie point, key directory (WGS 84), as GDAL writes them.
GEO = [
    (33550, "d", 3, (0.5, 0.5, 0.0), True),
    (33922, "d", 6, (0.0, 0.0, 0.0, 600000.0, 5000000.0, 0.0), True),
    (34735, "H", 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633), True),
]


def pixels(h=300, w=500, channels=3, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(h * w + channels)
    top = 256 if dtype == np.uint8 else 65536
    return rng.integers(0, top, (h, w, channels)).astype(dtype)


LAYOUTS = {
    "strips": {"rowsperstrip": 37},
    "one strip": {},
    "tiles zlib": {"tile": (64, 128), "compression": "zlib"},
    "strips zlib predictor": {"rowsperstrip": 20, "compression": "zlib", "predictor": True},
    "bigtiff tiles": {"tile": (32, 48), "bigtiff": True},
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [(0, 300), (35, 110), (299, 300), (64, 192)])
def test_bands_equal_the_image_in_every_layout(tmp_path, layout, rows):
    image = pixels()
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, image, photometric="rgb", **LAYOUTS[layout])
    with open_source(path) as src:
        assert isinstance(src, TiffSource)
        assert (src.height, src.width) == (300, 500)
        assert (src.rows(*rows) == image[rows[0] : rows[1]]).all()
        # a second band that overlaps the first, as window rows do
        assert (src.rows(rows[0], min(300, rows[1] + 40)) == image[rows[0] : rows[1] + 40]).all()


@pytest.mark.parametrize(
    ("channels", "dtype", "kwargs"),
    [
        (1, np.uint8, {"photometric": "minisblack"}),
        (4, np.uint8, {"photometric": "rgb", "extrasamples": ["unassalpha"]}),
        (3, np.uint16, {"photometric": "rgb"}),
        (3, np.uint8, {"photometric": "rgb", "planarconfig": "separate", "rowsperstrip": 16}),
    ],
)
def test_grey_alpha_sixteen_bit_and_planar_tiffs_become_rgb(tmp_path, channels, dtype, kwargs):
    image = pixels(90, 70, channels, dtype)
    data = np.moveaxis(image, -1, 0) if kwargs.get("planarconfig") else image
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, data[..., 0] if channels == 1 else data, **kwargs)
    with open_source(path) as src:
        assert isinstance(src, TiffSource)
        assert (src.rows(10, 80) == to_rgb_samples(image[10:80])).all()
    expected = to_rgb_samples(image)
    assert expected.shape == (90, 70, 3) and expected.dtype == np.uint8
    if dtype == np.uint16:  # 16 bits scaled as segdeploy's Pillow path scales them
        assert (expected == np.rint(image / 257.0).astype(np.uint8)).all()


def test_layouts_the_window_reader_does_not_take_are_decoded_whole(tmp_path):
    image = Image.fromarray(pixels(40, 30)).convert("P")
    image.save(tmp_path / "palette.tif")
    with open_source(tmp_path / "palette.tif") as src:
        assert not isinstance(src, TiffSource)
        assert (src.rows(0, 40) == np.asarray(image.convert("RGB"))).all()


def test_a_truncated_tiff_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, pixels(), photometric="rgb", rowsperstrip=30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegdeployError, match="cut.tif: .*past the end of the file"):
        TiffSource.open(path)


def test_a_declared_size_that_does_not_match_the_data_is_refused(tmp_path):
    """A header claiming 50000 x 50000 pixels over a small file's strips."""
    path = tmp_path / "liar.tif"
    tifffile.imwrite(path, pixels(64, 64), photometric="rgb", tile=(32, 32), compression="zlib")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tf:
        for code in (256, 257):  # ImageWidth, ImageLength
            tag = tf.pages.first.tags[code]
            fmt = {3: "<H", 4: "<I"}[int(tag.dtype)]
            data[tag.valueoffset : tag.valueoffset + struct.calcsize(fmt)] = struct.pack(fmt, 50000)
    path.write_bytes(bytes(data))
    with pytest.raises(SegdeployError, match="liar.tif: declares 50000x50000 pixels"):
        TiffSource.open(path)


def test_the_bomb_guard_holds_for_what_is_decoded_at_once(tmp_path):
    path = tmp_path / "big_strip.tif"
    tifffile.imwrite(path, pixels(200, 300), photometric="rgb", compression="zlib")  # one strip
    with pytest.raises(SegdeployError, match="big_strip.tif: one compressed strip holds 300x200"):
        TiffSource.open(path, max_pixels=10_000)
    # uncompressed rows are read straight from the file: only a band is ever in memory
    raw = tmp_path / "raw.tif"
    tifffile.imwrite(raw, pixels(200, 300), photometric="rgb")
    with open_source(raw, max_pixels=10_000) as src:
        assert src.rows(0, 10).shape == (10, 300, 3)
    # formats Pillow decodes whole keep the whole-image limit
    Image.fromarray(pixels(200, 300)).save(tmp_path / "a.png")
    with (
        pytest.raises(SegdeployError, match="a.png: image too large"),
        open_source(tmp_path / "a.png", max_pixels=10_000),
    ):
        pass


def test_label_tiffs_are_tiled_with_the_geotiff_tags(tmp_path):
    src_path = tmp_path / "scene.tif"
    tifffile.imwrite(
        src_path,
        pixels(300, 520),
        photometric="rgb",
        extratags=GEO,
        resolution=(2, 3),
        resolutionunit=3,
    )
    labels = (np.arange(300 * 520) % 7).astype(np.uint8).reshape(300, 520)
    with open_source(src_path) as src:
        assert set(src.tags) >= set(code for code, *_ in GEO)
        bands = ((y, labels[y : y + 45]) for y in range(0, 300, 45))
        write_tiff(tmp_path / "scene_labels.tif", bands, (300, 520), np.uint8, src.tags)
    assert (read_labels(tmp_path / "scene_labels.tif") == labels).all()
    with tifffile.TiffFile(tmp_path / "scene_labels.tif") as tf:
        page = tf.pages.first
        assert page.is_tiled and page.tilelength == 256
        for code, _, _, value, _ in GEO:
            assert tuple(np.atleast_1d(page.tags[code].value)) == pytest.approx(value), GEO_TAGS[
                code
            ]
        assert page.tags[282].value == (2, 1) and page.tags[283].value == (3, 1)
        assert page.tags[296].value == 3


def test_bands_must_cover_the_map_in_order(tmp_path):
    bands = iter([(0, np.zeros((10, 20), np.uint8)), (20, np.zeros((10, 20), np.uint8))])
    with pytest.raises(ValueError, match="out of order"):
        write_tiff(tmp_path / "x.tif", bands, (30, 20), np.uint8)
    assert not list(tmp_path.iterdir())  # nothing left behind
