"""`segdeploy infer --tile`: the planned jobs of a run, each image segmented by sliding
windows (segdeploy.runtime.tiles) and written as its label map comes out, band by band.

runtime/infer.py plans the run as always (inputs, output names, --skip-existing,
summary.json) and hands the jobs here instead of to the worker pipeline: an
image is one unit of work too large to batch with others, its windows are the
batch. Each label map is a PNG as without tiling, or a tiled TIFF (x.tif beside
where x.png would be) when it is larger than large_image.LARGE_PIXELS or its
input is a GeoTIFF, whose georeferencing it then carries. Records and the
stage table are the pipeline's, so summary.json reads the same.

The outputs follow infer's rules for every output: each carries segdeploy's
mark (segdeploy.runtime.provenance; a TIFF's in a private tag); `check_plan`
refuses, before the run, a file at an output path that segdeploy did not write
(the paths come from each image's header: `planned_outputs`), and each image
checks its outputs again just before writing them. --skip-existing keeps only
outputs this model wrote for an image of this size. A model that fails on an
image's windows fails that image alone.

Ctrl-C or SIGTERM stops between two batches of windows: the image being written
is dropped (atomic writes: no partial file), the summary says "interrupted". A
full or read-only disk stops the run like the pipeline's.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.atomic import write_bytes
from segdeploy.errors import SegdeployError, first_line
from segdeploy.runtime import large_image, pipeline
from segdeploy.runtime.palette import overlay as blend_overlay
from segdeploy.runtime.palette import palette_for
from segdeploy.runtime.provenance import Mark, mark_jpeg, occupant, owned, rel_name
from segdeploy.runtime.tiles import TilePlan, WindowModel, predict_bands, segmenter_model

log = logging.getLogger(__name__)

#: Rows of the overlay TIFF made at once (a tile row of the label TIFF).
OVERLAY_ROWS = large_image.TIFF_TILE


def check_run(video) -> None:
    """Refuse what tiling does not do, before anything is written: --stream."""
    if video is not None and video.streams:
        raise SegdeployError("--tile", "tiles images; run --stream without it")


def images_only(items: Iterable, failure: type) -> Iterator:
    """The planned items, each video clip turned into `failure(path, reason)` (`failure`:
    infer's Failure class): clips are segmented frame by frame, without --tile."""
    from segdeploy.runtime.video import is_video_name

    for item in items:
        if not isinstance(item, failure) and is_video_name(item.path):
            yield failure(
                str(item.path), "a video clip: --tile segments images; run clips without it"
            )
        else:
            yield item


def outputs(
    label: Path, overlay: Path | None, height: int, width: int, tags: dict
) -> tuple[Path, Path | None]:
    """The label map's path (PNG, or TIFF for a large or georeferenced image) and the
    overlay's (JPEG, or TIFF likewise), for the planned PNG `label` and JPEG `overlay`."""
    if not large_image.wants_tiff(height, width, tags):
        return label, overlay
    return large_image.tiff_name(label), None if overlay is None else large_image.tiff_name(overlay)


def planned_outputs(source: Path, label: Path, overlay: Path | None) -> tuple[Path, Path | None]:
    """`outputs` from the header of the image at `source` alone (infer's check_plan); an
    image whose header cannot be read keeps the PNG names (it will fail, writing nothing)."""
    found = large_image.peek(source)
    return (label, overlay) if found is None else outputs(label, overlay, *found)


@dataclass(frozen=True)
class _How:
    """What every image of a run is segmented and written with."""

    seg: Any  # the Segmenter
    plan: TilePlan
    output: Path
    palette: np.ndarray | None  # set: write overlays
    skip_existing: bool
    overwrite: bool
    stop: Callable[[], bool] | None

    def mark(self, path: Path, size: tuple[int, int]) -> Mark:
        """The provenance mark of the output at `path`, for a label map of `size`."""
        return Mark(rel_name(path, self.output), self.seg.fingerprint, (int(size[0]), int(size[1])))


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
    overwrite: bool = False,
) -> pipeline.Outcome:
    """Segment every Job of `entries` tiled, in order; `record` gets each record (a dict
    entry is a ready record, passed on). Returns the run's Outcome, as pipeline.run.
    `overwrite`: replace files at output paths that segdeploy did not write (infer's
    check_plan refused them before the run unless it was given)."""
    outcome = pipeline.Outcome(workers=0)
    palette = palette_for(seg.num_labels) if overlay else None
    how = _How(seg, plan, Path(output), palette, skip_existing, overwrite, stop)
    try:
        for entry in entries:
            if stop is not None and stop():
                raise KeyboardInterrupt
            if isinstance(entry, dict):
                record(entry)
                continue
            record(_one(entry, how, outcome))
    except KeyboardInterrupt:
        outcome.interrupted = True
        log.warning("interrupted: the image being segmented is not written")
    except pipeline.Stop as reason:
        outcome.stopped = reason.fatal
        log.error("%s; stopping the run", reason)
    return outcome


def _one(job, how: _How, outcome) -> dict:
    """One image: its record (skipped, written, or a failure record for a bad file, an
    output it may not replace, or a model that cannot run its windows)."""
    seg = how.seg
    try:
        with large_image.open_source(job.path, max_pixels=seg.max_pixels, load=seg.load) as src:
            dest, over = outputs(job.label, job.overlay, src.height, src.width, src.tags)
            if how.skip_existing:
                rec = _existing(job, src, dest, over, how)
                if rec is not None:
                    return rec
            _check_outputs(job.path, how, dest, over)
            return _segment(job, src, dest, over, how, outcome)
    except SegdeployError as err:
        return {"input": str(job.path), "reason": err.problem}
    except OSError as err:
        fatal = pipeline.fatal_error(err, err.filename or job.label)
        if fatal is not None:
            raise pipeline.Stop(fatal) from None
        return {"input": str(job.path), "reason": f"cannot write outputs: {err}"}
    except MemoryError:
        return {"input": str(job.path), "reason": "out of memory segmenting this image"}


def _existing(job, src, dest: Path, over: Path | None, how: _How) -> dict | None:
    """--skip-existing: the record of an image whose outputs this model wrote for an image
    of this size (each output's mark, as infer's existing_record), else None."""
    size = (src.height, src.width)
    for path in (dest, over):
        if path is None:
            continue
        mark = owned(path, rel_name(path, how.output))
        if mark is None or mark.model != how.seg.fingerprint or tuple(mark.size) != size:
            return None
    try:
        counts = _label_counts(dest, how.seg.num_labels)
    except Exception:  # marked and unchanged, yet unreadable: redo it
        return None
    rec = _record(job, size, dest, over, how, counts)
    rec["skipped"] = True
    return rec


def _label_counts(path: Path, num_labels: int) -> np.ndarray:
    """Pixels of each class in a label map written here, a band at a time for a TIFF."""
    counts = np.zeros(num_labels, np.int64)
    if not large_image.is_tiff(path):
        labels = large_image.read_labels(path)
        return counts + np.bincount(labels.ravel(), minlength=num_labels)[:num_labels]
    with large_image.TiffSource.open(path, max_pixels=None) as written:
        for y0 in range(0, written.height, OVERLAY_ROWS):
            ids = written.samples(y0, min(y0 + OVERLAY_ROWS, written.height))[..., 0]
            counts += np.bincount(ids.ravel(), minlength=num_labels)[:num_labels]
    return counts


def _check_outputs(source: Path, how: _How, *paths: Path | None) -> None:
    """An output path that holds the input itself (a hard link, a TIFF named like an
    output), a folder, or (without --overwrite) a file segdeploy did not write is refused:
    writing it would replace something of the user's. check_plan refused them before the
    run; this catches what changed since."""
    for path in paths:
        if path is None:
            continue
        there = occupant(path, rel_name(path, how.output))
        if there is None:
            continue
        if there == "folder":
            raise SegdeployError(path, "is a folder where this run writes a file")
        if _same_file(path, source):
            raise SegdeployError(path, "is the input image itself: choose another -o/--output")
        if there != "ours" and not how.overwrite:
            raise SegdeployError(
                path,
                "holds a file segdeploy did not write (or one changed since): move it, or "
                "pass --overwrite",
            )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _guarded(model: WindowModel) -> WindowModel:
    """`model` whose failure on a batch of windows (onnxruntime raises plain Exceptions) is
    this image's SegdeployError: the run goes on with the next image."""

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return model.run(x)
        except Exception as err:
            log.debug("the model failed on a batch of windows", exc_info=True)
            shape = "x".join(str(d) for d in x.shape[1:])
            raise SegdeployError(
                None,
                f"the model cannot run this image's windows ({shape} input): {first_line(err)}",
            ) from None

    return WindowModel(model.prepare, run, model.num_classes)


def _segment(job, src, dest: Path, over: Path | None, how: _How, outcome) -> dict:
    """Predict, write the label map (and overlay), and return the image's record."""
    seg = how.seg
    wall = time.perf_counter()
    stages: dict[str, float] = {}
    counts = np.zeros(seg.num_labels, np.int64)
    model = _guarded(segmenter_model(seg))
    bands = _counted(
        predict_bands(src, model, how.plan, seg.window_batch_size, stages), counts, how
    )
    shape = (src.height, src.width)
    if dest.suffix == ".tif":
        large_image.write_tiff(dest, bands, shape, seg.label_dtype, src.tags, how.mark(dest, shape))
        labels = None
    else:
        labels = np.empty(shape, seg.label_dtype)
        for y0, band in bands:
            labels[y0 : y0 + len(band)] = band
        pipeline.save_labels(dest, labels, mark=how.mark(dest, shape))
    t_written = time.perf_counter()
    if over is not None:
        _write_overlay(over, src, labels, dest, how)
    total = time.perf_counter() - wall
    model_s = stages.get("model", 0.0)
    host = {"decode": stages.get("decode", 0.0), "preprocess": stages.get("preprocess", 0.0)}
    # Windows are cut and blended on predict_bands' helper thread, beside the model.
    main_thread = stages.get("model", 0.0) + stages.get("wait", 0.0)
    finished = {
        "upsample_argmax": stages.get("blend", 0.0),
        "png_encode": max(0.0, t_written - wall - main_thread),  # writing, PNG or TIFF
    }
    if over is not None:
        finished["overlay"] = time.perf_counter() - t_written
    outcome.model_s += model_s
    outcome.add(host, model_s, finished)
    rec = _record(job, shape, dest, over, how, counts)
    times = {"decode": host["decode"], "model": model_s, "postprocess": total - model_s}
    rec["time_s"] = {k: round(v, 6) for k, v in times.items()}
    rec["time_s"]["total"] = round(total, 6)
    return rec


def _counted(bands, counts: np.ndarray, how: _How) -> Iterator[tuple[int, np.ndarray]]:
    """The bands, passed on; class pixel counts added up; a stop signal raised between."""
    for y0, band in bands:
        if how.stop is not None and how.stop():
            raise KeyboardInterrupt
        counts += np.bincount(band.ravel(), minlength=len(counts))[: len(counts)]
        yield y0, band


def _write_overlay(path: Path, src, labels, label_file: Path, how: _How) -> None:
    """The image blended with the class colours: a JPEG of a small image, or for a large
    one a tiled TIFF made band by band from the label TIFF just written; marked."""
    shape = (src.height, src.width)
    if labels is not None:
        jpeg = io.BytesIO()
        blend_overlay(src.rows(0, src.height), labels, how.palette).save(
            jpeg, format="JPEG", quality=90
        )
        write_bytes(path, mark_jpeg(jpeg.getvalue(), how.mark(path, shape)))
        return
    with large_image.TiffSource.open(label_file, max_pixels=None) as written:

        def bands():
            for y0 in range(0, src.height, OVERLAY_ROWS):
                y1 = min(y0 + OVERLAY_ROWS, src.height)
                ids = written.samples(y0, y1)[..., 0]
                yield y0, np.asarray(blend_overlay(src.rows(y0, y1), ids, how.palette))

        large_image.write_tiff(
            path, bands(), (*shape, 3), np.uint8, src.tags, how.mark(path, shape)
        )


def _record(job, size, dest: Path, over: Path | None, how: _How, counts) -> dict[str, Any]:
    """summary.json's record of one tiled image: pipeline.image_record's keys, and the
    tiling (tile, stride, blend, windows)."""
    pixels = max(int(counts.sum()), 1)
    present = sorted(((int(i), int(n)) for i, n in enumerate(counts) if n), key=lambda t: -t[1])
    id2label = how.seg.id2label
    rec: dict[str, Any] = {
        "input": str(job.path),
        "output": str(dest.relative_to(how.output)),
        "size": [int(size[0]), int(size[1])],
        "classes": [
            {"id": i, "name": id2label.get(i, str(i)), "share": round(n / pixels, 6)}
            for i, n in present
        ],
    }
    if over is not None:
        rec["overlay"] = str(over.relative_to(how.output))
    rec["tiles"] = {**how.plan.to_json(), "windows": len(how.plan.grid(*size))}
    return rec
