"""`segdeploy infer`: segment files, folders and globs with ONNX Runtime, torch-free.

Three stages overlap: worker threads decode and preprocess images, the calling
thread runs the model batch by batch, and worker threads upsample, write the
label PNGs (and overlays) and measure the classes. Every queue between them is
bounded and the input list is streamed, so memory does not grow with the
number of images. Per-image records go to a temporary JSON-lines file and are
streamed into `summary.json` at the end.

Output layout (OUTPUT defaults to ./segdeploy-out): a folder input `photos/`
is mirrored as OUTPUT/photos/<same sub-folders>/<stem>.png; a file input
`a.jpg` gives OUTPUT/a.png; a glob `'photos/**/*.jpg'` is mirrored from its
folder part, like a folder. Overlays are <stem>_overlay.jpg beside the labels.
When a folder holds two images with the same stem (x.jpg, x.png) both keep
their extension (x.jpg.png, x.png.png) so that neither overwrites the other.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.atomic import TMP_MARKER, atomic_path
from segdeploy.errors import SegdeployError
from segdeploy.runtime.image_io import MAX_PIXELS, is_image_name
from segdeploy.runtime.palette import overlay as blend_overlay
from segdeploy.runtime.palette import palette_for

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "segdeploy-out"
SUMMARY_NAME = "summary.json"
OVERLAY_SUFFIX = "_overlay.jpg"


@dataclass(frozen=True)
class Item:
    """An image to segment and where its outputs go (relative to OUTPUT, no suffix)."""

    path: Path
    out: PurePath


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str


# -- finding inputs --------------------------------------------------------------------


def _top_name(path: Path) -> str:
    name = path.name or path.resolve().name
    return name or "root"


def iter_inputs(
    inputs: Sequence[str | os.PathLike], *, exclude: Path | None = None, counts: dict | None = None
) -> Iterator[Item | Failure]:
    """Items (and failures: missing paths, unreadable folders, empty globs) in a stable order.

    Streams: folders are listed one at a time, globs are expanded lazily.
    `exclude` (the output folder) is never descended into, so outputs written
    inside an input folder are not segmented again. `counts["ignored"]` counts
    files in folders that are not images by extension.
    """
    counts = counts if counts is not None else {}
    counts.setdefault("ignored", 0)
    exclude = exclude.resolve() if exclude is not None else None
    for arg in inputs:
        text = os.fspath(arg)
        path = Path(text)
        if glob.has_magic(text) and not path.exists():
            base = _glob_base(text)
            found = False
            for match in glob.iglob(text, recursive=True):
                found = True
                m = Path(match)
                rel = (
                    PurePath(_top_name(base)) / m.relative_to(base)
                    if base != Path(".")
                    else PurePath(m)
                )
                if m.is_dir():
                    yield from _walk(m, rel, exclude, counts)
                elif is_image_name(m):
                    yield Item(m, rel.with_name(m.stem))
                else:
                    counts["ignored"] += 1
            if not found:
                yield Failure(text, "no file matches this pattern")
        elif path.is_dir():
            yield from _walk(path, PurePath(_top_name(path)), exclude, counts)
        elif path.is_file():
            yield Item(path, PurePath(path.stem))
        elif path.exists():
            yield Failure(text, "not a regular file or folder")
        else:
            yield Failure(text, "no such file or folder")


def _glob_base(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _walk(
    folder: Path, rel: PurePath, exclude: Path | None, counts: dict
) -> Iterator[Item | Failure]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as err:
        yield Failure(str(folder), f"cannot read folder: {err.strerror or err}")
        return
    files, dirs = [], []
    for e in entries:
        if e.name.startswith("."):  # hidden files, and our own temporary files
            continue
        try:
            if e.is_dir():
                dirs.append(e)
            elif e.is_file():
                if is_image_name(e.name):
                    files.append(e)
                else:
                    counts["ignored"] += 1
        except OSError as err:
            yield Failure(e.path, f"cannot read: {err.strerror or err}")
    stems = collections.Counter(Path(e.name).stem for e in files)
    for e in files:
        stem = Path(e.name).stem
        yield Item(Path(e.path), rel / (stem if stems[stem] == 1 else e.name))
    for e in dirs:
        sub = Path(e.path)
        if exclude is not None and sub.resolve() == exclude:
            continue
        yield from _walk(sub, rel / e.name, exclude, counts)


def check_top_names(inputs: Sequence[str | os.PathLike]) -> None:
    """Two inputs that would write to the same output folder or file are a usage error."""
    seen: dict[str, str] = {}
    for arg in inputs:
        text = os.fspath(arg)
        path = Path(text)
        if glob.has_magic(text) and not path.exists():
            key = _top_name(_glob_base(text))
        elif path.is_file():
            key = path.stem
        else:
            key = _top_name(path)
        if key in seen and Path(seen[key]).resolve() != path.resolve():
            raise SegdeployError(
                text, f"would write to the same outputs as {seen[key]} ({key}); run them separately"
            )
        seen.setdefault(key, text)


# -- outputs ---------------------------------------------------------------------------


def label_path(output: Path, item: Item) -> Path:
    return output / item.out.with_name(item.out.name + ".png")


def overlay_path(output: Path, item: Item) -> Path:
    return output / item.out.with_name(item.out.name + OVERLAY_SUFFIX)


def save_labels(path: Path, labels: np.ndarray) -> None:
    """8-bit PNG when ids fit, else 16-bit; atomically."""
    if labels.dtype == np.uint8:
        im = Image.fromarray(labels, mode="L")
    elif labels.max(initial=0) < 1 << 16:
        im = Image.fromarray(labels.astype(np.uint16))  # mode I;16: a 16-bit PNG
    else:
        raise SegdeployError(path, "more than 65536 classes do not fit a PNG")
    with atomic_path(path) as tmp:
        # Level 1: label maps are flat, so they compress well even at the fastest setting.
        im.save(tmp, format="PNG", compress_level=1)


def class_shares(labels: np.ndarray, id2label: dict[int, str]) -> list[dict[str, Any]]:
    counts = np.bincount(labels.ravel(), minlength=len(id2label))
    total = max(int(labels.size), 1)
    present = [(int(i), int(n)) for i, n in enumerate(counts) if n]
    present.sort(key=lambda t: -t[1])
    return [
        {"id": i, "name": id2label.get(i, str(i)), "share": round(n / total, 6)} for i, n in present
    ]


def _existing_record(output: Path, item: Item, overlay: bool, id2label: dict[int, str]):
    """Record for an image whose outputs are already there, or None if it must be redone."""
    label = label_path(output, item)
    if not label.is_file() or (overlay and not overlay_path(output, item).is_file()):
        return None
    try:
        with Image.open(label) as im:
            labels = np.asarray(im)
    except (OSError, ValueError, SyntaxError):
        return None  # not a label map we wrote (atomic writes never leave half a file)
    return {
        "input": str(item.path),
        "output": str(label.relative_to(output)),
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "classes": class_shares(labels, id2label),
        "skipped": True,
    }


class _Records:
    """Per-image records, streamed to a hidden JSON-lines file, then into summary.json."""

    def __init__(self, output: Path):
        self.path = output / f".summary{TMP_MARKER}{os.getpid()}.jsonl"
        self._f = self.path.open("w", encoding="utf-8")
        self.done = self.skipped = self.failed = 0
        self.model_s = 0.0

    def add(self, rec: dict[str, Any]) -> None:
        if "reason" in rec:
            self.failed += 1
        elif rec.get("skipped"):
            self.skipped += 1
        else:
            self.done += 1
        self._f.write(json.dumps(rec) + "\n")

    def write_summary(self, dest: Path, header: dict[str, Any], totals: dict[str, Any]) -> None:
        self._f.flush()
        with atomic_path(dest) as tmp, tmp.open("w", encoding="utf-8") as out:
            out.write("{\n")
            for key, value in header.items():
                out.write(f"  {json.dumps(key)}: {json.dumps(value)},\n")
            for key, failures in (("images", False), ("failures", True)):
                out.write(f'  "{key}": [')
                first = True
                with self.path.open(encoding="utf-8") as f:
                    for line in f:
                        if ("reason" in json.loads(line)) is failures:
                            out.write(("\n    " if first else ",\n    ") + line.rstrip("\n"))
                            first = False
                out.write("\n  ],\n" if not first else "],\n")
            out.write(f'  "totals": {json.dumps(totals)}\n}}\n')

    def close(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)


def summary_header(seg, provider: str, interrupted: bool) -> dict[str, Any]:
    """summary.json's header; every engine writes the same keys (`seg`: a Segmenter)."""
    return {
        "model": str(seg.onnx_path),
        "variant": seg.variant,
        "provider": provider,
        "num_labels": seg.num_labels,
        "id2label": {str(k): v for k, v in seg.id2label.items()},
        "batch_size": seg.batch_size,
        "interrupted": interrupted,
    }


def summary_totals(records: _Records, ignored: int, wall: float) -> dict[str, Any]:
    """summary.json's totals from the records of a run that took `wall` seconds."""
    return {
        "images": records.done,
        "skipped": records.skipped,
        "failed": records.failed,
        "ignored_non_images": ignored,
        "seconds": round(wall, 3),
        "images_per_s": round(records.done / wall, 3) if wall > 0 else None,
        "model_seconds": round(records.model_s, 3),
        "model_images_per_s": round(records.done / records.model_s, 3)
        if records.model_s > 0
        else None,
    }


# -- the pipeline ----------------------------------------------------------------------


def _decode(seg, item: Item):
    t = time.perf_counter()
    try:
        image = seg.load(item.path)
        x = seg.prepare(image)
    except SegdeployError as err:
        return Failure(str(item.path), err.problem)
    except (OSError, ValueError, MemoryError) as err:  # Pillow's resize on odd data, memory
        return Failure(str(item.path), f"cannot preprocess: {type(err).__name__}: {err}")
    return image, x, time.perf_counter() - t


def _write(seg, output: Path, item: Item, pending, image, overlay: bool, palette, times: dict):
    t = time.perf_counter()
    try:
        labels = pending()
        label = label_path(output, item)
        save_labels(label, labels)
        rec: dict[str, Any] = {
            "input": str(item.path),
            "output": str(label.relative_to(output)),
            "size": [int(labels.shape[0]), int(labels.shape[1])],
            "classes": class_shares(labels, seg.id2label),
        }
        if overlay:
            ov = overlay_path(output, item)
            with atomic_path(ov) as tmp:
                blend_overlay(image, labels, palette).save(tmp, format="JPEG", quality=90)
            rec["overlay"] = str(ov.relative_to(output))
    except (SegdeployError, OSError, ValueError) as err:
        return {"input": str(item.path), "reason": f"cannot write outputs: {err}"}
    times["postprocess"] = time.perf_counter() - t
    rec["time_s"] = {k: round(v, 6) for k, v in times.items()}
    rec["time_s"]["total"] = round(sum(times.values()), 6)
    return rec


def run_infer(
    inputs: Sequence[str | os.PathLike],
    model_dir: str | os.PathLike,
    output: str | os.PathLike = DEFAULT_OUTPUT,
    *,
    provider: str = "auto",
    variant: str = "fp32",
    fallback: bool = False,
    batch_size: int | None = None,
    threads: int | None = None,
    workers: int | None = None,
    trt_cache: str | os.PathLike | None = None,
    fp16: bool = False,
    overlay: bool = False,
    skip_existing: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    progress: bool | None = None,
    segmenter=None,
) -> dict[str, Any]:
    """Segment every image in `inputs`; write labels, overlays and summary.json under `output`.

    Returns the summary's header and totals (the per-image records are in the
    file). Per-image problems are logged and recorded, never raised; a missing
    model, provider or bad option raises SegdeployError before anything is
    written. Ctrl-C stops after the images in flight, writes summary.json with
    "interrupted": true and re-raises KeyboardInterrupt.
    """
    from tqdm import tqdm

    from segdeploy.runtime.segmenter import Segmenter

    if not inputs:
        raise SegdeployError("INPUT", "give at least one file, folder or glob")
    check_top_names(inputs)
    if workers is not None and workers < 1:
        raise SegdeployError("--workers", f"must be at least 1, got {workers}")
    seg = segmenter or Segmenter(
        model_dir,
        provider,
        variant,
        fallback=fallback,
        threads=threads,
        trt_cache=trt_cache,
        fp16=fp16,
        batch_size=batch_size,
        max_pixels=max_pixels,
    )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise SegdeployError(out, "--output exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or min(4, os.cpu_count() or 1)
    palette = palette_for(seg.num_labels) if overlay else None
    if progress is None:
        progress = sys.stderr.isatty()
    total = sum(1 for _ in iter_inputs(inputs, exclude=out)) if progress else None
    window = seg.batch_size + 2 * workers  # images in flight per stage: bounds memory

    counts: dict[str, int] = {"ignored": 0}
    records = _Records(out)
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
    decoding: collections.deque[tuple[Item, Future]] = collections.deque()
    writing: collections.deque[Future] = collections.deque()
    batch: list[tuple[Item, Any, np.ndarray, float]] = []
    interrupted = False
    start = time.perf_counter()

    def record(rec: dict[str, Any]) -> None:
        if "reason" in rec:
            log.error("%s: %s", rec["input"], rec["reason"])
        records.add(rec)
        bar.update(1)

    def collect_written(limit: int) -> None:
        while len(writing) > limit:
            record(writing.popleft().result())

    def run_batch() -> None:
        if not batch:
            return
        t = time.perf_counter()
        pendings = seg.forward([b[2] for b in batch], [(b[1].height, b[1].width) for b in batch])
        model_s = time.perf_counter() - t
        records.model_s += model_s
        for (item, image, _, decode_s), pending in zip(batch, pendings, strict=True):
            times = {"decode": decode_s, "model": model_s / len(batch)}
            writing.append(
                writers.submit(
                    _write,
                    seg,
                    out,
                    item,
                    pending,
                    image if overlay else None,
                    overlay,
                    palette,
                    times,
                )
            )
        batch.clear()
        collect_written(window)

    def collect_decoded(limit: int) -> None:
        while len(decoding) > limit:
            item, fut = decoding.popleft()
            res = fut.result()
            if isinstance(res, Failure):
                record({"input": res.path, "reason": res.reason})
                continue
            image, x, decode_s = res
            batch.append((item, image, x, decode_s))
            if len(batch) >= seg.batch_size:
                run_batch()

    decoders = ThreadPoolExecutor(workers, thread_name_prefix="segdeploy-decode")
    writers = ThreadPoolExecutor(workers, thread_name_prefix="segdeploy-write")
    try:
        for item in iter_inputs(inputs, exclude=out, counts=counts):
            if isinstance(item, Failure):
                record({"input": item.path, "reason": item.reason})
                continue
            if skip_existing:
                rec = _existing_record(out, item, overlay, seg.id2label)
                if rec is not None:
                    record(rec)
                    continue
            decoding.append((item, decoders.submit(_decode, seg, item)))
            collect_decoded(window)
        collect_decoded(0)
        run_batch()
        collect_written(0)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: finishing the images being written, then stopping")
    finally:
        # Queued decodes are dropped; masks the model has already computed are still
        # written (cheap, and saves the model time on resume). Every file is written
        # atomically, so whatever the moment of the interruption, no partial file stays.
        decoders.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)
        if interrupted:
            for fut in writing:
                with contextlib.suppress(BaseException):
                    record(fut.result())
        bar.close()
        wall = time.perf_counter() - start
        header = summary_header(seg, seg.provider, interrupted)
        totals = summary_totals(records, counts["ignored"], wall)
        try:
            records.write_summary(out / SUMMARY_NAME, header, totals)
        finally:
            records.close()
    if interrupted:
        raise KeyboardInterrupt
    return {**header, "totals": totals, "summary": str(out / SUMMARY_NAME)}
