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

Safety rules (`Planner`, `check_plan`): every output name of a run is unique
(a name still taken, e.g. by a file literally named x.png.png, gets -2, -3...
in listing order, with a warning); outputs are built from normalised relative
paths and must resolve inside OUTPUT; no output may be, or resolve to, an input
file; an input named inside OUTPUT is refused; each folder is listed and each
file segmented once per run. The run is planned in full before the first write,
so a refusal (SegdeployError, exit status 2) comes before anything is written.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.atomic import TMP_MARKER, atomic_path, remove_stale_temporaries
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
    Nothing inside `exclude` (the output folder) found by walking a folder or
    matching a glob is read, so earlier outputs are not segmented again (inputs
    named inside it are refused by `plan_items`). A folder is listed once per
    call even when symlinks lead to it again (loops end). Output names are
    relative and normalised: never absolute, never `..`. `counts["ignored"]`
    counts files in folders that are not images by extension. `plan_items`
    adds the per-run checks (unique names, each file once, outputs inside OUT).
    """
    counts = counts if counts is not None else {}
    counts.setdefault("ignored", 0)
    exclude = Path(os.path.realpath(exclude)) if exclude is not None else None
    listed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders already listed
    for arg in inputs:
        text = os.fspath(arg)
        path = Path(text)
        if glob.has_magic(text) and not path.exists():
            base = _glob_base(text)
            found = False
            for match in _iglob(text):
                found = True
                m = Path(match)
                if _inside_real(m, exclude):
                    continue  # an earlier run's outputs
                rel = _glob_rel(base, m)
                if os.pardir in m.parts:  # name it plainly in summary.json and messages
                    m = Path(os.path.realpath(m))
                if m.is_dir():
                    yield from _walk(m, rel, exclude, counts, listed)
                elif is_image_name(m):
                    yield Item(m, rel.with_name(m.stem))
                else:
                    counts["ignored"] += 1
            if not found:
                yield Failure(text, "no file matches this pattern")
        elif path.is_dir():
            yield from _walk(path, PurePath(_top_name(path)), exclude, counts, listed)
        elif path.is_file():
            yield Item(path, PurePath(path.stem))
        elif path.exists():
            yield Failure(text, "not a regular file or folder")
        else:
            yield Failure(text, "no such file or folder")


def _iglob(pattern: str) -> Iterator[str | Path]:
    """Matches of `pattern`; `**` spans sub-folders without following symlinks to folders.

    glob.iglob follows them under `**`, so one `ln -s .. loop/sub/up` makes it
    run for ever; pathlib's `**` does not (its documented behaviour), so
    patterns with `**` go through pathlib. Its `*` also matches hidden names,
    which glob's does not: those are dropped to keep one rule for both.
    """
    if "**" not in Path(pattern).parts:
        yield from glob.iglob(pattern, recursive=True)
        return
    path = Path(pattern)
    root = Path(path.anchor) if path.is_absolute() else Path(".")
    base = _glob_base(pattern)
    for match in root.glob(str(path.relative_to(root)) if path.is_absolute() else pattern):
        below = match.parts[len(base.parts) :] if base != Path(".") else match.parts
        if not any(p.startswith(".") and p not in (".", "..") for p in below):
            yield match


def _glob_base(pattern: str) -> Path:
    parts = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _glob_rel(base: Path, match: Path) -> PurePath:
    """Where a glob match goes under OUT: its path below the pattern's folder part, normalised.

    `..` after a wildcard ('*/../../*.png') can reach above that folder; those
    `..` are dropped, so the output stays inside OUT (its name only says where
    in the tree it was found).
    """
    rel = os.path.relpath(os.path.normpath(match), os.path.normpath(base))
    parts = [p for p in PurePath(rel).parts if p not in ("..", ".")] or [match.name]
    top = [] if base == Path(".") else [_top_name(base)]
    return PurePath(*top, *parts)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _inside_real(path: Path, folder: Path | None) -> bool:
    return folder is not None and _inside(Path(os.path.realpath(path)), folder)


def _walk(
    folder: Path, rel: PurePath, exclude: Path | None, counts: dict, listed: set
) -> Iterator[Item | Failure]:
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in listed:
            return  # reached again through a symlink: listed once, so loops end
        listed.add((st.st_dev, st.st_ino))
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
            if e.is_symlink() and _inside_real(Path(e.path), exclude):
                continue  # a link into the output folder
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
        if _inside_real(sub, exclude):
            continue
        yield from _walk(sub, rel / e.name, exclude, counts, listed)


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


def check_inputs_outside(inputs: Sequence[str | os.PathLike], output: Path) -> None:
    """An input named inside the output folder is refused: OUT is never read, and
    writing there could replace the input (`-o . photos`, `-o . a.png`, `-o par par/in`)."""
    out_real = Path(os.path.realpath(output))
    for arg in inputs:
        text = os.fspath(arg)
        root = _glob_base(text) if glob.has_magic(text) and not Path(text).exists() else text
        if _inside_real(Path(root), out_real):
            raise SegdeployError(
                text,
                f"is inside the output folder {output}, which is never read as input and "
                "where outputs could replace your files: choose another -o/--output, outside "
                "the inputs",
            )


class Planner:
    """Plans one run: every (input, output name) pair, with the checks that keep user files safe.

    - each input file is segmented once per run, however often it is reached
      (symlinks, hard links, overlapping inputs): (st_dev, st_ino) of inputs;
    - every output name is unique in the run: a name already taken (x.png,
      x.jpg and x.png.png in one folder) gets `-2`, `-3`... in the order the
      inputs are found, with a warning, and summary.json records the name used;
    - every output folder resolves (realpath) inside OUT, else SegdeployError.

    State per run: one set of output names and one of input (dev, inode)
    pairs, small per item; the listing itself streams. With `clean`, the
    tool's stale temporaries are removed from each output folder the first
    time the run meets it.
    """

    def __init__(self, output: str | os.PathLike, *, clean: bool = False):
        self.output = Path(output)
        self.out_real = Path(os.path.realpath(output))
        self.clean = clean
        # Compact per-item state, so that planning a million files stays in tens of MB:
        # inputs as one int (device, inode); output names as their hash (a false match
        # only renames one more output, it can never make two outputs share a name).
        self.inputs: set[int] = set()
        self.duplicates = 0
        self._names: set[int] = set()
        self._folders: set[PurePath] = set()

    def items(
        self, inputs: Sequence[str | os.PathLike], counts: dict | None = None
    ) -> Iterator[Item | Failure]:
        check_inputs_outside(inputs, self.output)
        for item in iter_inputs(inputs, exclude=self.out_real, counts=counts):
            if isinstance(item, Failure):
                yield item
                continue
            key = _file_key(item.path)
            if key is not None:  # unreadable: the decoder reports it
                if key in self.inputs:
                    self.duplicates += 1
                    continue
                self.inputs.add(key)
            item = Item(item.path, self._unique(item))
            self._check_folder(item.out.parent)
            yield item

    def _unique(self, item: Item) -> PurePath:
        out, n = item.out, 1
        while hash(str(out)) in self._names:
            n += 1
            out = item.out.with_name(f"{item.out.name}-{n}")
        if n > 1:
            log.warning(
                "%s: output name %s.png is taken in this run; using %s.png",
                item.path,
                item.out,
                out,
            )
        self._names.add(hash(str(out)))
        return out

    def _check_folder(self, rel: PurePath) -> None:
        if rel in self._folders:
            return
        folder = self.output / rel
        if not _inside(Path(os.path.realpath(folder)), self.out_real):
            raise SegdeployError(
                folder, f"leads outside the output folder {self.output} (a symlink?); remove it"
            )
        if self.clean:
            remove_stale_temporaries(folder)
        self._folders.add(rel)


def _file_key(path: Path) -> int | None:
    """(st_dev, st_ino) packed in one int: the file's identity, through any links."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev << 64 | st.st_ino


def check_plan(inputs: Sequence[str | os.PathLike], output: str | os.PathLike) -> int:
    """Plan the whole run without writing; raise SegdeployError if it would harm a user file.

    A full listing before the first write: the only way to refuse, with exit
    status 2 and nothing written, an output that would replace any input of the
    run (found later in the listing, or a hard link). Returns the number of
    entries (for the progress bar). Costs one more listing and a stat per file.
    """
    planner = Planner(output)
    existing: dict[int, Path] = {}  # outputs already on disk -> their path
    # A new output folder holds no outputs yet, so none can be an input: two stats an
    # image saved (5% of a run on 64-px images).
    look = Path(output).exists()
    n = 0
    for item in planner.items(inputs):
        n += 1
        if look and isinstance(item, Item):
            for dest in (label_path(planner.out_real, item), overlay_path(planner.out_real, item)):
                key = _file_key(dest)
                if key is not None:
                    existing.setdefault(key, dest)
    for key, dest in existing.items():
        if key in planner.inputs:
            raise SegdeployError(
                dest,
                "is an input of this run and an output would replace it: choose another "
                "-o/--output, outside the inputs",
            )
    return n


def prepare_output(output: Path) -> None:
    """Create OUT and prove it writable with a real file, so OS trouble is one line, exit 2."""
    if output.exists() and not output.is_dir():
        raise SegdeployError(output, "--output exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=output, prefix=f".probe{TMP_MARKER}{os.getpid()}-", suffix=".tmp"
        ):
            pass
    except OSError as err:
        raise SegdeployError(
            output, f"cannot write the output folder: {err.strerror or err}"
        ) from None


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


def summary_header(seg, provider: str, interrupted: bool, stopped: str | None = None) -> dict:
    """summary.json's header; every engine writes the same keys (`seg`: a Segmenter)."""
    header = {
        "model": str(seg.onnx_path),
        "variant": seg.variant,
        "provider": provider,
        "num_labels": seg.num_labels,
        "id2label": {str(k): v for k, v in seg.id2label.items()},
        "batch_size": seg.batch_size,
        "interrupted": interrupted,
    }
    if stopped is not None:
        header["stopped"] = stopped
    return header


def summary_totals(records: _Records, ignored: int, wall: float, outcome) -> dict[str, Any]:
    """summary.json's totals of a run that took `wall` seconds (`outcome`: the engine's
    pipeline.Outcome: model time, workers, stage times); every engine writes the same keys."""
    model_s = outcome.model_s
    return {
        "images": records.done,
        "skipped": records.skipped,
        "failed": records.failed,
        "ignored_non_images": ignored,
        "seconds": round(wall, 3),
        "images_per_s": round(records.done / wall, 3) if wall > 0 else None,
        "model_seconds": round(model_s, 3),
        "model_images_per_s": round(records.done / model_s, 3) if model_s > 0 else None,
        "workers": outcome.workers,
        "stage_ms_per_image": outcome.stage_ms(),
        "bound_by": outcome.bound_by(),
    }


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
    ov_cache: str | os.PathLike | None = None,
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

    workers, threads = _check_run(inputs, workers, threads)
    if workers:
        pipeline.start_forkserver()  # boots while the model loads and the run is planned
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
        ov_cache=ov_cache,
    )
    out = Path(output)
    total = check_plan(inputs, out)  # refuses a run that would harm a user file: nothing written
    prepare_output(out)
    remove_stale_temporaries(out)  # a killed run's .summary.tmp-<pid>.jsonl
    planner = Planner(out, clean=True)
    cfg = pipeline.StageConfig.for_segmenter(seg, overlay=overlay)
    if progress is None:
        progress = sys.stderr.isatty()
    total = total if progress else None

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

    start = time.perf_counter()
    outcome = pipeline.Outcome(workers=workers)
    with pipeline.stop_signals() as signals:
        try:
            jobs = _jobs(planner.items(inputs, counts), out, overlay, skip_existing, seg.id2label)
            outcome = pipeline.run(
                jobs, seg, out, cfg=cfg, workers=workers, record=record, stop=signals
            )
        finally:
            bar.close()
            wall = time.perf_counter() - start
            stopped = outcome.stopped
            header = summary_header(
                seg,
                seg.provider,
                outcome.interrupted,
                None if stopped is None else f"{stopped.path}: {stopped.reason}",
            )
            totals = summary_totals(records, counts["ignored"], wall, outcome)
            summary_error = _write_summary(records, out / SUMMARY_NAME, header, totals)
    _raise_if_stopped(outcome, records.done, out / SUMMARY_NAME, summary_error)
    return {**header, "totals": totals, "summary": str(out / SUMMARY_NAME)}


def _check_run(
    inputs: Sequence[str | os.PathLike], workers: int | None, threads: int | None
) -> tuple[int, int]:
    """Refuse a run without inputs or with a bad worker count; (workers, threads) with the
    defaults (the cores of the process's affinity) filled in."""
    if not inputs:
        raise SegdeployError("INPUT", "give at least one file, folder or glob")
    check_top_names(inputs)
    if workers is not None and workers < 0:
        raise SegdeployError("--workers", f"must be 0 or more, got {workers}")
    workers = pipeline.default_workers() if workers is None else workers
    threads = pipeline.default_threads() if threads is None else threads
    return workers, threads


def _jobs(
    items: Iterator[Item | Failure], out: Path, overlay: bool, skip_existing: bool, id2label
) -> Iterator[pipeline.Job | dict[str, Any]]:
    """The planned items as the engine's work: a Job per image to segment, a record for a
    failure or (with --skip-existing) an image whose outputs are already complete."""
    for item in items:
        if isinstance(item, Failure):
            yield {"input": item.path, "reason": item.reason}
            continue
        if skip_existing:
            rec = _existing_record(out, item, overlay, id2label)
            if rec is not None:
                yield rec
                continue
        yield pipeline.Job(
            item.path, label_path(out, item), overlay_path(out, item) if overlay else None
        )


def _raise_if_stopped(outcome, done: int, summary: Path, summary_error: str | None) -> None:
    """After summary.json: a stopped run (disk full) exits 1 naming the path and what was
    done; Ctrl-C or SIGTERM is re-raised as KeyboardInterrupt."""
    if outcome.stopped is not None:
        where = f" (summary: {summary})" if summary_error is None else f"; {summary_error}"
        raise RunStopped(
            outcome.stopped.path,
            f"{outcome.stopped.reason}; the run stopped after {done} images{where}",
        )
    if summary_error is not None:
        raise RunStopped(summary, summary_error)
    if outcome.interrupted:
        raise KeyboardInterrupt


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
