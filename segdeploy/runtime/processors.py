"""The image processors of the guide's eight families, in numpy and Pillow, bit-equal to
transformers' slow processors (use_fast=False).

| image_processor_type      | families                       | steps (in the processor's order)                      |
|---------------------------|--------------------------------|-------------------------------------------------------|
| SegformerImageProcessor   | SegFormer, UPerNet             | resize (h, w), rescale, normalise                     |
| BeitImageProcessor        | BEiT, Data2VecVision           | resize (h, w), center crop, rescale, normalise        |
| DPTImageProcessor         | DPT                            | resize (keep_aspect_ratio, ensure_multiple_of),       |
|                           |                                | rescale, normalise, pad to size_divisor               |
| MobileNetV2ImageProcessor | MobileNetV2                    | resize shortest_edge, center crop, rescale, normalise |
| MobileViTImageProcessor   | MobileViT, MobileViTV2         | resize shortest_edge, rescale, center crop, RGB->BGR  |

Each is one `ImageProcessor` built by a function of `BUILDERS`, keyed by
`image_processor_type`. Rescale and normalise are the per-byte lookup table of
`segdeploy.runtime.preprocess.Preprocessor` (same operations, hence bit-equal);
resizing is Pillow's, as in transformers (`reducing_gap=None`).

Crops and the masks: the guide's torch path upsamples the logits to the
ORIGINAL image size (`post_process_semantic_segmentation(target_sizes=...)`)
whatever the processor cropped. With a center crop the logits only saw the
cropped middle, so its mask is that middle stretched over the whole photo: the
photo's edges outside the crop get the labels of the crop's edges, shifted
inwards. `Geometry` records the crop so that a caller can do either: follow
the guide (upsample to `Geometry.original`, what segdeploy compares with
torch), or place the mask on the region it saw (`Geometry.crop_in_original`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.families import FAMILIES
from segdeploy.folders import CONFIG_FILE, read_json
from segdeploy.runtime.preprocess import (
    CONFIG_NAME,
    MISSING_PREPROCESSOR,
    Preprocessor,
    flag,
    height_width,
    resample_of,
    side,
    values_of,
)

IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # Segformer's defaults
IMAGENET_STANDARD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Beit, DPT, MobileNetV2 defaults


@dataclass(frozen=True)
class Geometry:
    """Where one processed image came from: sizes are (height, width)."""

    original: tuple[int, int]  # the photo
    resized: tuple[int, int]  # after the resize
    crop: tuple[int, int, int, int] | None  # (top, left, height, width) in the resized image;
    # top/left may be negative (the crop was padded with zeros) — transformers' arithmetic
    padded: tuple[int, int, int, int] = (0, 0, 0, 0)  # DPT: (top, bottom, left, right)

    def crop_in_original(self) -> tuple[float, float, float, float]:
        """The crop as (top, left, height, width) in the photo's pixels (the region the
        logits saw); the whole photo when nothing was cropped."""
        if self.crop is None:
            return 0.0, 0.0, float(self.original[0]), float(self.original[1])
        sy = self.original[0] / self.resized[0]
        sx = self.original[1] / self.resized[1]
        top, left, h, w = self.crop
        return top * sy, left * sx, h * sy, w * sx


@dataclass(frozen=True)
class ImageProcessor:
    """Callable: one PIL image -> (float32 [3, h, w], Geometry)."""

    kind: str  # image_processor_type it reproduces
    resize: FixedSize | ShortestEdge | DPTSize | None  # (h, w) -> resized (h, w)
    resample: Image.Resampling
    values: Preprocessor  # rescale + normalise, as a byte lookup table
    crop: tuple[int, int] | None = None  # center crop (h, w)
    crop_after_rescale: bool = False  # MobileViT crops floats (pad 0.0), others bytes (pad 0)
    flip_bgr: bool = False
    pad_divisor: int | None = None  # DPT: zero-pad (after normalise) to a multiple

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, Geometry]:
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        original = (image.height, image.width)
        resized = self.resize(*original) if self.resize else original
        if resized != original:
            image = image.resize(resized[::-1], resample=self.resample, reducing_gap=None)
        pixels = np.asarray(image)  # h, w, 3 uint8
        crop_box = None
        if self.crop is not None and not self.crop_after_rescale:
            pixels, crop_box = center_crop(pixels, self.crop, channel_axis=-1)
        out = self.values.rescale_normalize(pixels)
        if self.crop is not None and self.crop_after_rescale:
            out, crop_box = center_crop(out, self.crop, channel_axis=0)
        if self.flip_bgr:
            out = np.ascontiguousarray(out[::-1])  # last step: exact for any per-channel table
        padded = (0, 0, 0, 0)
        if self.pad_divisor:
            out, padded = pad_to_multiple(out, self.pad_divisor)
        return out, Geometry(original, resized, crop_box, padded)

    def allocated_pixels(self, height: int, width: int) -> tuple[tuple[int, int], int]:
        """For a (height, width) photo: the size the resize makes and the most pixels any
        step allocates (the resized image, the crop, the padded input)."""
        resized = self.resize(height, width) if self.resize else (height, width)
        sizes = [resized]
        if self.crop is not None:
            sizes.append(self.crop)
        if self.pad_divisor:
            h, w = sizes[-1]
            d = self.pad_divisor
            sizes.append((math.ceil(h / d) * d, math.ceil(w / d) * d))
        return resized, max(h * w for h, w in sizes)

    def check_pixels(self, height: int, width: int, max_pixels: int | None) -> None:
        """SegdeployError (no path: the caller adds it) when processing a (height, width)
        photo would allocate more than `max_pixels` pixels: a 1-pixel-high strip resized
        to a shortest edge of 224 becomes billions of pixels, though it decodes in bytes."""
        if max_pixels is None:
            return
        resized, pixels = self.allocated_pixels(height, width)
        if pixels > max_pixels:
            raise SegdeployError(
                None,
                f"the image processor ({self.kind}) would make its {width}x{height} pixels "
                f"{resized[1]}x{resized[0]} ({pixels} pixels) > {max_pixels}: refused to keep "
                "memory bounded (raise --max-pixels if it is genuine)",
            )

    def to_array(self, image: Image.Image) -> np.ndarray:
        """float32 [3, h, w] for one RGB image (the model input alone, as
        `Preprocessor.to_array`): masks follow the guide and are upsampled to the photo."""
        return self(image)[0]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [3, h, w] for h x w x 3 uint8 pixels: the processor's per-pixel steps only
        (rescale, normalise, channel order), with no resize, crop or pad. What each window of
        a tiled image gets: MMSegmentation's slide mode normalises the image, then cuts
        windows at the model's own resolution (segdeploy.runtime.tiles)."""
        out = self.values.rescale_normalize(pixels)
        return np.ascontiguousarray(out[::-1]) if self.flip_bgr else out

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) of every output whatever the photo, or None when it follows
        each photo (no resize, shortest_edge without crop, DPT's keep_aspect_ratio)."""
        if self.crop is not None:
            size = self.crop
        elif self.resize is not None:
            size = self.resize.fixed
        else:
            size = None
        if size is None or not self.pad_divisor:
            return size
        d = self.pad_divisor
        return math.ceil(size[0] / d) * d, math.ceil(size[1] / d) * d

    def pixel_values(self, images) -> np.ndarray:
        """float32 [N, 3, h, w] for a list of RGB images (calibration, benchmarks)."""
        return self.batch(images)[0]

    def batch(self, images) -> tuple[np.ndarray, list[Geometry]]:
        results = [self(im) for im in images]
        shapes = {a.shape for a, _ in results}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes cannot share a batch: {sorted(shapes)}")
        return np.stack([a for a, _ in results]), [g for _, g in results]


def center_crop(
    array: np.ndarray, size: tuple[int, int], *, channel_axis: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """transformers.image_transforms.center_crop: the same top/left arithmetic, and zero
    padding where the image is smaller than the crop. Returns (crop, (top, left, h, w))."""
    spatial = (0, 1) if channel_axis == -1 else (1, 2)
    orig_h, orig_w = array.shape[spatial[0]], array.shape[spatial[1]]
    crop_h, crop_w = int(size[0]), int(size[1])
    top, left = (orig_h - crop_h) // 2, (orig_w - crop_w) // 2
    # Paste into a zero canvas of the crop's size: equal to transformers' pad-then-slice.
    shape = list(array.shape)
    shape[spatial[0]], shape[spatial[1]] = crop_h, crop_w
    out = np.zeros(shape, array.dtype)
    src_y, dst_y = _overlap(top, crop_h, orig_h)
    src_x, dst_x = _overlap(left, crop_w, orig_w)
    index_src = [slice(None)] * array.ndim
    index_dst = [slice(None)] * array.ndim
    index_src[spatial[0]], index_src[spatial[1]] = src_y, src_x
    index_dst[spatial[0]], index_dst[spatial[1]] = dst_y, dst_x
    out[tuple(index_dst)] = array[tuple(index_src)]
    return out, (top, left, crop_h, crop_w)


def _overlap(start: int, length: int, total: int) -> tuple[slice, slice]:
    """Source and destination slices of a window [start, start+length) over [0, total).

    transformers pads a too-small image by ceil((length - total) / 2) before slicing,
    which shifts the window by that much; for a too-large image no padding happens.
    """
    if start >= 0 and start + length <= total:
        return slice(start, start + length), slice(0, length)
    pad = math.ceil((max(length, total) - total) / 2)
    begin = start + pad  # in the padded canvas of size max(length, total)
    canvas = max(length, total)
    lo, hi = max(0, begin), min(canvas, begin + length)
    # The image occupies [pad, pad + total) of the canvas.
    img_lo, img_hi = max(lo, pad), min(hi, pad + total)
    return slice(img_lo - pad, img_hi - pad), slice(img_lo - lo, img_hi - lo)


def pad_to_multiple(
    array: np.ndarray, divisor: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """DPTImageProcessor.pad_image: zero-pad [C, H, W] to multiples of `divisor`, centred
    (the odd pixel at the bottom/right)."""

    def split(n: int) -> tuple[int, int]:
        pad = math.ceil(n / divisor) * divisor - n
        return pad // 2, pad - pad // 2

    (top, bottom), (left, right) = split(array.shape[1]), split(array.shape[2])
    return np.pad(array, ((0, 0), (top, bottom), (left, right))), (top, bottom, left, right)


# ---------------------------------------------------------------------------
# Resize rules: small dataclasses (not closures) so that a processor pickles into
# infer's worker processes and Ray tasks, and can say whether its output size is fixed.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedSize:
    height: int
    width: int

    def __call__(self, h: int, w: int) -> tuple[int, int]:
        return self.height, self.width

    @property
    def fixed(self) -> tuple[int, int] | None:
        return self.height, self.width


@dataclass(frozen=True)
class ShortestEdge:
    """transformers' get_resize_output_image_size(default_to_square=False): the short
    side to `size`, the long side int()-truncated to keep the aspect ratio."""

    size: int

    def __call__(self, h: int, w: int) -> tuple[int, int]:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.size * long / short)
        return (new_long, self.size) if w <= h else (self.size, new_long)

    fixed = None  # follows each photo's aspect ratio


@dataclass(frozen=True)
class DPTSize:
    """DPT's get_resize_output_image_size: scale towards (height, width), optionally by the
    scale closer to 1 on both sides, rounded (Python's round) to a multiple."""

    height: int
    width: int
    keep_aspect_ratio: bool
    multiple: int

    def constrain(self, val: float) -> int:
        # transformers' constrain_to_multiple_of without max_val; its min_val=0 branch can
        # never fire for a positive size.
        return round(val / self.multiple) * self.multiple

    def __call__(self, h: int, w: int) -> tuple[int, int]:
        scale_h, scale_w = self.height / h, self.width / w
        if self.keep_aspect_ratio:
            if abs(1 - scale_w) < abs(1 - scale_h):
                scale_h = scale_w
            else:
                scale_w = scale_h
        return self.constrain(scale_h * h), self.constrain(scale_w * w)

    @property
    def fixed(self) -> tuple[int, int] | None:
        if self.keep_aspect_ratio:
            return None
        return self.constrain(self.height), self.constrain(self.width)


# ---------------------------------------------------------------------------
# Builders from preprocessor_config.json, one per image_processor_type. Every field is
# validated as it is read (segdeploy.runtime.preprocess's validators): one line naming
# the file and the field, never a late failure on the first photo.
# ---------------------------------------------------------------------------


def _fixed_or_none(cfg: Mapping, where, default: int) -> FixedSize | None:
    if not flag(cfg, "do_resize", where):
        return None
    return FixedSize(*height_width(cfg.get("size", default), "size", where))


def _shortest_or_fixed(cfg: Mapping, where, default) -> FixedSize | ShortestEdge | None:
    if not flag(cfg, "do_resize", where):
        return None
    size = cfg.get("size", default)
    if isinstance(size, int) and not isinstance(size, bool):
        # legacy configs: transformers reads an int as shortest_edge here
        return ShortestEdge(side(size, "size", where))
    if isinstance(size, Mapping) and "shortest_edge" in size:
        return ShortestEdge(side(size["shortest_edge"], "size.shortest_edge", where))
    return FixedSize(*height_width(size, "size", where))


def _crop(cfg: Mapping, where, default: int) -> tuple[int, int] | None:
    if not flag(cfg, "do_center_crop", where):
        return None
    return height_width(cfg.get("crop_size", default), "crop_size", where)


def build_segformer(cfg: Mapping, where) -> ImageProcessor:
    return ImageProcessor(
        kind="SegformerImageProcessor",
        resize=_fixed_or_none(cfg, where, 512),
        resample=resample_of(cfg, where, 2),
        values=values_of(cfg, where, *IMAGENET_DEFAULT),
    )


def build_beit(cfg: Mapping, where) -> ImageProcessor:
    return ImageProcessor(
        kind="BeitImageProcessor",
        resize=_fixed_or_none(cfg, where, 256),
        resample=resample_of(cfg, where, 3),
        values=values_of(cfg, where, *IMAGENET_STANDARD),
        crop=_crop(cfg, where, 224),
    )


def build_dpt(cfg: Mapping, where) -> ImageProcessor:
    resize = None
    if flag(cfg, "do_resize", where):
        h, w = height_width(cfg.get("size", 384), "size", where)
        resize = DPTSize(
            h,
            w,
            flag(cfg, "keep_aspect_ratio", where, default=False),
            side(cfg.get("ensure_multiple_of", 1), "ensure_multiple_of", where),
        )
    divisor = None
    if flag(cfg, "do_pad", where, default=False):  # transformers too needs a divisor then
        divisor = side(cfg.get("size_divisor"), "size_divisor", where)
    return ImageProcessor(
        kind="DPTImageProcessor",
        resize=resize,
        resample=resample_of(cfg, where, 3),
        values=values_of(cfg, where, *IMAGENET_STANDARD),
        pad_divisor=divisor,
    )


def build_mobilenet_v2(cfg: Mapping, where) -> ImageProcessor:
    return ImageProcessor(
        kind="MobileNetV2ImageProcessor",
        resize=_shortest_or_fixed(cfg, where, {"shortest_edge": 256}),
        resample=resample_of(cfg, where, 2),
        values=values_of(cfg, where, *IMAGENET_STANDARD),
        crop=_crop(cfg, where, 224),
    )


def build_mobilevit(cfg: Mapping, where) -> ImageProcessor:
    return ImageProcessor(
        kind="MobileViTImageProcessor",
        resize=_shortest_or_fixed(cfg, where, {"shortest_edge": 224}),
        resample=resample_of(cfg, where, 2),
        # it has no normalise step: image_mean/image_std are not read
        values=values_of(cfg, where, *IMAGENET_DEFAULT, normalize=False),
        crop=_crop(cfg, where, 256),
        crop_after_rescale=True,
        flip_bgr=flag(cfg, "do_flip_channel_order", where),
    )


#: image_processor_type -> builder. Fast and legacy FeatureExtractor names share the slow one's.
BUILDERS: dict[str, Callable[[Mapping, str | os.PathLike], ImageProcessor]] = {}
for _builder, _name in (
    (build_segformer, "Segformer"),
    (build_beit, "Beit"),
    (build_dpt, "DPT"),
    (build_mobilenet_v2, "MobileNetV2"),
    (build_mobilevit, "MobileViT"),
):
    for _suffix in ("ImageProcessor", "ImageProcessorFast", "FeatureExtractor"):
        BUILDERS[_name + _suffix] = _builder


def processor_from_dict(
    cfg: Mapping, *, where: str | os.PathLike = CONFIG_NAME, default_type: str | None = None
) -> ImageProcessor:
    """The processor a preprocessor_config.json dict describes (`default_type` when the dict
    names none, e.g. the family's `Family.image_processor`)."""
    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or default_type
    builder = BUILDERS.get(kind)
    if builder is None:
        supported = ", ".join(k for k in BUILDERS if k.endswith("ImageProcessor"))
        raise SegdeployError(
            where, f"unsupported image_processor_type {kind!r}; supported: {supported}"
        )
    return builder(cfg, where)


def processor_from_dir(
    model_dir: str | os.PathLike, default_type: str | None = None
) -> ImageProcessor:
    path = Path(model_dir) / CONFIG_NAME
    cfg = read_json(path, missing=MISSING_PREPROCESSOR)
    if not isinstance(cfg, dict):
        raise SegdeployError(path, "not a JSON object")
    return processor_from_dict(cfg, where=path, default_type=default_type)


def model_processor(model_dir: str | os.PathLike) -> ImageProcessor:
    """The processor of a model or ONNX folder: its preprocessor_config.json, read as its
    family's processor when the file names no type (else SegFormer's, as before families)."""
    config = read_json(Path(model_dir) / CONFIG_FILE)
    family = FAMILIES.get(config.get("model_type")) if isinstance(config, dict) else None
    default_type = family.image_processor if family else "SegformerImageProcessor"
    return processor_from_dir(model_dir, default_type=default_type)
