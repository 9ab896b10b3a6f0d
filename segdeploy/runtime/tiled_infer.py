"""`segdeploy infer --tile`: the planned jobs of a run, each image segmented by sliding
windows (segdeploy.runtime.tiles) and written as its label map comes out, band by band.

runtime/infer.py plans the run as always (inputs, output names, --skip-existing,
summary.json) and hands the jobs here instead of to the worker pipeline: an
image is one unit of work too large to batch with others, its windows are the
batch. Each label map is a PNG as without tiling, or a tiled TIFF (x.tif beside
where x.png would be) when it is larger than large_image.LARGE_PIXELS or its
input is a GeoTIFF, whose georeferencing it then carries. Records and the
stage table are the pipeline's, so summary.json reads the same.

Ctrl-C or SIGTERM stops between two batches of windows: the image being written
is dropped (atomic writes: no partial file), the summary says "interrupted". A
full or read-only disk stops the run like the pipeline's.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import write_bytes
from segdeploy.errors import SegdeployError
from segdeploy.runtime import large_image, pipeline
from segdeploy.runtime.palette import overlay as blend_overlay
from segdeploy.runtime.palette import palette_for
from segdeploy.runtime.tiles import TilePlan, predict_bands, segmenter_model

log = logging.getLogger(__name__)

#: Rows of the overlay TIFF made at once (a tile row of the label TIFF).
OVERLAY_ROWS = large_image.TIFF_TILE


def check_run(video) -> None:
    """Refuse what tiling does not do, before anything is written: --stream."""
    if video is not None and video.streams:
        raise SegdeployError("--tile", "tiles images; run --stream without it")


def images_only(items: Iterable) -> Iterator:
    """The planned items, a video clip turned into a failure record: clips are segmented
    frame by frame without --tile."""
    from segdeploy.runtime.infer import Failure
    from segdeploy.runtime.video import is_video_name

    for item in items:
        if not isinstance(item, Failure) and is_video_name(item.path):
            yield Failure(
                str(item.path), "a video clip: --tile segments images; run clips without it"
            )
        else:
            yield item


def run(
    entries: Iterable[pipeline.Job | dict],
    seg,
    plan: TilePlan,
    output: Path,
    *,
    overlay: bool,
    skip_existing: bool,
    record: Callable[[dict], None],
    stop: Callable[[], bool] | None = None,
) -> pipeline.Outcome:
    """Segment every Job of `entries` tiled, in order; `record` gets each record (a dict
    entry is a ready record, passed on). Returns the run's Outcome, as pipeline.run."""
    outcome = pipeline.Outcome(workers=0)
    palette = palette_for(seg.num_labels) if overlay else None
    try:
        for entry in entries:
            if stop is not None and stop():
                raise KeyboardInterrupt
            if isinstance(entry, dict):
                record(entry)
                continue
            rec = _one(entry, seg, plan, output, palette, skip_existing, outcome, stop)
            if rec is not None:
                record(rec)
    except KeyboardInterrupt:
        outcome.interrupted = True
        log.warning("interrupted: the image being segmented is not written")
    except pipeline.Stop as reason:
        outcome.stopped = reason.fatal
        log.error("%s; stopping the run", reason)
    return outcome


def _one(job, seg, plan, output, palette, skip_existing, outcome, stop) -> dict | None:
    """One image: its record (a failure record for a bad file), or None when skipped
    outputs were found and recorded... never None: see the returns."""
    try:
        with large_image.open_source(job.path, max_pixels=seg.max_pixels, load=seg.load) as src:
            dest, over = _destinations(job, src, palette is not None)
            if skip_existing:
                rec = _existing(job, dest, over, output, seg.id2label)
                if rec is not None:
                    return rec
            _check_not_input(job.path, dest, over)
            return _segment(job, src, dest, over, seg, plan, output, palette, outcome, stop)
    except SegdeployError as err:
        return {"input": str(job.path), "reason": err.problem}
    except OSError as err:
        fatal = pipeline.fatal_error(err, err.filename or job.label)
        if fatal is not None:
            raise pipeline.Stop(fatal) from None
        return {"input": str(job.path), "reason": f"cannot write outputs: {err}"}
    except MemoryError:
        return {"input": str(job.path), "reason": "out of memory segmenting this image"}


def _destinations(job, src, overlay: bool) -> tuple[Path, Path | None]:
    """The label map's path (PNG, or TIFF for a large or georeferenced image) and the
    overlay's (JPEG, or TIFF likewise)."""
    if not large_image.wants_tiff(src.height, src.width, src.tags):
        return job.label, job.overlay if overlay else None
    over = large_image.tiff_name(job.overlay) if overlay and job.overlay else None
    return large_image.tiff_name(job.label), over


def _existing(job, dest: Path, over: Path | None, output: Path, id2label) -> dict | None:
    """--skip-existing: the record of an image whose outputs are all there, else None."""
    if not dest.is_file() or (over is not None and not over.is_file()):
        return None
    try:
        labels = large_image.read_labels(dest)
    except Exception:  # not a label map we wrote (atomic writes never leave half a file)
        return None
    return {
        "input": str(job.path),
        "output": str(dest.relative_to(output)),
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "classes": pipeline.class_shares(labels, id2label),
        "skipped": True,
    }


def _check_not_input(source: Path, *outputs: Path | None) -> None:
    """An output that is the input file itself (a hard link, a TIFF named like an output)
    is refused: writing it would replace the user's image."""
    for out in outputs:
        if out is not None and out.exists() and os.path.samefile(out, source):
            raise SegdeployError(out, "is the input image itself: choose another -o/--output")


def _segment(job, src, dest, over, seg, plan, output, palette, outcome, stop) -> dict:
    """Predict, write the label map (and overlay), and return the image's record."""
    wall = time.perf_counter()
    stages: dict[str, float] = {}
    counts = np.zeros(seg.num_labels, np.int64)
    bands = _counted(
        predict_bands(src, segmenter_model(seg), plan, seg.batch_size, stages), counts, stop
    )
    shape = (src.height, src.width)
    if dest.suffix == ".tif":
        large_image.write_tiff(dest, bands, shape, seg.label_dtype, src.tags)
        labels = None
    else:
        labels = np.empty(shape, seg.label_dtype)
        for y0, band in bands:
            labels[y0 : y0 + len(band)] = band
        pipeline.save_labels(dest, labels)
    t_written = time.perf_counter()
    if over is not None:
        _write_overlay(over, src, labels, dest, palette)
    total = time.perf_counter() - wall
    model_s = stages.get("model", 0.0)
    host = {"decode": stages.get("decode", 0.0), "preprocess": stages.get("preprocess", 0.0)}
    main_thread = sum(stages.get(k, 0.0) for k in ("decode", "preprocess", "model", "wait"))
    finished = {
        "upsample_argmax": stages.get("blend", 0.0),  # on its own thread, beside the model
        "png_encode": max(0.0, t_written - wall - main_thread),  # writing, PNG or TIFF
    }
    if over is not None:
        finished["overlay"] = time.perf_counter() - t_written
    outcome.model_s += model_s
    outcome.add(host, model_s, finished)
    return _record(job, src, dest, over, output, plan, counts, seg.id2label, stages, total)


def _counted(bands, counts: np.ndarray, stop) -> Iterator[tuple[int, np.ndarray]]:
    """The bands, passed on; class pixel counts added up; a stop signal raised between."""
    for y0, band in bands:
        if stop is not None and stop():
            raise KeyboardInterrupt
        counts += np.bincount(band.ravel(), minlength=len(counts))[: len(counts)]
        yield y0, band


def _write_overlay(path: Path, src, labels, label_file: Path, palette) -> None:
    """The image blended with the class colours: a JPEG of a small image, or for a large
    one a tiled TIFF made band by band from the label TIFF just written."""
    if labels is not None:
        jpeg = io.BytesIO()
        blend_overlay(src.rows(0, src.height), labels, palette).save(
            jpeg, format="JPEG", quality=90
        )
        write_bytes(path, jpeg.getvalue())
        return
    with large_image.TiffSource.open(label_file, max_pixels=None) as written:

        def bands():
            for y0 in range(0, src.height, OVERLAY_ROWS):
                y1 = min(y0 + OVERLAY_ROWS, src.height)
                ids = written.samples(y0, y1)[..., 0]
                yield y0, np.asarray(blend_overlay(src.rows(y0, y1), ids, palette))

        large_image.write_tiff(path, bands(), (src.height, src.width, 3), np.uint8, src.tags)


def _record(job, src, dest, over, output, plan, counts, id2label, stages, total) -> dict[str, Any]:
    """summary.json's record of one tiled image: pipeline.image_record's keys, and the
    tiling (tile, stride, blend, windows)."""
    pixels = max(int(counts.sum()), 1)
    present = sorted(((int(i), int(n)) for i, n in enumerate(counts) if n), key=lambda t: -t[1])
    rec: dict[str, Any] = {
        "input": str(job.path),
        "output": str(dest.relative_to(output)),
        "size": [src.height, src.width],
        "classes": [
            {"id": i, "name": id2label.get(i, str(i)), "share": round(n / pixels, 6)}
            for i, n in present
        ],
    }
    if over is not None:
        rec["overlay"] = str(over.relative_to(output))
    rec["tiles"] = {**plan.to_json(), "windows": len(plan.grid(src.height, src.width))}
    model = stages.get("model", 0.0)
    times = {"decode": stages.get("decode", 0.0), "model": model, "postprocess": total - model}
    rec["time_s"] = {k: round(v, 6) for k, v in times.items()}
    rec["time_s"]["total"] = round(total, 6)
    return rec
