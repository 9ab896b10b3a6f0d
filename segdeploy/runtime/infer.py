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

Safety rules (`Planner`, `check_plan`), all checked before the first write, so
that a refusal (SegdeployError, exit status 2) leaves everything as it was:

- every output path of a run is unique: a name still taken (a file literally
  named x.png.png; a folder `x.png/` beside x.jpg; a top folder named
  summary.json; a name of the tool's temporaries) gets -2, -3... in listing
  order, with a warning;
- outputs are built from normalised relative paths and must resolve inside
  OUTPUT, each output folder to a folder of its own;
- no output may be, or resolve to, an input file; an input named inside OUTPUT
  is refused; each folder is listed and each file segmented once per run;
- infer never replaces a file it did not write: a file at an output path must
  carry segdeploy's mark for that path (segdeploy.runtime.provenance), else the
  run stops naming it, unless `overwrite`; a folder there is always refused;
- an OUTPUT inside an input folder may hold only segdeploy's files (anything
  else would be left unsegmented and written among);
- a missing input, a glob that matches nothing, or inputs without a single
  image are refused (dangling symlinks and special files in folders are counted
  and said).
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

from segdeploy import __version__
from segdeploy.atomic import (
    NAME_MAX,
    TMP_MARKER,
    atomic_path,
    is_temporary_name,
    open_temporary,
    remove_stale_temporaries,
)
from segdeploy.errors import SegdeployError, first_line, shown
from segdeploy.runtime import pipeline, tiled_infer, tiles
from segdeploy.runtime.clips import Clips, VideoSettings
from segdeploy.runtime.image_io import MAX_PIXELS, file_kind, image_size, is_image_name
from segdeploy.runtime.pipeline import class_shares, save_labels  # noqa: F401 (public here too)
from segdeploy.runtime.provenance import foreign_files, occupant, owned, rel_name
from segdeploy.runtime.video import import_av, is_video_name

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "segdeploy-out"
SUMMARY_NAME = "summary.json"
OVERLAY_SUFFIX = "_overlay.jpg"
#: What a tiled run (--tile) may write instead, for a large or georeferenced image
#: (segdeploy.runtime.large_image.tiff_name): x.tif, x_overlay.tif.
TIFF_SUFFIXES = (".tif", "_overlay.tif")
#: summary.json's first key: how a later run knows the file is infer's own.
WRITTEN_BY = "segdeploy infer"


@dataclass(frozen=True)
class Item:
    """An image to segment and where its outputs go (relative to OUTPUT, no suffix)."""

    path: Path
    out: PurePath


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str
    given: bool = False  # about an INPUT as given (missing, no match): the run is refused


# -- finding inputs --------------------------------------------------------------------


def is_input_name(path: str | os.PathLike) -> bool:
    """A file infer reads from a folder or glob: a photo, or a clip (segdeploy.runtime.clips)."""
    return is_image_name(path) or is_video_name(path)


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
    named inside it are refused by `plan_items`; `counts["excluded"]` says the
    walk met it). A folder is listed once per call even when symlinks lead to it
    again (loops end). Output names are relative and normalised: never absolute,
    never `..`. `counts` also gets "ignored" (files that are not images by
    extension), "dangling" and "special" (dangling symlinks; FIFOs, devices,
    sockets: left out of folder walks and globs, with "left_out", the first
    one's path) and "empty" (the inputs that gave no image). `Planner` adds the
    per-run checks (unique names, each file once, outputs inside OUT).
    """
    counts = counts if counts is not None else {}
    for key in ("ignored", "dangling", "special"):
        counts.setdefault(key, 0)
    counts.setdefault("empty", [])
    exclude = Path(os.path.realpath(exclude)) if exclude is not None else None
    listed: set[tuple[int, int]] = set()  # (st_dev, st_ino) of folders already listed
    for arg in inputs:
        found = 0
        for entry in _iter_input(os.fspath(arg), exclude, counts, listed):
            found += isinstance(entry, Item)
            yield entry
        if not found:
            counts["empty"].append(os.fspath(arg))


def _iter_input(
    text: str, exclude: Path | None, counts: dict, listed: set
) -> Iterator[Item | Failure]:
    path = Path(text)
    if glob.has_magic(text) and not path.exists():
        base = _glob_base(text)
        found = False
        for match in _iglob(text):
            found = True
            m = Path(match)
            if _inside_real(m, exclude):
                counts["excluded"] = True
                continue  # an earlier run's outputs
            rel = _glob_rel(base, m)
            if os.pardir in m.parts:  # name it plainly in summary.json and messages
                m = Path(os.path.realpath(m))
            if m.is_dir():
                yield from _walk(m, rel, exclude, counts, listed)
            elif not is_input_name(m):
                counts["ignored"] += 1
            elif m.is_file():
                yield Item(m, rel.with_name(m.stem))
            else:
                _left_out(m, counts)
        if not found:
            yield Failure(text, "no file matches this pattern", given=True)
    elif path.is_dir():
        yield from _walk(path, PurePath(_top_name(path)), exclude, counts, listed)
    elif path.is_file():
        yield Item(path, PurePath(path.stem))
    elif path.is_symlink() and not path.exists():
        yield Failure(text, "dangling symlink (its target does not exist)", given=True)
    elif path.exists():
        kind = file_kind(path.stat().st_mode)
        yield Failure(text, f"not a regular file or folder ({kind})", given=True)
    else:
        yield Failure(text, "no such file or folder", given=True)


def _left_out(path: Path, counts: dict) -> None:
    """Count a folder entry that is neither a file nor a folder (said after listing)."""
    try:
        os.stat(path)
    except OSError:
        counts["dangling"] += 1
    else:
        counts["special"] += 1
    counts.setdefault("left_out", str(path))


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
                counts["excluded"] = True
                continue  # a link into the output folder
            if e.is_dir():
                dirs.append(e)
            elif not is_input_name(e.name):
                counts["ignored"] += 1
            elif e.is_file():
                files.append(e)
            else:
                _left_out(Path(e.path), counts)
        except OSError as err:
            yield Failure(e.path, f"cannot read: {err.strerror or err}")
    stems = collections.Counter(Path(e.name).stem for e in files)
    for e in files:
        stem = Path(e.name).stem
        yield Item(Path(e.path), rel / (stem if stems[stem] == 1 else e.name))
    for e in dirs:
        sub = Path(e.path)
        if _inside_real(sub, exclude):
            counts["excluded"] = True
            continue
        yield from _walk(sub, rel / e.name, exclude, counts, listed)


def _root_key(text: str) -> tuple[str, str]:
    """(top output name, real path of what is mirrored there) of one INPUT."""
    path = Path(text)
    if glob.has_magic(text) and not path.exists():
        base = _glob_base(text)
        return _top_name(base), os.path.realpath(base)
    if path.is_file():
        return path.stem, os.path.realpath(path)
    return _top_name(path), os.path.realpath(path)


def check_top_names(inputs: Sequence[str | os.PathLike]) -> None:
    """Two inputs that would write to the same output folder or file are a usage error;
    two that mirror one folder (`'d/*.jpg' 'd/*.png'`, `d 'd/**/*.png'`) are not."""
    seen: dict[str, tuple[str, str]] = {}
    for arg in inputs:
        text = os.fspath(arg)
        key, real = _root_key(text)
        if key in seen and seen[key][1] != real:
            raise SegdeployError(
                text,
                f"would write to the same outputs as {shown(seen[key][0])} ({shown(key)}); "
                "run them separately",
            )
        seen.setdefault(key, (text, real))


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
                f"is inside the output folder {shown(output)}, which is never read as input and "
                "where outputs could replace your files: choose another -o/--output, outside "
                "the inputs",
            )


class Planner:
    """Plans one run: every (input, output name) pair, with the checks that keep user files safe.

    - each input file is segmented once per run, however often it is reached
      (symlinks, hard links, overlapping inputs): (st_dev, st_ino) of inputs;
    - every output path is unique in the run, files and folders together: a
      name already taken (x.png, x.jpg and x.png.png in one folder; a folder
      `x.png/` beside x.jpg's label x.png; a top folder `summary.json`; a name of
      the tool's temporaries, which a later run would sweep) gets `-2`, `-3`... in
      the order the inputs are found, with a warning, and summary.json records
      the name used;
    - an output name longer than the file system allows is that image's failure;
    - every output folder resolves (realpath) inside OUT, to a folder (not a file)
      and to one of its own (two never share a real folder through a symlink),
      else SegdeployError.

    State per run: sets of output names and output folders, and of input
    (dev, inode) pairs, small per item; the listing itself streams. With
    `clean`, the tool's stale temporaries are removed from each output folder
    the first time the run meets it. `overlay`: the run writes overlays (their
    names must fit too). `tiff`: a tiled run, whose outputs may be TIFF (TIFF_SUFFIXES)
    as well.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        *,
        clean: bool = False,
        overlay: bool = False,
        tiff: bool = False,
    ):
        self.output = Path(output)
        self.out_real = Path(os.path.realpath(output))
        self.clean = clean
        self.overlay = overlay
        self.suffixes = (".png", OVERLAY_SUFFIX, *(TIFF_SUFFIXES if tiff else ()))
        # Compact per-item state, so that planning a million files stays in tens of MB:
        # inputs as one int (device, inode); output names as their hash (a false match
        # only renames one more output, it can never make two outputs share a name).
        self.inputs: set[int] = set()
        self.duplicates = 0
        self._names: set[int] = set()  # output stems (label: stem.png, overlay: stem_overlay.jpg)
        self._folders: dict[PurePath, PurePath] = {}  # folder as listed -> as planned
        self._planned_folders: set[int] = set()
        self._real_folders: dict[str, PurePath] = {}

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
            out = self._unique(item, self._folder(item.out.parent) / item.out.name)
            too_long = self._too_long(out)
            if too_long is not None:
                yield Failure(str(item.path), too_long)
                continue
            yield Item(item.path, out)

    def _unique(self, item: Item, out: PurePath) -> PurePath:
        base, n = out, 1
        while self._stem_taken(out):
            n += 1
            out = base.with_name(f"{base.name}-{n}")
        if n > 1:
            log.warning(
                "%s: output name %s.png is taken in this run; using %s.png",
                shown(item.path),
                shown(base),
                shown(out),
            )
        self._names.add(hash(str(out)))
        return out

    def _stem_taken(self, out: PurePath) -> bool:
        files = [out.name + suffix for suffix in self.suffixes]
        return (
            hash(str(out)) in self._names
            or any(hash(str(out.with_name(f))) in self._planned_folders for f in files)
            or any(is_temporary_name(f) for f in files)
        )

    def _file_taken(self, path: PurePath) -> bool:
        """Whether `path` is a label map or overlay this run plans."""
        for suffix in self.suffixes:
            if path.name.endswith(suffix) and len(path.name) > len(suffix):
                stem = path.with_name(path.name[: -len(suffix)])
                if hash(str(stem)) in self._names:
                    return True
        return False

    def _folder(self, rel: PurePath) -> PurePath:
        """Where the outputs of the listed folder `rel` go: `rel` itself, unless a planned
        file (or summary.json, or a temporary's name) holds that path: then `<name>-2`..."""
        planned = self._folders.get(rel)
        if planned is not None:
            return planned
        if rel == PurePath():
            planned = rel
        else:
            parent = self._folder(rel.parent)
            planned, n = parent / rel.name, 1
            while (
                self._file_taken(planned)
                or is_temporary_name(planned.name)
                or (parent == PurePath() and planned.name == SUMMARY_NAME)
            ):
                n += 1
                planned = parent / f"{rel.name}-{n}"
            if n > 1:
                log.warning(
                    "output folder %s/ would take the path of another output; using %s/",
                    shown(parent / rel.name),
                    shown(planned),
                )
        self._check_folder(planned)
        self._folders[rel] = planned
        self._planned_folders.add(hash(str(planned)))
        return planned

    def _check_folder(self, rel: PurePath) -> None:
        folder = self.output / rel
        real = os.path.realpath(folder)
        if not _inside(Path(real), self.out_real):
            raise SegdeployError(
                folder,
                f"leads outside the output folder {shown(self.output)} (a symlink?); remove it",
            )
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise SegdeployError(
                folder,
                "is a file where this run puts a folder of outputs: move it, or choose "
                "another -o/--output",
            )
        other = self._real_folders.setdefault(real, rel)
        if other != rel:
            raise SegdeployError(
                folder,
                f"is the same folder as {shown(self.output / other)} (a symlink): their "
                "outputs would replace each other; remove the link",
            )
        if self.clean:
            remove_stale_temporaries(folder)

    def _too_long(self, out: PurePath) -> str | None:
        names = [out.name + ".png"] + ([out.name + OVERLAY_SUFFIX] if self.overlay else [])
        for name in names:
            if len(os.fsencode(name)) > NAME_MAX:
                return (
                    f"output name {shown(name)} is longer than the file system allows "
                    f"({NAME_MAX} bytes): rename the input"
                )
        return None


def _file_key(path: Path) -> int | None:
    """(st_dev, st_ino) packed in one int: the file's identity, through any links."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev << 64 | st.st_ino


def check_plan(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    overlay: bool = False,
    streams: bool = False,
    tiled: bool = False,
) -> int:
    """Plan the whole run without writing; raise SegdeployError if it would harm a user file
    or cannot run at all.

    A full listing before the first write: the only way to refuse, with exit
    status 2 and nothing written, an output that would replace any input of the
    run (found later in the listing, or a hard link), a file segdeploy did not
    write (unless `overwrite`), or a folder at an output path. Also refused: a
    missing input or a glob that matches nothing, an OUT inside an input folder
    that holds other files, and inputs without a single image (unless `streams`:
    --stream URLs follow the inputs). Returns the number of entries (for the progress
    bar). Costs one more listing and a stat per file, and a read of each file already
    at an output path (its mark). A clip's outputs (OUT/<clip file name>/) are its own
    (segdeploy.runtime.clips), not checked here. `tiled` (--tile): each image's outputs
    are the PNG/JPEG or the TIFFs its header calls for (segdeploy.runtime.tiled_infer).
    """
    planner = Planner(output, overlay=overlay, tiff=tiled)
    counts: dict[str, Any] = {}
    existing: dict[int, Path] = {}  # outputs already on disk -> their path
    # A new output folder holds no outputs yet, so none can be an input or a user's file:
    # two stats an image saved (5% of a run on 64-px images).
    look = Path(output).exists()
    foreign: list[Path] = []  # the first file at an output path that segdeploy did not write
    n = images = n_foreign = 0
    for item in planner.items(inputs, counts):
        n += 1
        if isinstance(item, Failure):
            if item.given:
                raise SegdeployError(item.path, item.reason)
            images += is_input_name(item.path)  # an image that will fail (a name too long)
            continue
        images += 1
        if is_video_name(item.path) or not look:
            continue  # a clip writes a folder of its own (segdeploy.runtime.clips)
        for dest in _dests(planner.output, item, overlay, tiled):
            there = occupant(dest, rel_name(dest, planner.output))
            if there is None:
                continue
            if there == "folder":
                raise SegdeployError(
                    dest, "is a folder where this run writes a file: move it, or choose another -o"
                )
            key = _file_key(dest)
            if key is not None:
                existing.setdefault(key, dest)
            if there != "ours":
                n_foreign += 1
                foreign[:] = foreign or [dest]
    _refuse_replacing_inputs(existing, planner.inputs)
    if n_foreign and not overwrite:
        more = f" (and {n_foreign - 1} more)" if n_foreign > 1 else ""
        raise SegdeployError(
            foreign[0],
            f"holds a file segdeploy did not write (or one changed since){more}, which this "
            "run would replace: move it, choose another -o/--output, or pass --overwrite",
        )
    _check_summary(planner.out_real / SUMMARY_NAME, overwrite)
    if counts.get("excluded"):
        _check_out_inside_inputs(planner.output)
    _say_left_out(counts, images or streams, inputs)
    return n


def _dests(output: Path, item: Item, overlay: bool, tiled: bool = False) -> list[Path]:
    """The files a run writes for `item` under `output` (`tiled`: a --tile run's)."""
    label, over = label_path(output, item), overlay_path(output, item) if overlay else None
    if tiled:
        label, over = tiled_infer.planned_outputs(item.path, label, over)
    return [label, *([over] if over is not None else [])]


def _refuse_replacing_inputs(existing: dict[int, Path], inputs: set[int]) -> None:
    for key, dest in existing.items():
        if key in inputs:
            raise SegdeployError(
                dest,
                "is an input of this run and an output would replace it: choose another "
                "-o/--output, outside the inputs",
            )


def _check_summary(path: Path, overwrite: bool) -> None:
    """OUT/summary.json is replaced at the end of the run: it must be infer's own (or
    `overwrite`), and never a folder."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise SegdeployError(
            path, "is a folder where this run writes its summary: move it, or choose another -o"
        )
    if not (is_our_summary(path) or overwrite):
        raise SegdeployError(
            path,
            "is not a summary that segdeploy infer wrote, and this run would replace it: "
            "move it, choose another -o/--output, or pass --overwrite",
        )


def is_our_summary(path: Path) -> bool:
    """Whether `path` looks like a summary.json that infer wrote (this version's first key,
    or the keys earlier versions began with)."""
    try:
        with path.open("rb") as f:
            head = f.read(4096).decode("utf-8", "replace").splitlines()[:3]
    except OSError:
        return False
    if len(head) < 3 or head[0] != "{":
        return False
    if head[1] == f"  {json.dumps('written_by')}: {json.dumps(WRITTEN_BY)},":
        return True
    return head[1].startswith('  "model": ') and head[2].startswith('  "variant": ')


def _check_out_inside_inputs(output: Path) -> None:
    """OUT lies inside an input folder (the walk left it out): it may hold only what
    segdeploy wrote, or those files would silently go unsegmented, outputs among them."""
    found, count = foreign_files(
        output, skip=lambda p: p == output / SUMMARY_NAME and is_our_summary(p)
    )
    if count:
        more = f" and {count - 1} more" if count > 1 else ""
        raise SegdeployError(
            output,
            f"the output folder is inside an input folder and holds {shown(found)}{more}, "
            "which segdeploy did not write: they would be left unsegmented and outputs "
            "written among them; choose an -o/--output outside the inputs, or move them",
        )


def _say_left_out(counts: dict, images: int, inputs: Sequence[str | os.PathLike]) -> None:
    """Warn about entries the listing left out and inputs without images; refuse a run
    without a single image (exit 2, nothing written)."""
    left = [
        f"{counts[k]} {what}"
        for k, what in (("dangling", "dangling symlinks"), ("special", "special files"))
        if counts.get(k)
    ]
    if left:
        log.warning(
            "left out %s (FIFOs, devices and sockets are not images), e.g. %s",
            " and ".join(left),
            shown(counts["left_out"]),
        )
    ignored = (
        f"; {counts['ignored']} files are not images by their extension"
        if counts.get("ignored")
        else ""
    )
    if not images:
        where = os.fspath(inputs[0]) if len(inputs) == 1 else "INPUT"
        raise SegdeployError(where, f"no image files found{ignored}: nothing to segment")
    for text in counts.get("empty", ()):
        log.warning("%s: no image files found%s", shown(text), ignored)


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


def existing_record(output: Path, item: Item, overlay: bool, seg) -> dict[str, Any] | None:
    """--skip-existing: the record of an image whose outputs this model already wrote, or
    None if it must be redone.

    Kept only when each output carries segdeploy's mark for its path, unchanged since
    (segdeploy.runtime.provenance), made by this model (`seg.fingerprint`: the graph,
    config.json and preprocessor_config.json), at the input's current size. A map of
    another model, of another photo, or a file edited since is redone, never trusted.
    """
    label = label_path(output, item)
    dests = _dests(output, item, overlay)
    marks = [owned(dest, rel_name(dest, output)) for dest in dests]
    if any(m is None or m.model != seg.fingerprint for m in marks):
        return None
    if image_size(item.path) != marks[0].size:
        return None
    try:
        with Image.open(label) as im:
            labels = np.asarray(im)
    except (OSError, ValueError, SyntaxError):
        return None
    rec = {
        "input": str(item.path),
        "output": str(label.relative_to(output)),
        "size": [int(labels.shape[0]), int(labels.shape[1])],
        "classes": class_shares(labels, seg.id2label),
        "skipped": True,
    }
    if overlay:
        rec["overlay"] = str(overlay_path(output, item).relative_to(output))
    return rec


class _Records:
    """Per-image records, streamed to a hidden JSON-lines file, then into summary.json.

    The file is one of the tool's temporaries (locked while this run lives: see
    segdeploy.atomic), so a run sharing the folder never takes it for litter."""

    def __init__(self, output: Path):
        self._f, self.path = open_temporary(output / "summary.jsonl")
        self.done = self.skipped = self.failed = 0
        self.first_failure: str | None = None
        self.broken = False  # a write failed: later records are dropped

    def add(self, rec: dict[str, Any]) -> None:
        if "reason" in rec:
            self.failed += 1
            self.first_failure = self.first_failure or f"{shown(rec['input'])}: {rec['reason']}"
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


def summary_header(
    seg, provider: str, interrupted: bool, stopped: str | None = None, *, tiled: bool = False
) -> dict:
    """summary.json's header; every engine writes the same keys (`seg`: a Segmenter).
    `written_by` comes first: a later run recognises its summary by it (`is_our_summary`).
    `tiled`: the batch size is the windows per call (`Segmenter.window_batch_size`)."""
    header = {
        "written_by": WRITTEN_BY,
        "version": __version__,
        "model": str(seg.onnx_path),
        "model_fingerprint": seg.fingerprint,
        "variant": seg.variant,
        "provider": provider,
        "num_labels": seg.num_labels,
        "id2label": {str(k): v for k, v in seg.id2label.items()},
        "batch_size": seg.window_batch_size if tiled else seg.batch_size,
        "interrupted": interrupted,
    }
    if stopped is not None:
        header["stopped"] = stopped
    return header


def summary_totals(
    records: _Records,
    ignored: int,
    wall: float,
    outcome,
    frames: int = 0,
    counts: dict | None = None,
) -> dict[str, Any]:
    """summary.json's totals of a run that took `wall` seconds (`outcome`: the engine's
    pipeline.Outcome: model time, workers, stage times; `frames`: of clips and streams;
    `counts`: the listing's, for the entries it left out); every engine writes the same
    keys."""
    model_s = outcome.model_s
    counts = counts or {}
    return {
        "images": records.done,
        "skipped": records.skipped,
        "failed": records.failed,
        "ignored_non_images": ignored,
        "dangling_symlinks": counts.get("dangling", 0),
        "special_files": counts.get("special", 0),
        "seconds": round(wall, 3),
        "images_per_s": round(records.done / wall, 3) if wall > 0 else None,
        "model_seconds": round(model_s, 3),
        "model_images_per_s": round(records.done / model_s, 3) if model_s > 0 else None,
        "workers": outcome.workers,
        "stage_ms_per_image": outcome.stage_ms(),
        "bound_by": outcome.bound_by(),
        "frames": frames,
        "frames_per_s": round(frames / wall, 3) if wall > 0 else None,
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
    overwrite: bool = False,
    max_pixels: int | None = MAX_PIXELS,
    progress: bool | None = None,
    segmenter=None,
    video: VideoSettings | None = None,
    tiling=None,
) -> dict[str, Any]:
    """Segment every image in `inputs`; write labels, overlays and summary.json under `output`.
    Clips among the inputs and `video.streams`: frame by frame (segdeploy.runtime.clips).

    Returns the summary's header and totals (the per-image records are in the
    file). Per-image problems are logged and recorded, never raised; a missing
    model, provider, input or bad option, and a file at an output path that
    segdeploy did not write (unless `overwrite`), raise SegdeployError before
    anything is written. A run that segments nothing (every image failed) raises
    RunStopped after writing summary.json. Ctrl-C stops after the images in
    flight, writes summary.json with "interrupted": true and re-raises
    KeyboardInterrupt. `tiling` (a tiles.TileOptions with a tile): each image is
    segmented by sliding windows instead (segdeploy.runtime.tiled_infer), under
    the same rules; clips are then failures, not tiled.
    """
    from segdeploy.runtime.segmenter import Segmenter

    workers, threads, video = _check_run(inputs, workers, threads, video)
    tiled = tiling is not None and tiling.enabled
    if tiled:
        tiled_infer.check_run(video)
        workers = 0  # a tiled image's windows are its batch: in-process
    else:
        # A --stream or a clip named as an input needs PyAV: its install line comes before
        # the model loads and anything is written, and its import (0.06-0.1 s) is not the
        # run's. (A clip found in a folder gets the line when the run meets it.)
        named = [p for p in inputs if is_video_name(p) and os.path.isfile(p)]
        for where in (["--stream"] if video.streams else []) + named:
            import_av(where)
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
        # Worker processes need the cores ONNX Runtime would spin on, and so does tiling's
        # helper thread (cutting and blending windows beside the model): 2-core EPYC, 2048^2
        # tiled run 3.61 windows/s without spinning, 3.35 with; the model alone 4.65 / 4.74.
        spin=workers == 0 and not tiled,
        ov_cache=ov_cache,
    )
    plan = tiles.plan_for(seg, tiling) if tiled else None  # a bad --tile: refused before writing
    out = Path(output)
    # Refuses a run that would harm a user file or cannot run: nothing written.
    total = check_plan(
        inputs, out, overwrite=overwrite, overlay=overlay, streams=bool(video.streams),
        tiled=tiled,
    )  # fmt: skip
    prepare_output(out)
    remove_stale_temporaries(out)  # a killed run's .summary.tmp-<pid>-<random>.jsonl
    if progress is None:
        progress = sys.stderr.isatty()
    run = _Run(
        seg, out, overlay, skip_existing, video, total if progress else None, progress,
        tiling=plan, overwrite=overwrite,
    )  # fmt: skip
    outcome = run.execute(inputs, workers)
    _raise_if_stopped(outcome, run.records, out / SUMMARY_NAME, run.summary_error)
    return {**run.header, "totals": run.totals, "summary": str(out / SUMMARY_NAME)}


class _Run:
    """One local run after planning: the engine over the planned jobs (clips and streams
    frame by frame, segdeploy.runtime.clips), the records, and summary.json written
    whatever happens (also when the engine fails: then it says so)."""

    def __init__(
        self,
        seg,
        out: Path,
        overlay: bool,
        skip_existing: bool,
        video,
        total,
        progress,
        *,
        tiling: tiles.TilePlan | None = None,
        overwrite: bool = False,
    ):
        from tqdm import tqdm

        self.seg, self.out, self.overlay, self.skip_existing = seg, out, overlay, skip_existing
        self.tiling = tiling  # --tile: segdeploy.runtime.tiled_infer segments each image
        self.overwrite = overwrite  # (the tiled engine checks each output again as it writes)
        self.planner = Planner(out, clean=True, overlay=overlay, tiff=tiling is not None)
        self.cfg = pipeline.StageConfig.for_segmenter(seg, overlay=overlay, output=out)
        self.clips = Clips(out, seg, video, self.cfg, skip_existing=skip_existing)
        self.counts: dict[str, Any] = {"ignored": 0}
        self.records = _Records(out)
        self.bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
        self.header: dict[str, Any] = {}
        self.totals: dict[str, Any] = {}
        self.summary_error: str | None = None

    def record(self, rec: dict[str, Any]) -> None:
        """The engine's `record` callback: a clip's frames to the clip's outputs (routed in
        order), every other record into summary.json, a full disk stopping the run."""
        if "tag" in rec:  # a clip's frame, or its end: the clip's outputs take it
            rec = self.clips.route(rec)
            if rec is None:
                return
        if "reason" in rec:
            log.error("%s: %s", shown(rec["input"]), rec["reason"])
        if self.records.broken:
            return  # the records file cannot grow (disk full): the run is stopping
        try:
            self.records.add(rec)
        except OSError as err:
            self.records.broken = True
            fatal = pipeline.fatal_error(err, self.records.path)
            if fatal is None:
                raise
            raise pipeline.Stop(fatal) from None
        self.bar.update(1)

    def _engine(self, inputs, workers: int, signals) -> pipeline.Outcome:
        """The worker pipeline over the planned jobs, or with --tile the tiled engine (which
        finds an image's earlier outputs itself: they may be TIFF)."""
        if self.tiling is None:
            items = self.planner.items(inputs, self.counts)
            jobs = _jobs(items, self.out, self.overlay, self.skip_existing, self.seg, self.clips)
            return pipeline.run(
                jobs, self.seg, self.out, cfg=self.cfg, workers=workers,
                record=self.record, stop=signals,
            )  # fmt: skip
        items = tiled_infer.images_only(self.planner.items(inputs, self.counts), Failure)
        jobs = _jobs(items, self.out, self.overlay, False, self.seg, self.clips)
        return tiled_infer.run(
            jobs, self.seg, self.tiling, self.out, overlay=self.overlay,
            skip_existing=self.skip_existing, overwrite=self.overwrite,
            record=self.record, stop=signals,
        )  # fmt: skip

    def execute(self, inputs: Sequence[str | os.PathLike], workers: int) -> pipeline.Outcome:
        start = time.perf_counter()
        outcome = pipeline.Outcome(workers=workers)
        failure: str | None = None
        with pipeline.stop_signals() as signals:
            try:
                outcome = self._engine(inputs, workers, signals)
            except Exception as err:  # a bug or an OS failure: the summary says the run broke
                failure = (
                    str(err)
                    if isinstance(err, SegdeployError)
                    else f"unexpected {type(err).__name__}: {first_line(err)}"
                )
                raise
            finally:
                self.clips.close()
                self.bar.close()
                stopped = outcome.stopped
                if stopped is not None:
                    failure = f"{stopped.path}: {stopped.reason}"
                self.header = summary_header(
                    self.seg, self.seg.provider, outcome.interrupted, failure,
                    tiled=self.tiling is not None,
                )  # fmt: skip
                self.totals = summary_totals(
                    self.records, self.counts["ignored"], time.perf_counter() - start,
                    outcome, self.clips.frames, self.counts,
                )  # fmt: skip
                self.summary_error = _write_summary(
                    self.records, self.out / SUMMARY_NAME, self.header, self.totals
                )
        return outcome


def _check_run(
    inputs: Sequence[str | os.PathLike],
    workers: int | None,
    threads: int | None,
    video: VideoSettings | None = None,
) -> tuple[int, int, VideoSettings]:
    """Refuse a run without inputs or with a bad worker count or video option; (workers,
    threads, video) with the defaults (the cores of the process's affinity) filled in."""
    video = video or VideoSettings()
    video.check()
    if not inputs and not video.streams:
        raise SegdeployError("INPUT", "give at least one file, folder, glob or --stream")
    if isinstance(inputs, str | os.PathLike):
        raise SegdeployError("INPUT", "inputs must be a list of files, folders or globs")
    check_top_names(inputs)
    if workers is not None and workers < 0:
        raise SegdeployError("--workers", f"must be 0 or more, got {workers}")
    workers = pipeline.default_workers() if workers is None else workers
    threads = pipeline.default_threads() if threads is None else threads
    return workers, threads, video


def _jobs(
    items: Iterator[Item | Failure],
    out: Path,
    overlay: bool,
    skip_existing: bool,
    seg,
    clips: Clips,
) -> Iterator[pipeline.Job | dict[str, Any]]:
    """The planned items as the engine's work: a Job per image to segment (per frame of a
    clip), a record for a failure or (with --skip-existing) an image whose outputs this
    model already wrote."""
    for item in items:
        if isinstance(item, Failure):
            yield {"input": item.path, "reason": item.reason}
            continue
        if is_video_name(item.path):
            yield from clips.file_entries(item.path, item.out)
            continue
        if skip_existing:
            rec = existing_record(out, item, overlay, seg)
            if rec is not None:
                yield rec
                continue
        yield pipeline.Job(
            item.path, label_path(out, item), overlay_path(out, item) if overlay else None
        )
    yield from clips.stream_entries()  # --stream URLs, after the inputs


def _raise_if_stopped(outcome, records: _Records, summary: Path, summary_error: str | None) -> None:
    """After summary.json: a stopped run (disk full) exits 1 naming the path and what was
    done, and so does a run that segmented nothing (every image failed); Ctrl-C or SIGTERM
    is re-raised as KeyboardInterrupt."""
    done = records.done
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
    if not done and not records.skipped and records.failed:
        raise RunStopped(
            summary,
            f"no image was segmented: all {records.failed} failed, e.g. {records.first_failure}",
        )


class RunStopped(SegdeployError):
    """The run could not go on (disk full, read-only output), or segmented nothing: exit
    status 1, not 2, because it had started and its complete outputs are kept."""

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
