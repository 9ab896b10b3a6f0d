"""`Segmenter`: an exported model of any family (segdeploy.families) as a function from
images to label maps, without torch.

The work is split into three steps that `segdeploy infer` runs on different
threads: `prepare` (decode + preprocess, per image), `forward` (the model, per
batch) and the pending masks it returns (upsample + argmax, per image).
`predict` and `predict_batch` chain them for library users.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.families import FAMILIES, Family
from segdeploy.folders import CONFIG_FILE, OUTPUT_SIZE_INPUT, OnnxFolder, read_json
from segdeploy.runtime import providers as prov
from segdeploy.runtime.image_io import MAX_PIXELS, decode_image, load_image, to_rgb
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
    """config.json's class names, or None when the folder has no config.json or names none."""
    cfg = read_json(folder / CONFIG_FILE)
    if cfg is None:
        return None
    try:
        return {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()} or None
    except (AttributeError, TypeError, ValueError) as err:
        raise SegdeployError(folder / CONFIG_FILE, f"unreadable id2label: {err}") from None


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


class Segmenter:
    """Semantic segmentation with an exported model of any family on ONNX Runtime.

    `model_dir` is an ONNX folder (model.onnx, config.json,
    preprocessor_config.json) or a trained model folder with it in `onnx/`; the
    processor is the one preprocessor_config.json names (segdeploy.runtime.processors),
    and masks are upsampled to each photo's own size, whatever it cropped or padded.
    `variant` picks the graph: fp32 (model.onnx), fp16, optimized, int8, or any
    `model_<variant>.onnx`. `provider`: auto | cpu | cuda | tensorrt; a missing
    one raises SegdeployError unless `fallback` (TensorRT -> CUDA -> CPU).
    `fp16`: TensorRT builds fp16 engines; on CUDA and CPU it selects the fp16
    graph (same as variant="fp16"). `batch_size` is the largest batch the model
    runs (and TensorRT's profile); `threads` are ONNX Runtime's intra-op threads;
    `spin=False` lets them sleep when idle (other processes share the cores).
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
    ):
        import onnxruntime as ort

        if batch_size is not None and batch_size < 1:
            raise SegdeployError("--batch-size", f"must be at least 1, got {batch_size}")
        available = ort.get_available_providers()
        choice = prov.choose_provider(provider, available, fallback=fallback)
        if fp16 and variant == "fp32" and choice.name != "tensorrt":
            variant = (
                "fp16"  # TensorRT converts the fp32 graph itself; the others need the fp16 graph
            )
        self.folder, self.onnx_path = resolve_model_dir(model_dir, variant)
        self.variant = variant
        self.family = read_family(self.folder)
        self.preprocessor = model_processor(self.folder)
        if batch_size is None:
            batch_size = 4 if choice.name == "cpu" else 16
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
        )
        self.provider = prov.active_provider(self.session)
        self.device_id = device_id
        #: Where IO binding keeps outputs; None runs plainly (on CPU binding buys nothing).
        self.io_device: str | None = "cuda" if self.provider in ("cuda", "tensorrt") else None
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = inputs[0]
        check_input_size(
            self.preprocessor,
            self.session.get_inputs()[0].shape,
            self.family,
            self.folder / CONFIG_NAME,
        )
        self.fused = OUTPUT_SIZE_INPUT in inputs
        out = self.session.get_outputs()[0]
        self.id2label = read_id2label(self.folder)
        if self.id2label is None:
            classes = out.shape[1] if not self.fused and len(out.shape) == 4 else None
            if not isinstance(classes, int):
                raise SegdeployError(self.folder / CONFIG_FILE, "missing: cannot tell the classes")
            self.id2label = {i: str(i) for i in range(classes)}
        self.num_labels = len(self.id2label)
        self.label_dtype = label_dtype(self.num_labels)
        if not self.fused:  # a fused graph outputs labels: no class axis to compare
            self._check_classes(out.shape[1] if len(out.shape) == 4 else None)

    def _check_classes(self, classes: Any) -> None:
        """The graph must score exactly the classes config.json names, or labels would lie.

        The class axis is read from the graph's output shape; when it is dynamic
        (a name, not a number) one batch of a blank image is run now, so a
        mismatch is refused before any image is read or any output written.
        """
        if not isinstance(classes, int):
            h, w = self.preprocessor.size or (64, 64)
            blank = np.zeros((1, 3, h, w), np.float32)
            classes = int(_BatchOutput(self._run(blank, (h, w))).host().shape[1])
        if classes != self.num_labels:
            raise SegdeployError(
                self.onnx_path,
                f"the graph scores {classes} classes but {self.folder / 'config.json'} "
                f"names {self.num_labels}: export the model again, or use its own config.json",
            )

    # -- steps -----------------------------------------------------------------
    def load(self, image: ImageLike) -> Image.Image:
        """An RGB PIL image from a path or an image file's bytes (EXIF applied,
        bomb-guarded), a PIL image or an HxWx3 array."""
        if isinstance(image, str | os.PathLike):
            return load_image(image, max_pixels=self.max_pixels)
        if isinstance(image, bytes):
            return decode_image(image, max_pixels=self.max_pixels)
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise SegdeployError(
                    None, f"arrays must be uint8 HxW or HxWx3, got {image.dtype} {image.shape}"
                )
            return to_rgb(Image.fromarray(image))
        if isinstance(image, Image.Image):
            return to_rgb(image)
        raise SegdeployError(None, f"cannot segment a {type(image).__name__}")

    def prepare(self, image: Image.Image) -> np.ndarray:
        """float32 [3, h, w] model input for one RGB image."""
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
    def predict(self, image: ImageLike) -> np.ndarray:
        """(H, W) class ids for one image, at the image's own size."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[ImageLike]) -> list[np.ndarray]:
        """Class-id maps for images of any sizes, batched `batch_size` at a time."""
        rgb = [self.load(im) for im in images]
        inputs = [self.prepare(im) for im in rgb]
        sizes = [(im.height, im.width) for im in rgb]
        return [p() for p in self.forward(inputs, sizes)]
