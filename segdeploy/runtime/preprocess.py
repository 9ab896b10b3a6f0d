"""SegformerImageProcessor's resize, rescale and normalise, in numpy and Pillow, and the
validators of preprocessor_config.json fields that every processor type shares.

`Preprocessor` stays for the callers that need SegFormer's processor only
(validate, int8 calibration, bench); infer (`Segmenter`, the worker pipeline)
builds any family's processor with `segdeploy.runtime.processors.processor_from_dir`,
which uses `Preprocessor` for its rescale and normalise lookup table.

Reads the model folder's preprocessor_config.json and reproduces the Hugging
Face image processor (transformers is not available on deployment machines):
Pillow resize to (height, width) with the configured resample filter, then
`float32(float64(x) * rescale_factor)`, then `(x - mean) / std` in float32,
channels first. Because the input is 8-bit, rescale and normalise are a
per-channel lookup table of 256 values computed with exactly those operations,
so the result is bit-identical to the processor's and costs one gather.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.folders import PREPROCESSOR_FILE, read_json

CONFIG_NAME = PREPROCESSOR_FILE
MISSING_PREPROCESSOR = f"missing: the model folder needs its {PREPROCESSOR_FILE}"

# HF PILImageResampling values are Pillow's.
_RESAMPLE = {int(r): r for r in Image.Resampling}

#: Bounds of a configured input side. Any positive side runs (the model pads
#: small inputs), so the lower bound only refuses 0 and negatives. 16384 is far
#: above any SegFormer checkpoint (512-1024) and keeps one float32 input at
#: 3 GiB, where a typo like 100000 would ask for 120 GB per image and fail late.
MIN_SIDE, MAX_SIDE = 1, 16384


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a size


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# Validators of preprocessor_config.json fields, shared by every processor type
# (segdeploy.runtime.processors): each raises one line naming the file and the field.


def side(v, name: str, where) -> int:
    """A configured length in pixels (a size, a crop, a multiple, a divisor)."""
    if not _is_int(v) or not MIN_SIDE <= v <= MAX_SIDE:
        raise SegdeployError(
            where, f"{name} must be a whole number {MIN_SIDE}..{MAX_SIDE}, got {v!r}"
        )
    return v


def flag(cfg: dict, name: str, where, default: bool = True) -> bool:
    v = cfg.get(name, default)
    if not isinstance(v, bool):
        raise SegdeployError(where, f"{name} must be true or false, got {v!r}")
    return v


def height_width(s, name: str, where) -> tuple[int, int]:
    """{'height', 'width'} (or one int for both) as (height, width), each a valid side."""
    if _is_int(s):
        s = {"height": s, "width": s}
    if not (isinstance(s, dict) and {"height", "width"} <= set(s)):
        raise SegdeployError(where, f"{name} must be {{'height', 'width'}}, got {s!r}")
    return side(s["height"], f"{name}.height", where), side(s["width"], f"{name}.width", where)


def resample_of(cfg: dict, where, default: int) -> Image.Resampling:
    resample = cfg.get("resample", default)
    if not _is_int(resample) or int(resample) not in _RESAMPLE:
        raise SegdeployError(where, f"unknown resample {resample!r}")
    return _RESAMPLE[int(resample)]


def numbers3(v, name: str, where) -> tuple[float, float, float]:
    """image_mean / image_std: 3 finite numbers (one number means the same for each)."""
    v = [v] * 3 if _is_number(v) else v
    if not (isinstance(v, list | tuple) and len(v) == 3 and all(map(_is_number, v))):
        raise SegdeployError(where, f"{name} needs 3 numbers, got {v!r}")
    if not all(math.isfinite(x) for x in v):
        raise SegdeployError(where, f"{name} must be finite, got {v!r}")
    return tuple(float(x) for x in v)


def values_of(
    cfg: dict, where, mean: Sequence[float], std: Sequence[float], *, normalize: bool = True
) -> Preprocessor:
    """Rescale + normalise of a config (no resize); `normalize=False` for processors that
    have no normalise step (MobileViT), whose mean/std fields are then not read."""
    rescale_factor = cfg.get("rescale_factor", 1 / 255)
    if not (_is_number(rescale_factor) and 0 < rescale_factor < math.inf):
        raise SegdeployError(
            where, f"rescale_factor must be a positive number, got {rescale_factor!r}"
        )
    do_normalize = normalize and flag(cfg, "do_normalize", where)
    image_mean, image_std = tuple(mean), tuple(std)
    if normalize:
        image_mean = numbers3(cfg.get("image_mean", image_mean), "image_mean", where)
        image_std = numbers3(cfg.get("image_std", image_std), "image_std", where)
        if not all(x > 0 for x in image_std):
            raise SegdeployError(where, f"image_std must be positive, got {list(image_std)}")
    return Preprocessor(
        size=None,
        do_rescale=flag(cfg, "do_rescale", where),
        rescale_factor=float(rescale_factor),
        do_normalize=do_normalize,
        image_mean=image_mean,
        image_std=image_std,
    )


@dataclass(frozen=True)
class Preprocessor:
    """Callable: list of RGB PIL images -> float32 [N, 3, height, width]."""

    size: tuple[int, int] | None  # (height, width); None: keep each image's size
    resample: Image.Resampling = Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Preprocessor:
        path = Path(model_dir) / CONFIG_NAME
        return cls.from_dict(read_json(path, missing=MISSING_PREPROCESSOR), where=path)

    @classmethod
    def from_dict(cls, cfg: dict, *, where: str | os.PathLike = CONFIG_NAME) -> Preprocessor:
        kind = cfg.get("image_processor_type", "SegformerImageProcessor")
        if kind not in (
            "SegformerImageProcessor",
            "SegformerImageProcessorFast",
            "SegformerFeatureExtractor",
        ):
            raise SegdeployError(
                where, f"unsupported image_processor_type {kind!r} (SegFormer only)"
            )
        if not isinstance(cfg, dict):
            raise SegdeployError(where, f"must hold a JSON object, got {type(cfg).__name__}")
        size = None
        if flag(cfg, "do_resize", where):
            size = height_width(cfg.get("size", {"height": 512, "width": 512}), "size", where)
        values = values_of(cfg, where, cls.image_mean, cls.image_std)
        return dataclasses.replace(values, size=size, resample=resample_of(cfg, where, 2))

    def lut(self) -> np.ndarray:
        """[3, 256] float32: the processor's value for each channel and byte, same operations."""
        x = np.broadcast_to(np.arange(256, dtype=np.uint8)[:, None], (256, 3))
        v = x.astype(np.float32)
        if self.do_rescale:
            v = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            v = (v - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return np.ascontiguousarray(v.T, dtype=np.float32)

    def resize(self, image: Image.Image) -> Image.Image:
        if self.size is None:
            return image
        h, w = self.size
        return image.resize((w, h), resample=self.resample, reducing_gap=None)

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        arrays = [self.to_array(im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes cannot share a batch: {sorted(shapes)}")
        return np.stack(arrays)

    def to_array(self, image: Image.Image) -> np.ndarray:
        """float32 [3, h, w] for one RGB image."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        return self.rescale_normalize(np.asarray(self.resize(image)))

    def rescale_normalize(self, pixels: np.ndarray) -> np.ndarray:
        """h x w x 3 uint8 -> float32 [3, h, w], rescaled and normalised (the lookup table)."""
        lut = self._lut
        out = np.empty((3, *pixels.shape[:2]), np.float32)
        for c in range(3):
            # A contiguous copy of the channel first: np.take over the strided view is
            # 5x slower (6 ms against 1.2 ms per 512x512 image), the copy costs little.
            np.take(lut[c], np.ascontiguousarray(pixels[..., c]), out=out[c])
        return out

    @cached_property
    def _lut(self) -> np.ndarray:
        return self.lut()
