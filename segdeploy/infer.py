"""`segdeploy infer`: segment files, folders and globs with ONNX Runtime, torch-free.

This module plans a run (inputs, output paths, --skip-existing, summary.json);
`segdeploy.runtime.pipeline` executes it: worker processes decode, preprocess,
upsample and write, the main process runs the model batch by batch, every
queue is bounded and the input list is streamed, so memory does not grow with
the number of images. Per-image records go to a temporary JSON-lines file and
are streamed into `summary.json` at the end.

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
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.atomic import TMP_MARKER, atomic_path
from segdeploy.errors import SegdeployError
from segdeploy.runtime import pipeline
from segdeploy.runtime.image_io import MAX_PIXELS, is_image_name
from segdeploy.runtime.pipeline import class_shares, save_labels  # noqa: F401 (public here too)

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
        self.broken = False  # a write failed: later records are dropped

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
        with contextlib.suppress(OSError):  # a full disk fails the last flush: removed anyway
            self._f.close()
        self.path.unlink(missing_ok=True)


# -- the run ---------------------------------------------------------------------------


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
    if workers is not None and workers < 0:
        raise SegdeployError("--workers", f"must be 0 or more, got {workers}")
    workers = pipeline.default_workers() if workers is None else workers
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
        spin=workers == 0,  # worker processes need the cores ONNX Runtime would spin on
    )
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise SegdeployError(out, "--output exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = pipeline.StageConfig.for_segmenter(seg, overlay=overlay)
    if progress is None:
        progress = sys.stderr.isatty()
    total = sum(1 for _ in iter_inputs(inputs, exclude=out)) if progress else None

    counts: dict[str, int] = {"ignored": 0}
    records = _Records(out)
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)

    def record(rec: dict[str, Any]) -> None:
        if "reason" in rec:
            log.error("%s: %s", rec["input"], rec["reason"])
        if records.broken:
            return  # the records file cannot grow (disk full): the run is stopping
        try:
            records.add(rec)
        except OSError as err:
            records.broken = True
            fatal = pipeline.fatal_error(err, records.path)
            if fatal is None:
                raise
            raise pipeline.Stop(fatal) from None
        bar.update(1)

    def entries() -> Iterator[pipeline.Job | dict[str, Any]]:
        for item in iter_inputs(inputs, exclude=out, counts=counts):
            if isinstance(item, Failure):
                yield {"input": item.path, "reason": item.reason}
                continue
            if skip_existing:
                rec = _existing_record(out, item, overlay, seg.id2label)
                if rec is not None:
                    yield rec
                    continue
            yield pipeline.Job(
                item.path, label_path(out, item), overlay_path(out, item) if overlay else None
            )

    start = time.perf_counter()
    outcome = pipeline.Outcome(workers=workers)
    with pipeline.stop_signals() as signals:
        try:
            outcome = pipeline.run(
                entries(), seg, out, cfg=cfg, workers=workers, record=record, stop=signals
            )
        finally:
            bar.close()
            wall = time.perf_counter() - start
            header = {
                "model": str(seg.onnx_path),
                "variant": seg.variant,
                "provider": seg.provider,
                "num_labels": seg.num_labels,
                "id2label": {str(k): v for k, v in seg.id2label.items()},
                "batch_size": seg.batch_size,
                "interrupted": outcome.interrupted,
            }
            if outcome.stopped is not None:
                header["stopped"] = f"{outcome.stopped.path}: {outcome.stopped.reason}"
            totals = {
                "images": records.done,
                "skipped": records.skipped,
                "failed": records.failed,
                "ignored_non_images": counts["ignored"],
                "seconds": round(wall, 3),
                "images_per_s": round(records.done / wall, 3) if wall > 0 else None,
                "model_seconds": round(outcome.model_s, 3),
                "model_images_per_s": round(records.done / outcome.model_s, 3)
                if outcome.model_s > 0
                else None,
                "workers": workers,
                "stage_ms_per_image": outcome.stage_ms(),
                "bound_by": outcome.bound_by(),
            }
            summary_error = _write_summary(records, out / SUMMARY_NAME, header, totals)
    if outcome.stopped is not None:
        raise RunStopped(
            outcome.stopped.path,
            f"{outcome.stopped.reason}; the run stopped after {records.done} images"
            + (
                f" (summary: {out / SUMMARY_NAME})"
                if summary_error is None
                else f"; {summary_error}"
            ),
        )
    if summary_error is not None:
        raise RunStopped(out / SUMMARY_NAME, summary_error)
    if outcome.interrupted:
        raise KeyboardInterrupt
    return {**header, "totals": totals, "summary": str(out / SUMMARY_NAME)}


class RunStopped(SegdeployError):
    """The run could not go on (disk full, read-only output): exit status 1, not 2,
    because it had started and its complete outputs are kept."""

    exit_code = 1


def _write_summary(records: _Records, dest: Path, header: dict, totals: dict) -> str | None:
    """Write summary.json; an OS error (a full disk) is returned as a message, not raised."""
    try:
        records.write_summary(dest, header, totals)
    except OSError as err:
        return f"cannot write {dest}: {err.strerror or err}"
    finally:
        records.close()
    return None
