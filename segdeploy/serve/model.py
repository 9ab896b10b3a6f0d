"""One replica's work: a request's image through the stages of `segdeploy infer`.

Decode (`Segmenter.load`: `image_io`'s decoder, the one infer reads files with),
preprocess (`Segmenter.prepare`), the model on a batch of requests
(`Segmenter.forward`), upsample + argmax (the pending mask), and the label PNG
from `pipeline.encode_labels`, the encoder infer writes files with: so a mask
from the service is the PNG `segdeploy infer` writes for the same file, byte for
byte. Plain Python, no Ray: `deployments.ModelReplica` runs it behind Ray Serve,
batching `forward` with `batching.Batcher`.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import ImageTooLarge
from segdeploy.runtime.overlay import render_overlay
from segdeploy.runtime.palette import palette_for
from segdeploy.runtime.pipeline import available_cores, class_shares, encode_labels
from segdeploy.runtime.segmenter import PendingMask, Segmenter

#: What a request may ask back: the label PNG, the label array (v2), the overlay PNG.
OUTPUTS = frozenset({"png", "labels", "overlay"})


@dataclass(frozen=True)
class Job:
    """One segmentation request as the front end hands it to a replica."""

    data: bytes | np.ndarray  # an image file's bytes, or H x W x 3 uint8 pixels
    outputs: frozenset[str] = frozenset({"png"})


@dataclass(frozen=True)
class Refused:
    """A request the replica cannot segment: the HTTP status and the reason, one line."""

    status: int
    reason: str


@dataclass
class Segmented:
    """One answered request."""

    width: int
    height: int
    shares: list[dict[str, Any]]  # pipeline.class_shares: [{"id", "name", "share"}]
    png: bytes | None
    overlay: bytes | None
    labels: np.ndarray | None
    batch_size: int  # images in the model call this one was part of
    first_in_batch: bool  # counts that model call once in the metrics
    timings_ms: dict[str, float] = field(default_factory=dict)
    served_by: dict[str, str] = field(default_factory=dict)  # Ray node and replica


@dataclass
class Prepared:
    x: np.ndarray  # float32 [3, h, w]: the model input
    size: tuple[int, int]  # (H, W): the label map's size
    image: Image.Image | None  # kept for the overlay only
    ms: dict[str, float]
    ready: float  # perf_counter when it joined the batch queue


@dataclass(frozen=True)
class Pass:
    """One image's share of a model call."""

    pending: PendingMask
    batch_size: int
    first: bool
    model_ms: float
    started: float  # perf_counter when the model call began


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


@dataclass(frozen=True)
class ServiceInfo:
    """What the front end tells about the model (read once from it by the driver)."""

    name: str
    variant: str
    provider: str
    id2label: dict[int, str]
    label_dtype: str  # numpy dtype name of the label maps: uint8, uint16
    palette: list[str]  # "#rrggbb" per class, the overlay's colours
    platform: str = "onnxruntime_onnx"


class ReplicaModel:
    """The Segmenter of one replica and the stages around it."""

    def __init__(
        self,
        model_dir: str,
        *,
        provider: str = "auto",
        variant: str = "fp32",
        fallback: bool = False,
        threads: int | None = None,
        batch_size: int = 8,
        max_pixels: int | None = None,
    ):
        # spin=False: ONNX Runtime's threads sleep between calls, leaving the cores to the
        # threads decoding the next requests (as infer does beside its worker processes).
        # mem_pattern=False: a replica's batches are whatever queued up (1 to batch_size),
        # and ONNX Runtime's per-shape memory patterns fragmented its arena across them:
        # the service's RSS grew 1.26x under the bench's load, all of it in this replica's
        # first full batch after smaller ones (`providers.session_options`).
        self.seg = Segmenter(
            model_dir,
            provider,
            variant,
            fallback=fallback,
            threads=threads,
            batch_size=batch_size,
            max_pixels=max_pixels,
            spin=False,
            mem_pattern=False,
        )
        self.palette = palette_for(self.seg.num_labels)

    def stage_threads(self) -> int:
        """Threads for the stages around the model (decode, preprocess, upsample, encode).

        On a CPU provider, one: they take ~10 ms of CPU per image beside the model's
        100-200 ms (SegFormer b0 at 512 on 2 cores), so one keeps up, and more
        (asyncio's default pool, cores + 4) only took CPU from the model's threads while
        a queue of 16 requests was decoded at once: on 2 cores (AVX2 EPYC, int8 b0, 3
        interleaved rounds) 16 clients got 1.15x the images/s with one thread (pairs
        1.31, 1.15, 1.02) and one client's p50 was 0.88x. On a GPU the stages are the
        CPU's whole share of the work: every core."""
        return available_cores() if self.seg.io_device else 1

    def warm_up(self) -> None:
        """One full batch of blank inputs at the processor's size, before the replica takes
        requests (Triton's model_warmup): ONNX Runtime grows its memory arena for the
        largest call now, at start, not on the first full batch under load (with
        memory patterns off, see __init__, that bounds it: 1.06x under the bench's load).
        A processor that keeps each photo's size has no one size to warm up; its replica
        warms up on its first requests."""
        size = self.seg.preprocessor.size
        if size is None:
            return
        blank = np.zeros((3, *size), np.float32)
        n = self.seg.batch_size
        for pending in self.seg.forward([blank] * n, [size] * n):
            pending.raw()

    def prepare(self, job: Job) -> Prepared | Refused:
        """Decode and preprocess; a bad image is a Refused (413 over the pixel limit, else 400)."""
        t0 = time.perf_counter()
        try:
            image = self.seg.load(job.data)
            t1 = time.perf_counter()
            x = self.seg.prepare(image)
        except ImageTooLarge as err:
            return Refused(413, err.problem)
        except SegdeployError as err:
            return Refused(400, err.problem)
        except (OSError, ValueError, MemoryError) as err:  # Pillow's resize on odd data
            return Refused(400, f"cannot preprocess: {type(err).__name__}: {err}")
        t2 = time.perf_counter()
        return Prepared(
            x,
            (image.height, image.width),
            image if "overlay" in job.outputs else None,
            {"decode": _ms(t1 - t0), "preprocess": _ms(t2 - t1)},
            t2,
        )

    def forward(self, items: Sequence[Prepared]) -> list[Pass]:
        """The model on requests that arrived together: one call per group of one input
        size (`Segmenter.batches`), each timed."""
        xs = [p.x for p in items]
        sizes = [p.size for p in items]
        passes: list[Pass | None] = [None] * len(items)
        for call in self.seg.batches(xs, sizes):
            t = time.perf_counter()
            pending = self.seg.forward([xs[i] for i in call], [sizes[i] for i in call])
            for p in pending:
                p.raw()  # the model's output on the host now, so model_ms is the model's time
            model_ms = _ms(time.perf_counter() - t)
            for j, i in enumerate(call):
                passes[i] = Pass(pending[j], len(call), j == 0, model_ms, t)
        return passes  # type: ignore[return-value]

    def finish(self, job: Job, prepared: Prepared, passed: Pass) -> Segmented:
        """Upsample + argmax, class shares, and the outputs the request asked for."""
        t0 = time.perf_counter()
        labels = passed.pending()
        t1 = time.perf_counter()
        png = encode_labels(labels) if "png" in job.outputs else None
        overlay = None
        if prepared.image is not None:
            buf = io.BytesIO()
            # infer's overlay (light colours, outlines, a legend on larger images), as PNG
            render_overlay(prepared.image, labels, self.palette, self.seg.id2label).save(
                buf, format="PNG", compress_level=1
            )
            overlay = buf.getvalue()
        shares = class_shares(labels, self.seg.id2label)
        t2 = time.perf_counter()
        ms = {
            **prepared.ms,
            "wait": _ms(max(passed.started - prepared.ready, 0.0)),
            "model": passed.model_ms,
            "upsample": _ms(t1 - t0),
            "encode": _ms(t2 - t1),
        }
        return Segmented(
            width=int(labels.shape[1]),
            height=int(labels.shape[0]),
            shares=shares,
            png=png,
            overlay=overlay,
            labels=labels.astype(self.seg.label_dtype, copy=False)
            if "labels" in job.outputs
            else None,
            batch_size=passed.batch_size,
            first_in_batch=passed.first,
            timings_ms=ms,
        )
