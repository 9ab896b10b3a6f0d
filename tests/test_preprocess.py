"""Image decoding and preprocessing: equal to Hugging Face's SegformerImageProcessor, safe on bad files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import SegformerImageProcessor

from segdeploy.data.synthetic import synthetic_sample
from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import load_image, to_rgb
from segdeploy.runtime.preprocess import Preprocessor


def photo(index: int, size) -> Image.Image:
    return Image.fromarray(synthetic_sample(index, size=size)[0])


@pytest.mark.parametrize(
    "config",
    [
        {"size": {"height": 64, "width": 64}},
        {"size": {"height": 512, "width": 512}},
        {"size": {"height": 96, "width": 128}, "resample": 3},  # bicubic
        {"size": {"height": 80, "width": 80}, "resample": 0},  # nearest
        {"do_resize": False},
        {"size": {"height": 64, "width": 64}, "do_normalize": False},
        {"size": {"height": 64, "width": 64}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    ],
)
def test_equal_to_hf_processor(config):
    hf = SegformerImageProcessor(**config, do_reduce_labels=False)
    ours = Preprocessor.from_dict(hf.to_dict())
    for i, shape in enumerate([(64, 64), (100, 37), (480, 640), (333, 701)]):
        img = photo(i, shape)
        ref = hf(images=img, return_tensors="np")["pixel_values"]
        got = ours([img])
        assert got.shape == ref.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        # The lookup table reproduces the same float operations, so it is in fact exact.
        assert np.array_equal(got, ref)


def test_from_dir_reads_saved_processor(tmp_path):
    SegformerImageProcessor(size={"height": 48, "width": 72}, resample=3).save_pretrained(tmp_path)
    pre = Preprocessor.from_dir(tmp_path)
    assert pre.size == (48, 72) and pre.resample == Image.Resampling.BICUBIC
    assert pre([photo(0, (50, 50)), photo(1, (90, 20))]).shape == (2, 3, 48, 72)


def test_bad_processor_configs(tmp_path):
    with pytest.raises(SegdeployError, match="preprocessor_config.json: missing"):
        Preprocessor.from_dir(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(SegdeployError, match="unreadable"):
        Preprocessor.from_dir(tmp_path)
    with pytest.raises(SegdeployError, match="size"):
        Preprocessor.from_dict({"size": {"shortest_edge": 512}})
    with pytest.raises(SegdeployError, match="unsupported image_processor_type"):
        Preprocessor.from_dict({"image_processor_type": "DetrImageProcessor"})


def test_different_sizes_cannot_share_an_unresized_batch():
    pre = Preprocessor.from_dict({"do_resize": False})
    with pytest.raises(ValueError, match="different sizes"):
        pre([photo(0, (30, 30)), photo(0, (31, 30))])


# -- decoding ---------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = photo(2, (40, 70))  # landscape as stored
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (40, 70)  # portrait once upright
    with Image.open(path) as raw:
        expected = np.asarray(ImageOps.exif_transpose(raw).convert("RGB"))
    assert np.array_equal(np.asarray(loaded), expected)


def rgb_of(index=3, size=(32, 48)) -> np.ndarray:
    return synthetic_sample(index, size=size)[0]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "1"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = rgb_of()
    src = Image.fromarray(rgb)
    if mode in ("LA", "RGBA"):
        src = src.convert(mode)
        alpha = np.linspace(0, 255, src.width, dtype=np.uint8)[None].repeat(src.height, 0)
        src.putalpha(Image.fromarray(alpha))
    else:
        src = src.convert(mode)
    path = tmp_path / f"img_{mode}.png"
    src.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == src.size
    # Alpha is dropped, as datasets.Image(mode="RGB") does at training time: colours kept.
    assert np.array_equal(np.asarray(loaded), np.asarray(src.convert("RGB")))


def test_palette_images(tmp_path):
    rgb = rgb_of()
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p.save(tmp_path / "p.png")
    p.save(tmp_path / "t.gif", transparency=0)
    for name in ("p.png", "t.gif"):
        loaded = np.asarray(load_image(tmp_path / name), dtype=np.int16)
        assert loaded.shape == rgb.shape
        assert np.abs(loaded - rgb).mean() < 12  # a 64-colour quantisation of the same picture


def test_cmyk_jpeg(tmp_path):
    rgb = rgb_of()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as raw:
        assert raw.mode == "CMYK"
    loaded = np.asarray(load_image(tmp_path / "c.jpg"), dtype=np.int16)
    assert np.abs(loaded - rgb).mean() < 8


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(3, 0)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode == "I;16"
    loaded = np.asarray(load_image(tmp_path / "g16.png"))
    assert loaded.shape == (3, 4, 3)
    assert loaded[0, :, 0].tolist() == [0, 1, 128, 255]
    # 32-bit integer (mode I) and float (mode F) images
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")
    assert np.asarray(load_image(tmp_path / "i32.tif"))[0, :, 1].tolist() == [0, 1, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(f))[0, :, 2].tolist() == [0, 128, 255]


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(SegdeployError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png")


def test_non_image_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    with pytest.raises(SegdeployError, match="notes.jpg: not an image"):
        load_image(tmp_path / "notes.jpg")


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_file(tmp_path, fmt):
    path = tmp_path / f"cut.{fmt}"
    Image.fromarray(rgb_of(size=(120, 160))).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SegdeployError, match=f"cut.{fmt}: corrupt or truncated"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(SegdeployError, match="gone.png: cannot read"):
        load_image(tmp_path / "gone.png")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    # Above our limit (Pillow's MAX_IMAGE_PIXELS) but below Pillow's own hard error.
    (tmp_path / "big.png").write_bytes(png_header_only(10_000, 10_000))
    with pytest.raises(
        SegdeployError, match="big.png: image too large to decode safely: 10000x10000"
    ):
        load_image(tmp_path / "big.png")
    # Far above: Pillow refuses in Image.open; still our one-line error.
    (tmp_path / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(SegdeployError, match="huge.png: image too large to decode safely"):
        load_image(tmp_path / "huge.png")
    # The limit is an argument.
    Image.fromarray(rgb_of()).save(tmp_path / "small.png")
    with pytest.raises(SegdeployError, match="32x48|48x32"):
        load_image(tmp_path / "small.png", max_pixels=100)
    assert load_image(tmp_path / "small.png", max_pixels=32 * 48).size == (48, 32)
