"""Sliding-window inference for large images: `segdeploy infer --tile`, `Segmenter.predict(
image, tile=...)`, and the tiled side of `segdeploy validate --tile` and `bench --tile`.

Without tiling every family's processor squashes a photo to the model's input
size (512x512 for most), which throws away the detail of an aerial or
microscopy image thousands of pixels on a side. With it, the image is cut into
windows of the model's input size every `stride` pixels, as MMSegmentation's
slide mode does (`EncoderDecoder.slide_inference`): the windows see the image at
its own resolution, through the processor's per-pixel steps only (rescale,
normalise, channel order), and their logits are blended into one label map
(segdeploy.runtime.tile_blend: `mean` is MMSegmentation's rule exactly,
`gaussian` weights each window's centre like MONAI's `sliding_window_inference`).

Windows go through the model `batch_size` at a time, on any provider. A graph
exported at a fixed size (BEiT, Data2VecVision, MobileNetV2, MobileViT,
UPerNet) tiles at that size, and where a model takes only its own size (those,
DPT's square inputs, DPT's padding to a multiple) a window smaller than the
tile (an image smaller than the tile) is padded with zeros to it at the bottom
and right, and only its logits over the image are used; other graphs run such a
window at its own size, as MMSegmentation does.

The image is read a row of windows at a time from a `source` (segdeploy.runtime.
large_image: tiled/striped TIFF by window, anything else decoded whole), and
the label map comes out band by band: memory follows a row of windows, not the
image.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.runtime.preprocess import MAX_SIDE
from segdeploy.runtime.tile_blend import Grid, TileBlender, Window

#: --blend: how overlapping windows are combined (see segdeploy.runtime.tile_blend).
BLENDS = ("mean", "gaussian")
#: Overlap of neighbouring windows, as a share of the tile, when neither --stride nor
#: --overlap is given: MMSegmentation's ADE20K configs (crop 512, stride 341).
DEFAULT_OVERLAP = 1 / 3
#: MONAI's default: the gaussian's sigma is this share of the window's side.
GAUSSIAN_SIGMA_SCALE = 0.125
#: MONAI's floor of the importance map (a weight of 0 would leave pixels uncounted).
GAUSSIAN_MIN_WEIGHT = 1e-3


def parse_size(text: str | int | tuple, option: str) -> int | tuple[int, int]:
    """'512' -> 512, '512x768' -> (512, 768) (height x width); SegdeployError otherwise."""
    if isinstance(text, int | tuple):
        return text
    parts = str(text).lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(0 < v <= MAX_SIDE for v in values):
        raise SegdeployError(
            option, f"expected SIZE or HEIGHTxWIDTH in pixels (1..{MAX_SIDE}), got {text!r}"
        )
    return values[0] if len(values) == 1 else (values[0], values[1])


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _is_side(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE


@dataclass(frozen=True)
class TileOptions:
    """What the user asked for (--tile, --stride, --overlap, --blend); `TilePlan` is what a
    given model runs."""

    #: "auto" (the model's input size), a side in pixels, (height, width), or None: no tiling.
    tile: int | tuple[int, int] | str | None = None
    #: Pixels between window starts (a side, or (height, width)); None: from `overlap`.
    stride: int | tuple[int, int] | None = None
    #: Share of the tile that neighbouring windows overlap, 0 <= overlap < 1; None: 1/3.
    overlap: float | None = None
    blend: str = "mean"

    @classmethod
    def from_text(
        cls, tile: str | None, stride: str | None, overlap: float | None, blend: str
    ) -> TileOptions:
        """From the command line's strings: --tile auto|SIZE|HxW, --stride S|HxW."""
        if tile is None:
            for name, value in (("--stride", stride), ("--overlap", overlap)):
                if value is not None:
                    raise SegdeployError(name, "only with --tile")
            if blend != cls.blend:
                raise SegdeployError("--blend", "only with --tile")
            return cls()
        parsed = "auto" if str(tile).lower() == "auto" else parse_size(tile, "--tile")
        stride_ = None if stride is None else parse_size(stride, "--stride")
        options = cls(parsed, stride_, overlap, blend)
        options.check()
        return options

    @property
    def enabled(self) -> bool:
        return self.tile is not None

    def check(self) -> None:
        if self.blend not in BLENDS:
            raise SegdeployError(
                "--blend", f"must be one of {', '.join(BLENDS)}, got {self.blend!r}"
            )
        if self.stride is not None and self.overlap is not None:
            raise SegdeployError("--stride", "give --stride or --overlap, not both")
        if self.overlap is not None and not 0 <= self.overlap < 1:
            raise SegdeployError("--overlap", f"must be at least 0 and below 1, got {self.overlap}")
        for name, value in (("--tile", self.tile), ("--stride", self.stride)):
            if value is None or value == "auto":
                continue
            sides = _pair(value) if isinstance(value, int | tuple | list) else ()
            if len(sides) != 2 or not all(_is_side(v) for v in sides):
                raise SegdeployError(
                    name,
                    f"expected a side or (height, width) in pixels 1..{MAX_SIDE}, got {value!r}",
                )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TilePlan:
    """The tiling one model runs: tile and stride as (height, width), the blend, and whether
    windows smaller than the tile are padded to it (models that take only their size)."""

    tile: tuple[int, int]
    stride: tuple[int, int]
    blend: str = "mean"
    pad: bool = False

    def grid(self, height: int, width: int) -> Grid:
        return Grid.over(height, width, self.tile, self.stride)

    def weights(self) -> Callable[[int, int], np.ndarray] | None:
        return gaussian_weights if self.blend == "gaussian" else None

    def to_json(self) -> dict[str, Any]:
        return {"tile": list(self.tile), "stride": list(self.stride), "blend": self.blend}


def plan_tiles(
    options: TileOptions,
    *,
    graph_size: tuple[int, int] | None,
    processor,
    square_only: bool = False,
    where=None,
) -> TilePlan:
    """Resolve `options` for a model: `graph_size` is the graph's fixed input (height,
    width) or None when its spatial axes are dynamic, `processor` its ImageProcessor
    (size, pad_divisor). Refuses, naming the option, a tile the model cannot run."""
    options.check()
    if options.tile == "auto":
        tile = graph_size or processor.size
        if tile is None:
            raise SegdeployError(
                "--tile",
                f"auto takes the model's input size, but its processor ({where}) keeps each "
                "image's size: give --tile SIZE",
            )
    else:
        tile = _pair(options.tile)
        if graph_size is not None and tile != tuple(graph_size):
            raise SegdeployError(
                "--tile",
                f"the graph takes only {graph_size[0]}x{graph_size[1]} inputs, not "
                f"{tile[0]}x{tile[1]}: use --tile auto (or export the model at that size)",
            )
    if square_only and tile[0] != tile[1]:
        raise SegdeployError(
            "--tile", f"this model runs square inputs only, got {tile[0]}x{tile[1]}"
        )
    divisor = getattr(processor, "pad_divisor", None)
    if divisor and (tile[0] % divisor or tile[1] % divisor):
        raise SegdeployError(
            "--tile", f"this model's inputs are multiples of {divisor}: got {tile[0]}x{tile[1]}"
        )
    pad = graph_size is not None or square_only or bool(divisor)
    return TilePlan(tuple(tile), _stride(options, tile), options.blend, pad)


def _stride(options: TileOptions, tile: tuple[int, int]) -> tuple[int, int]:
    if options.stride is not None:
        stride = _pair(options.stride)
        if not all(0 < s <= t for s, t in zip(stride, tile, strict=True)):
            raise SegdeployError(
                "--stride",
                f"must be 1 to the tile's side ({tile[0]}x{tile[1]}) so that windows cover "
                f"every pixel, got {stride[0]}x{stride[1]}",
            )
        return stride
    overlap = DEFAULT_OVERLAP if options.overlap is None else options.overlap
    return tuple(max(1, math.floor(t * (1 - overlap))) for t in tile)


def graph_spatial_size(shape) -> tuple[int, int] | None:
    """(height, width) of a graph input [N, 3, H, W] whose spatial axes are numbers."""
    spatial = tuple(shape[2:4]) if len(shape) == 4 else ()
    if len(spatial) == 2 and all(isinstance(d, int) and d > 0 for d in spatial):
        return spatial
    return None


def plan_for(seg, options: TileOptions) -> TilePlan:
    """The tiling a Segmenter runs for `options`; SegdeployError for one it cannot."""
    if seg.fused:
        raise SegdeployError(
            seg.onnx_path,
            "this graph has argmax fused in and returns labels; tiling blends logits: use "
            "the graph without --fuse-argmax (model.onnx)",
        )
    family = seg.family
    return plan_tiles(
        options,
        graph_size=graph_spatial_size(seg.session.get_inputs()[0].shape),
        processor=seg.preprocessor,
        square_only=bool(family and family.square_only),
        where=seg.folder / "preprocessor_config.json",
    )


@functools.lru_cache(maxsize=16)
def gaussian_weights(height: int, width: int) -> np.ndarray:
    """MONAI's gaussian importance map (`compute_importance_map`, sigma_scale 0.125): the
    outer product of two float32 gaussians centred on the window, sigma = 0.125 x side,
    floored at max(its minimum, 1e-3). Read-only (shared by every window of that size)."""

    def axis(n: int) -> np.ndarray:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
        sigma = n * GAUSSIAN_SIGMA_SCALE
        return np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)

    weights = np.outer(axis(height), axis(width)).astype(np.float32)
    np.maximum(weights, max(float(weights.min()), GAUSSIAN_MIN_WEIGHT), out=weights)
    weights.setflags(write=False)
    return weights


@dataclass(frozen=True)
class WindowModel:
    """What tiling needs of a model: `prepare` (h x w x 3 uint8 -> float32 [3, h, w]) and
    `run` ([N, 3, h, w] -> logits [N, C, h', w']), scoring `num_classes` classes."""

    prepare: Callable[[np.ndarray], np.ndarray]
    run: Callable[[np.ndarray], np.ndarray]
    num_classes: int


def segmenter_model(seg) -> WindowModel:
    """A Segmenter as a WindowModel: its processor's per-pixel steps, its `logits`."""
    return WindowModel(seg.preprocessor.normalize, seg.logits, seg.num_labels)


class _Clock:
    """Seconds per stage, added up (`stages` None: not timed), of `timer`: wall time
    (perf_counter) or the calling thread's CPU time (thread_time)."""

    def __init__(self, stages: dict[str, float] | None, timer=time.perf_counter):
        self.stages, self.timer = stages, timer
        self._t = timer()

    def lap(self, stage: str) -> None:
        """Add the time since the last lap (of this thread's clock) to `stage`."""
        now = self.timer()
        self.add(stage, now - self._t)
        self._t = now

    def mark(self) -> None:
        """Start the next lap now."""
        self._t = self.timer()

    def add(self, stage: str, seconds: float) -> None:
        if self.stages is not None:
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class _RowCache:
    """The pixels of the window row being cut, read once per row from the source."""

    def __init__(self, source):
        self.source = source
        self._rows: tuple[int, int] | None = None
        self._pixels: np.ndarray | None = None

    def crop(self, win: Window) -> np.ndarray:
        if self._rows != (win.y1, win.y2):
            self._pixels = None  # free the last row before reading the next
            self._pixels = self.source.rows(win.y1, win.y2)
            self._rows = (win.y1, win.y2)
        return self._pixels[:, win.x1 : win.x2]


def window_batches(
    source, plan: TilePlan, prepare, batch_size: int, clock: _Clock | None = None
) -> Iterator[tuple[list[Window], np.ndarray, tuple[int, int]]]:
    """(windows, model input [N, 3, h, w], input size) for every `batch_size` windows of
    the grid over `source`, in grid order. Every window of an image has one size (the
    tile, or the image's side where it is smaller), so a batch stacks."""
    clock = clock or _Clock(None)
    grid = plan.grid(source.height, source.width)
    rows = _RowCache(source)
    windows = list(grid.windows())
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        crops = []
        for win in batch:
            crops.append(rows.crop(win))
            clock.lap("decode")
        wh, ww = batch[0].size
        size = plan.tile if plan.pad else (wh, ww)
        # Zeros only where windows are padded to the tile: every window fills the rest.
        fill = np.empty if (wh, ww) == tuple(size) else np.zeros
        x = fill((len(batch), 3, *size), np.float32)
        for i, crop in enumerate(crops):
            x[i, :, :wh, :ww] = prepare(crop)
        clock.lap("preprocess")
        yield batch, x, size


def predict_bands(
    source,
    model: WindowModel,
    plan: TilePlan,
    batch_size: int,
    stages: dict[str, float] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, labels [rows, width]) of the label map of `source`, top to bottom, each
    band as soon as no later window touches it. `stages` (if given) adds up the helper
    thread's CPU seconds reading (decode), preparing windows (preprocess) and blending,
    and the wall seconds in the model and waiting for the helper (wait): the helper
    shares the cores with the model, so its wall time says how long it was held up, its
    CPU time what it costs.

    The calling thread only runs the model. A second thread cuts the next batch of
    windows and blends the last batch's logits while the model runs (numpy and ONNX
    Runtime release the GIL): on a GPU it keeps the device fed; on a CPU whose cores the
    model keeps busy it shares them (a 2-core EPYC: the helper's CPU per window made the
    model's calls about half as much slower, docs/tiles.md)."""
    clock, helper_clock = _Clock(stages), _Clock(stages, time.thread_time)
    grid = plan.grid(source.height, source.width)
    blender = TileBlender(grid, model.num_classes, plan.weights())
    batches = window_batches(source, plan, model.prepare, batch_size, helper_clock)

    def cut():
        helper_clock.mark()
        return next(batches, None)

    def blend(windows: list[Window], logits: np.ndarray, size) -> list:
        helper_clock.mark()
        for win, one in zip(windows, logits, strict=True):
            blender.add(win, one, size)
        bands = list(blender.finished())
        helper_clock.lap("blend")
        return bands

    with ThreadPoolExecutor(1, thread_name_prefix="segdeploy-tiles") as pool:
        pending = None
        upcoming = pool.submit(cut)
        while (item := upcoming.result()) is not None:
            windows, x, size = item
            upcoming = pool.submit(cut)  # runs beside the model, after the last blend
            clock.lap("wait")
            logits = np.asarray(model.run(x))
            clock.lap("model")
            if logits.ndim != 4 or len(logits) != len(windows):
                raise SegdeployError(
                    None, f"the model returned {list(logits.shape)} for {len(windows)} windows"
                )
            if pending is not None:
                bands = pending.result()
                clock.lap("wait")
                yield from bands
                clock.mark()  # the caller's time with the bands is not ours
            pending = pool.submit(blend, windows, logits, size)
        clock.lap("wait")
        if pending is not None:
            bands = pending.result()
            clock.lap("wait")
            yield from bands


def predict_tiled(seg, image, options: TileOptions | TilePlan) -> np.ndarray:
    """(H, W) class ids of one image (path, PIL image or H x W x 3 uint8 array), tiled."""
    from segdeploy.runtime.large_image import open_source

    plan = options if isinstance(options, TilePlan) else plan_for(seg, options)
    with open_source(image, max_pixels=seg.max_pixels, load=seg.load) as source:
        labels = np.empty((source.height, source.width), seg.label_dtype)
        for y0, band in predict_bands(source, segmenter_model(seg), plan, seg.window_batch_size):
            labels[y0 : y0 + len(band)] = band
    return labels
