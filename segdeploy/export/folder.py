"""What `segdeploy export` may replace and what it keeps: the files of an export folder.

An export replaces its output folder as a whole (`atomic_dir`), so before any work it
must know that the folder holds nothing but what an earlier export wrote: the names
below (graphs, their external data, validation reports, the quantization report,
the copied config.json and preprocessor_config.json, bench's OpenVINO cache) and
the tool's own temporaries. Anything else (a user's notes, a sub-folder, a
symbolic link, checkpoints) makes the folder someone else's, and the export is
refused naming it. Names are the only mark an export leaves, so an export made by
Optimum (model.onnx, config.json, preprocessor_config.json) counts as one: its
files are of the very kinds export writes.

A new export rebuilds only the graphs it is asked for. The other graphs of the
earlier export, with their reports, are kept when they were made from the same
fp32 graph (same content hash) and dropped, by name, when they were not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from segdeploy.atomic import TMP_MARKER
from segdeploy.errors import SegdeployError
from segdeploy.folders import (
    COPIED_FILES,
    ONNX_SUBDIR,
    OPENVINO_QUANTIZATION_REPORT,
    QUANTIZATION_REPORT,
    VARIANT_FILES,
    validation_report_name,
    variant_of,
)

#: Bench's OpenVINO cache inside an export (segdeploy.bench.openvino.cache_dir).
OPENVINO_CACHE = "openvino"
FP32 = VARIANT_FILES["fp32"]
#: The export option that makes each variant's graph, for "add it again" messages.
VARIANT_OPTIONS = {
    "fp16": "--fp16",
    "optimized": "--optimize",
    "int8": "--quantize int8",
    "fused": "--fuse-argmax",
    "fp16_fused": "--fp16 --fuse-argmax",
    "openvino_int8": "--quantize int8 --int8-engine openvino",
}


def _graph_files() -> set[str]:
    graphs = set(VARIANT_FILES.values())
    external = {g + "_data" for g in graphs} | {g + ".data" for g in graphs}
    # An OpenVINO IR graph (.xml) keeps its weights beside it, in a .bin of the same stem.
    weights = {str(Path(g).with_suffix(".bin")) for g in graphs if g.endswith(".xml")}
    return graphs | external | weights


def export_file_names() -> set[str]:
    """Every file name an export (or bench's cache, inside it) writes in its folder."""
    reports = {validation_report_name(g) for g in VARIANT_FILES.values()}
    quantization = {QUANTIZATION_REPORT, OPENVINO_QUANTIZATION_REPORT}
    return _graph_files() | reports | set(COPIED_FILES) | quantization


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` an export did not write (sorted names, folders with a slash)."""
    known = export_file_names()
    foreign = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") and TMP_MARKER in entry.name:
            continue  # the tool's own temporaries (a killed run's litter)
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir():
            if entry.name != OPENVINO_CACHE:
                foreign.append(entry.name + "/")
        elif entry.name not in known:
            foreign.append(entry.name)
    return foreign


def is_export_folder(folder: Path) -> bool:
    """A folder that holds an export's fp32 graph and nothing an export did not write."""
    return (folder / FP32).is_file() and not foreign_entries(folder)


def check_replaceable(output: Path, model_dir: Path) -> None:
    """SegdeployError unless `output` is a folder export may build (new, empty, or an
    earlier export); nothing is written."""
    if output.name in ("", ".", ".."):
        raise SegdeployError("--output", f"{output}: name the folder to write, e.g. onnx")
    if output.is_symlink():
        raise SegdeployError(
            output, "is a symbolic link; export replaces its folder: give the folder itself"
        )
    here, model_dir, target = Path.cwd().resolve(), model_dir.resolve(), output.resolve()
    if target == here or target in here.parents:
        raise SegdeployError(
            output, "is the folder you are in (or holds it); give --output a folder of its own"
        )
    if target == model_dir or target in model_dir.parents:
        raise SegdeployError("--output", f"{output} would replace the model folder {model_dir}")
    if model_dir in target.parents and target != model_dir / ONNX_SUBDIR:
        raise SegdeployError(
            output,
            f"is inside the model folder {model_dir}, whose files export must not replace; "
            f"use {model_dir / ONNX_SUBDIR} (the default) or a folder outside it",
        )
    if target.exists() and not target.is_dir():
        raise SegdeployError("--output", f"{output} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        foreign = foreign_entries(target)
        if foreign or not (target / FP32).is_file():
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise SegdeployError(
                output,
                f"holds files segdeploy export did not write ({shown or 'no ' + FP32}); "
                "export replaces its folder as a whole, so give a new or empty folder, "
                "or an earlier export",
            )


def carry_over(old: Path, new: Path) -> tuple[list[str], list[str]]:
    """Bring into `new` (the export being built) what the earlier export `old` holds and
    this one did not write, if both fp32 graphs are the same; else leave it out.

    Returns (kept, dropped): names. A kept file is hard-linked where it can be (the
    old folder is deleted once the new one is in place), else copied.
    """
    from segdeploy.runtime.providers import model_digest

    if not (old / FP32).is_file():
        return [], []
    foreign = foreign_entries(old)
    if foreign:  # written since the export was checked: still not ours to delete
        raise SegdeployError(old, f"holds files segdeploy export did not write ({foreign[0]})")
    left = sorted(
        e.name
        for e in os.scandir(old)
        if not (e.name.startswith(".") and TMP_MARKER in e.name) and not (new / e.name).exists()
    )
    if not left:
        return [], []
    if model_digest(old / FP32) != model_digest(new / FP32):
        return [], left
    for name in left:
        if (old / name).is_dir():
            shutil.copytree(old / name, new / name, copy_function=_link_or_copy)
        else:
            _link_or_copy(old / name, new / name)
    return left, []


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def readd_options(dropped: list[str]) -> str:
    """The export options that would make the dropped graphs again ("--fp16 --optimize")."""
    variants = [variant_of(name) for name in dropped]
    options = [VARIANT_OPTIONS[v] for v in variants if v in VARIANT_OPTIONS]
    words = dict.fromkeys(" ".join(options).split(" ")) if options else {}
    return " ".join(w for w in words if w)
