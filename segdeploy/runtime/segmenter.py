"""`Segmenter`: an exported model of any family (segdeploy.families) as a function from
images to label maps, without torch.

The work is split into three steps that `segdeploy infer` runs on different
threads: `prepare` (decode + preprocess, per image), `forward` (the model, per
batch) and the pending masks it returns (upsample + argmax, per image).
`predict` and `predict_batch` chain them for library users.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError, first_line
from segdeploy.families import FAMILIES, Family
from segdeploy.folders import CONFIG_FILE, OUTPUT_SIZE_INPUT, OnnxFolder, read_json
from segdeploy.runtime import providers as prov
from segdeploy.runtime.image_io import MAX_PIXELS, array_image, decode_image, load_image, to_rgb
from segdeploy.runtime.preprocess import CONFIG_NAME
from segdeploy.runtime.processors import ImageProcessor, model_processor
from segdeploy.runtime.upsample import label_dtype, upsample_argmax

log = logging.getLogger(__name__)

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray


def resolve_model_dir(model_dir: str | os.PathLike, variant: str = "fp32") -> tuple[Path, Path]:
    """(folder, graph file) for a model folder: an ONNX folder, or a trained
    model folder with its export in `onnx/`."""
    folder = OnnxFolder.open(model_dir, variant)
    return folder.path, folder.graph(variant)


def read_id2label(folder: Path) -> dict[int, str] | None:
    """config.json's class names, or None when the folder has no config.json or names none.

    The ids must be 0..N-1, each once, written as whole numbers ("0", "1", ...): a label
    map stores ids, and an id with no class (or a gap) would misname every class after it.
    """
    path = folder / CONFIG_FILE
    cfg = read_json(path)
    if cfg is None:
        return None
    raw = cfg.get("id2label") if isinstance(cfg, dict) else None
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise SegdeployError(path, f"id2label must map ids to names, got {type(raw).__name__}")
    ids = {}
    for key, name in raw.items():
        text = str(key).strip()
        if not (text.isdigit() and str(int(text)) == text):
            raise SegdeployError(path, f"id2label ids must be whole numbers 0..N-1, got {key!r}")
        ids[int(text)] = str(name)
    if sorted(ids) != list(range(len(ids))):
        missing = sorted(set(range(len(ids))) - set(ids))[:5]
        raise SegdeployError(
            path,
            f"id2label ids must be 0..{len(ids) - 1}, each once (label maps store the ids): "
            f"{len(ids)} names, but {', '.join(map(str, missing))} missing",
        )
    return ids


def read_family(folder: Path) -> Family | None:
    """The family config.json's model_type names, or None (no config.json, or a model_type
    segdeploy does not register: such a folder still runs, without the family's checks)."""
    cfg = read_json(folder / CONFIG_FILE)
    return FAMILIES.get(cfg.get("model_type")) if isinstance(cfg, dict) else None


def _sides(size: tuple[int, int] | None, processor: ImageProcessor) -> str:
    if size is not None:
        return f"{size[0]}x{size[1]}"
    return f"inputs whose size follows each photo ({processor.kind} settings)"


def check_input_size(
    processor: ImageProcessor, graph_shape: Sequence[Any], family: Family | None, where: Path
) -> None:
    """Refuse at open a processor whose inputs the graph cannot take, one line naming both.

    A graph exported with fixed spatial axes (BEiT, Data2VecVision, MobileNetV2, UPerNet)
    runs only at that size; a square-only family (DPT) only on squares. Without this the
    first photo would fail inside ONNX Runtime, or, worse, a size would be accepted that
    the processor never makes for other photos.
    """
    made = processor.size
    spatial = tuple(graph_shape[2:4]) if len(graph_shape) == 4 else ()
    if len(spatial) == 2 and all(isinstance(d, int) and d > 0 for d in spatial):
        if made != spatial:
            raise SegdeployError(
                where,
                f"the image processor makes {_sides(made, processor)} inputs but the graph "
                f"takes only {spatial[0]}x{spatial[1]}: set size/crop_size to that, or export "
                "the model again at the processor's size",
            )
    elif family is not None and family.square_only and (made is None or made[0] != made[1]):
        raise SegdeployError(
            where,
            f"{family.name} runs square inputs only, but the image processor makes "
            f"{_sides(made, processor)}: set a square size and keep_aspect_ratio false",
        )


def check_graph_input(shape: Sequence[Any], where: Path) -> None:
    """Refuse at open a graph whose first input is not [batch, 3, height, width]: segdeploy
    feeds RGB images, and a 1-channel graph would fail on the first batch."""
    if len(shape) != 4:
        raise SegdeployError(
            where,
            f"the graph's input has shape {list(shape)}; segdeploy feeds "
            "[batch, 3, height, width] (RGB images)",
        )
    if isinstance(shape[1], int) and shape[1] != 3:
        raise SegdeployError(
            where,
            f"the graph takes {shape[1]}-channel input; segdeploy feeds RGB images "
            "(3 channels): export a model with 3 input channels",
        )


def fingerprint(files: Sequence[Path]) -> str:
    """`sha256:<hex>` of the files' bytes, in order (a missing file counts as empty): the
    identity of a model as its outputs' marks record it (segdeploy.runtime.provenance)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.fsencode(path.name) + b"\0")
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


class _BatchOutput:
    """One batch's model output, copied to the host at most once, when first needed.

    On CUDA it is an IOBinding whose output is in device memory: the model
    thread hands it on without waiting for the copy, which happens on whichever
    thread asks first.
    """

    def __init__(self, value: Any):
        self._value = value
        self._host: np.ndarray | None = None
        self._lock = threading.Lock()

    def host(self) -> np.ndarray:
        with self._lock:
            if self._host is None:
                v = self._value
                # An IOBinding: its one output is copied off the device here, once.
                self._host = v if isinstance(v, np.ndarray) else v.copy_outputs_to_cpu()[0]
                self._value = None
            return self._host


class PendingMask:
    """A mask whose upsampling has not run yet; call it to get the (H, W) labels."""

    def __init__(self, batch: _BatchOutput, index: int, size: tuple[int, int], fused: bool):
        self._batch, self._index, self.size, self._fused = batch, index, size, fused

    @property
    def fused(self) -> bool:
        """True when `raw()` is already the label map (argmax fused into the graph)."""
        return self._fused

    def raw(self) -> np.ndarray:
        """This image's model output on the host, before upsampling: logits [C, h, w],
        or the (H, W) labels of a fused graph. What another process needs to finish it."""
        return self._batch.host()[self._index]

    def __call__(self) -> np.ndarray:
        out = self.raw()
        if self._fused:
            return out
        return upsample_argmax(out, self.size)


def default_batch_size(provider: str, *, windows: bool = False) -> int:
    """The largest batch a model runs when none is given: 16 on a GPU, 4 on a CPU
    (onnxruntime's or OpenVINO's), where a larger batch is no faster per image and needs
    more memory (SegFormer b0 at 512 on a 2-core EPYC: 220-250 ms per image at batch 1 to
    8; a serve replica's RSS 2.1 GB at batch 4, 3.9 GB at batch 8, both measured with
    onnxruntime's memory patterns on, which serve replicas now run without).

    `windows`: the windows per call of a tiled image, the provider's `window_batch` where
    it has one: 1 on onnxruntime's CPU provider, where a tiled SegFormer b0 (150 classes,
    512 px windows, 2-core AVX2 EPYC) ran 0.89x the windows/s at 4 per call and peaked
    1.2 GB higher (benchmarks/results/tiles_cpu.md; docs/tiles.md says why)."""
    entry = prov.PROVIDERS_BY_NAME[provider]
    if windows and entry.window_batch is not None:
        return entry.window_batch
    return 4 if entry.on_cpu else 16


def _external_data(graph: Path) -> list[Path]:
    """The external-data files beside a graph (`model.onnx_data`, `model.onnx.data`...)."""
    return sorted(p for p in graph.parent.glob(f"{graph.name}*data") if p.is_file())


class Segmenter:
    """Semantic segmentation with an exported model of any family on ONNX Runtime.

    `model_dir` is an ONNX folder (model.onnx, config.json,
    preprocessor_config.json) or a trained model folder with it in `onnx/`; the
    processor is the one preprocessor_config.json names (segdeploy.runtime.processors),
    and masks are upsampled to each photo's own size, whatever it cropped or padded.
    `variant` picks the graph: fp32 (model.onnx), fp16, optimized, int8, or any
    `model_<variant>.onnx` (or OpenVINO IR `model_<variant>.xml`). `provider`: auto |
    cpu | cuda | tensorrt | openvino (OpenVINO's runtime, `ov_cache` its compiled-model
    folder); a missing one raises SegdeployError unless `fallback` (TensorRT -> CUDA ->
    CPU, OpenVINO -> CPU).
    `fp16`: TensorRT builds fp16 engines; on CUDA and CPU it selects the fp16
    graph (same as variant="fp16"). `batch_size` is the largest batch the model
    runs (and TensorRT's profile), and the windows per call of a tiled image (when not
    given, `window_batch_size` is the provider's own default for windows: 1 on
    onnxruntime's CPU provider); `threads` are ONNX Runtime's intra-op threads;
    `spin=False` lets them sleep when idle (other processes share the cores);
    `mem_pattern=False` when the batch size varies from call to call (a serve replica):
    onnxruntime's memory patterns then grow its arena (`providers.session_options`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        provider: str = "auto",
        variant: str = "fp32",
        *,
        fallback: bool = False,
        threads: int | None = None,
        trt_cache: str | os.PathLike | None = None,
        fp16: bool = False,
        batch_size: int | None = None,
        device_id: int = 0,
        max_pixels: int | None = MAX_PIXELS,
        spin: bool = True,
        ov_cache: str | os.PathLike | None = None,
        mem_pattern: bool = True,
    ):
        if batch_size is not None and batch_size < 1:
            raise SegdeployError("--batch-size", f"must be at least 1, got {batch_size}")
        available = prov.available_providers()
        choice = prov.choose_provider(provider, available, fallback=fallback)
        if fp16 and variant == "fp32" and choice.name != "tensorrt":
            variant = (
                "fp16"  # TensorRT converts the fp32 graph itself; the others need the fp16 graph
            )
        self.folder, self.onnx_path = resolve_model_dir(model_dir, variant)
        self.variant = variant
        self.family = read_family(self.folder)
        self.preprocessor = model_processor(self.folder)
        given = batch_size
        if batch_size is None:
            batch_size = default_batch_size(choice.name)
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.session = prov.create_session(
            self.onnx_path,
            provider,
            fallback=fallback,
            threads=threads,
            trt_cache=trt_cache,
            fp16=fp16,
            batch_size=batch_size,
            image_size=self.preprocessor.size,
            device_id=device_id,
            available=available,
            spin=spin,
            ov_cache=ov_cache,
            mem_pattern=mem_pattern,
        )
        self.provider = prov.active_provider(self.session)
        #: Windows per model call of a tiled image: `batch_size` when given, else the
        #: default of the provider that runs (after any fallback).
        self.window_batch_size = given or default_batch_size(self.provider, windows=True)
        self.device_id = device_id
        #: Where IO binding keeps outputs; None runs plainly (on CPU binding buys nothing).
        self.io_device: str | None = "cuda" if self.provider in ("cuda", "tensorrt") else None
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        graph_input = self.session.get_inputs()[0].shape
        check_graph_input(graph_input, self.onnx_path)
        check_input_size(self.preprocessor, graph_input, self.family, self.folder / CONFIG_NAME)
        self.fused = OUTPUT_SIZE_INPUT in inputs
        out = self.session.get_outputs()[0]
        self.id2label = read_id2label(self.folder)
        classes = out.shape[1] if not self.fused and len(out.shape) == 4 else None
        if self.id2label is None:
            if not isinstance(classes, int):
                raise SegdeployError(self.folder / CONFIG_FILE, "missing: cannot tell the classes")
            self.id2label = {i: str(i) for i in range(classes)}
        self.num_labels = len(self.id2label)
        self.label_dtype = label_dtype(self.num_labels)
        spatial_fixed = all(isinstance(d, int) for d in graph_input[2:4])
        if (not self.fused and not isinstance(classes, int)) or (
            self.preprocessor.size is not None and not spatial_fixed
        ):
            classes = self._probe()
        if not self.fused:  # a fused graph outputs labels: no class axis to compare
            self._check_classes(classes)

    def _probe(self) -> int:
        """Run one blank image at the processor's size now, at open: a size the model cannot
        run (a 1x1 `size` where the graph's strides need more) is refused here, with the
        file to fix, not on the first batch; returns the output's class axis.

        Run when the graph leaves the spatial axes open (the processor's size is then not
        checked by `check_input_size`) or the class axis (read from the output instead)."""
        h, w = self.preprocessor.size or (64, 64)
        blank = np.zeros((1, 3, h, w), np.float32)
        try:
            out = _BatchOutput(self._run(blank, (h, w))).host()
        except Exception as err:  # onnxruntime's errors are plain Exceptions
            if self.preprocessor.size is None:
                raise
            raise SegdeployError(
                self.folder / CONFIG_NAME,
                f"the model cannot run the image processor's {h}x{w} inputs: {first_line(err)}",
            ) from None
        return int(out.shape[1]) if out.ndim == 4 else 0

    @functools.cached_property
    def fingerprint(self) -> str:
        """`sha256:<hex>` of the graph, config.json and preprocessor_config.json: what the
        outputs' marks record, so that `--skip-existing` keeps only this model's outputs.
        Read once, on first use (0.5 s per GB of graph)."""
        files = [self.onnx_path, *_external_data(self.onnx_path)]
        return fingerprint([*files, self.folder / CONFIG_FILE, self.folder / CONFIG_NAME])

    def _check_classes(self, classes: Any) -> None:
        """The graph must score exactly the classes config.json names, or labels would lie.

        The class axis is read from the graph's output shape; when it is dynamic
        (a name, not a number) it comes from the blank batch `_probe` ran, so a
        mismatch is refused before any image is read or any output written.
        """
        if classes != self.num_labels:
            raise SegdeployError(
                self.onnx_path,
                f"the graph scores {classes} classes but {self.folder / 'config.json'} "
                f"names {self.num_labels}: export the model again, or use its own config.json",
            )

    # -- steps -----------------------------------------------------------------
    def load(self, image: ImageLike) -> Image.Image:
        """An RGB PIL image from a path or an image file's bytes (EXIF applied,
        bomb-guarded), a PIL image or a uint8 array (HxW or HxWx1 grey, HxWx3 RGB, HxWx4
        RGBA); anything else is a SegdeployError."""
        if isinstance(image, str | os.PathLike):
            return load_image(image, max_pixels=self.max_pixels)
        if isinstance(image, bytes):
            return decode_image(image, max_pixels=self.max_pixels)
        if isinstance(image, np.ndarray):
            return array_image(image)
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise SegdeployError(None, f"empty image ({image.width}x{image.height} pixels)")
            return to_rgb(image)
        raise SegdeployError(None, f"cannot segment a {type(image).__name__}")

    def prepare(self, image: Image.Image) -> np.ndarray:
        """float32 [3, h, w] model input for one RGB image; SegdeployError when the processor
        would allocate more than `max_pixels` for it (`ImageProcessor.check_pixels`)."""
        self.preprocessor.check_pixels(image.height, image.width, self.max_pixels)
        return self.preprocessor.to_array(image)

    def forward(
        self, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
    ) -> list[PendingMask]:
        """Run the model on prepared inputs; one pending mask per input, at its `sizes` entry.

        Inputs of different shapes (only when the preprocessor keeps image
        sizes) run as separate batches, as do different sizes on a fused graph.
        """
        pending: list[PendingMask | None] = [None] * len(inputs)
        for chunk in self.batches(inputs, sizes):
            pixels = np.stack([inputs[i] for i in chunk])
            out = _BatchOutput(self._run(pixels, tuple(sizes[chunk[0]])))
            for j, i in enumerate(chunk):
                pending[i] = PendingMask(out, j, tuple(sizes[i]), self.fused)
        return pending  # type: ignore[return-value]

    def batches(
        self, inputs: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]
    ) -> list[list[int]]:
        """The model calls `forward` makes: per call, the indices of the inputs it takes
        (inputs of one shape, and of one output size on a fused graph; `batch_size` at most)."""
        if len(inputs) != len(sizes):
            raise ValueError("one size per input")
        groups: dict[Any, list[int]] = {}
        for i, (x, size) in enumerate(zip(inputs, sizes, strict=True)):
            key = (x.shape, tuple(size)) if self.fused else x.shape
            groups.setdefault(key, []).append(i)
        return [
            idx[start : start + self.batch_size]
            for idx in groups.values()
            for start in range(0, len(idx), self.batch_size)
        ]

    def _run(self, pixels: np.ndarray, size: tuple[int, int]):
        feeds = {self.input_name: pixels}
        if self.fused:
            feeds[OUTPUT_SIZE_INPUT] = np.asarray(size, dtype=np.int64)
        if self.io_device is not None:
            # On the GPU the output stays in device memory until PendingMask copies it.
            return prov.run_io_binding(
                self.session, feeds, device_type=self.io_device, device_id=self.device_id
            )
        return self.session.run([self.session.get_outputs()[0].name], feeds)[0]

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The model alone: float32 [N, C, h/s, w/s] for preprocessed [N, 3, h, w] input
        (s, the logits' stride, depends on the family: 1 to 16)."""
        if self.fused:
            raise SegdeployError(
                self.onnx_path, "this graph has argmax fused in; it returns labels, not logits"
            )
        out = self._run(np.ascontiguousarray(pixels, dtype=np.float32), (0, 0))
        return _BatchOutput(out).host()

    # -- convenience -----------------------------------------------------------
    def predict(
        self,
        image: ImageLike,
        tile: int | tuple[int, int] | str | None = None,
        *,
        stride: int | tuple[int, int] | None = None,
        overlap: float | None = None,
        blend: str = "mean",
    ) -> np.ndarray:
        """(H, W) class ids for one image, at the image's own size.

        With `tile` ("auto": the model's input size, a side, or (height, width)) the
        image is segmented by sliding windows at its own resolution, MMSegmentation's
        slide mode (segdeploy.runtime.tiles; `stride` or `overlap`, `blend` "mean" or
        "gaussian"); a TIFF path is then read by window."""
        if tile is not None:
            from segdeploy.runtime.tiles import TileOptions, predict_tiled

            return predict_tiled(self, image, TileOptions(tile, stride, overlap, blend))
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Class-id maps for images of any sizes, batched `batch_size` at a time. `images` is
        a list (or a 4-D NxHxWxC array); one image (a path, an array) is `predict`'s."""
        if isinstance(images, str | os.PathLike | Image.Image) or (
            isinstance(images, np.ndarray) and images.ndim != 4
        ):
            raise SegdeployError(
                None,
                f"predict_batch takes a list of images, got one {type(images).__name__}; "
                "use predict() for one image",
            )
        rgb = [self.load(im) for im in images]
        inputs = [self.prepare(im) for im in rgb]
        sizes = [(im.height, im.width) for im in rgb]
        return [p() for p in self.forward(inputs, sizes)]
