"""The images (and reference labels) a benchmark runs on, as a folder of files.

Every backend is measured from files to label maps, so a dataset split is first
laid out as a folder: rows that come from files are linked (never copied),
rows that live only in memory (the synthetic set, Hub datasets) are written as
PNG. Reference labels go to a parallel folder as label PNGs, already reduced
and checked by `segdeploy.data.label_array`, with the dataset's ignore index.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image

from segdeploy.errors import SegdeployError


@dataclass
class BenchInputs:
    images: Path  # the folder every backend segments
    labels: Path | None  # label PNGs mirroring `images`, or None (no accuracy figures)
    ignore_index: int = 255
    source: dict[str, Any] = field(default_factory=dict)  # what they are, for the report
    #: Label 0 is "other" (ignored), v is class v-1 (ADE20K style): raw label files only;
    #: a dataset's labels are laid out already reduced.
    reduce_labels: bool = False


def relative_file(folder: Path, item_out: PurePath, suffix: str) -> Path:
    """`folder`/<the image's relative name><suffix>, from its `segdeploy infer` output name
    (top folder dropped). The suffix is appended, not swapped: the output name of
    frame.000.jpg is frame.000, whose label is frame.000.png, not frame.png."""
    rel = folder.joinpath(*item_out.parts[1:])
    return rel.with_name(rel.name + suffix)


def reference_label_path(labels: Path, item_out: PurePath) -> Path:
    """Label file of an image, from its `segdeploy infer` output name (top folder dropped)."""
    return relative_file(labels, item_out, ".png")


def read_reference(
    path: Path, *, num_labels: int, ignore_index: int, reduce_labels: bool = False
) -> np.ndarray:
    from segdeploy.data import label_array

    if not path.is_file():
        raise SegdeployError(path, "no reference label for this image (--labels)")
    try:
        with Image.open(path) as im:
            annotation = im.copy()
    except (OSError, ValueError, SyntaxError) as err:
        raise SegdeployError(path, f"unreadable label image: {err}") from None
    return label_array(
        annotation,
        reduce_labels=reduce_labels,
        ignore_index=ignore_index,
        num_labels=num_labels,
        where=str(path),
    )


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except OSError:  # no symlinks here (some Windows setups): copy instead
        shutil.copy2(src, dst)


def from_folders(
    images: str | os.PathLike,
    labels: str | os.PathLike | None,
    work: Path,
    *,
    ignore_index: int = 255,
    reduce_labels: bool = False,
    max_images: int | None = None,
) -> BenchInputs:
    """A folder of images (and optionally of label PNGs with the same relative names)."""
    from segdeploy.bench.worker import list_items

    images = Path(images)
    if not images.is_dir():
        raise SegdeployError(images, "--images must be a folder of images")
    if labels is not None and not Path(labels).is_dir():
        raise SegdeployError(labels, "--labels must be a folder of label PNGs")
    items = list_items(images)
    if not items:
        raise SegdeployError(images, "no images in this folder")
    if labels is not None:
        # Found now, not after every backend has run: each image needs its reference
        # (its values and size are checked with the decoded images, see screen_images).
        for item in items[:max_images]:
            ref = reference_label_path(Path(labels), item.out)
            if not ref.is_file():
                raise SegdeployError(ref, f"no reference label for {item.path} (--labels)")
    source = {"kind": "folder", "folder": str(images), "labels_folder": labels and str(labels)}
    if max_images is not None and max_images < len(items):
        # A subset must still be one folder, as the user would pass it to `segdeploy infer`.
        subset = work / "images"
        for item in items[:max_images]:
            dst = relative_file(subset, item.out, item.path.suffix)
            dst.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(item.path, dst)
        source["subset"] = max_images
        images = subset
    return BenchInputs(
        images, Path(labels) if labels else None, ignore_index, source, reduce_labels
    )


def from_dataset(spec, work: Path, *, num_labels: int, max_images: int | None = None):
    """The evaluation split of a DatasetSpec as images/ and labels/ folders under `work`."""
    from segdeploy.runtime.infer import save_labels
    from segdeploy.runtime.upsample import label_dtype
    from segdeploy.validate import load_validation_data

    data = load_validation_data(spec, num_labels=num_labels)
    rows = data.eval
    if max_images is not None:
        rows = rows.select(range(min(max_images, len(rows))))
    images, labels = work / "images", work / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    dtype = label_dtype(max(num_labels, data.spec.ignore_index + 1))
    # Undecoded images give their file path where there is one (the "name" column
    # may name the mask instead); only images without a file are decoded and written.
    import datasets

    undecoded = rows.cast_column("image", datasets.Image(decode=False))
    used: set[str] = set()
    for i, row in enumerate(undecoded):
        value, name = row["image"], row["name"]
        path = Path(value["path"]) if value.get("path") else None
        from_file = path is not None and path.is_file() and value.get("bytes") is None
        stem = path.stem if from_file else f"{i:05d}"
        if stem in used:
            stem = f"{i:05d}_{stem}"
        used.add(stem)
        if from_file:
            with Image.open(path) as im:
                size = im.size
            link_or_copy(path, images / f"{stem}{path.suffix}")
        else:
            image = datasets.Image(mode="RGB").decode_example(value)
            size = image.size
            image.save(images / f"{stem}.png")
        ref = _reference(row["annotation"], data.spec, num_labels, name)
        if ref.shape != size[::-1]:
            raise SegdeployError(
                name, f"mask is {ref.shape[1]}x{ref.shape[0]} but its image is {size[0]}x{size[1]}"
            )
        save_labels(labels / f"{stem}.png", ref.astype(dtype))
    source = {
        "kind": "dataset",
        "dataset": data.spec.to_dict(),
        "split": data.spec.eval_split,
        "rows": len(rows),
    }
    return BenchInputs(images, labels, data.spec.ignore_index, source)


def _reference(annotation, spec, num_labels: int, where: str) -> np.ndarray:
    from segdeploy.data import label_array

    return label_array(
        annotation,
        reduce_labels=bool(spec.reduce_labels),
        ignore_index=spec.ignore_index,
        num_labels=num_labels,
        where=where,
    )


def inputs_factory(
    model_dir: Path,
    *,
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    dataset: str | None = None,
    split: str | None = None,
    reduce_labels: bool | None = None,
    ignore_index: int | None = None,
    max_images: int | None = None,
):
    """Check the input options now; return `factory(work, num_labels) -> BenchInputs` for later.

    --images (with optional --labels) names a folder; otherwise the evaluation split
    of --dataset, or of the dataset `segdeploy train` recorded in the model folder.
    Label files are read as that recorded dataset's were (its ignore index and label
    reduction) unless --ignore-index or --reduce-labels say otherwise.
    """
    if max_images is not None and max_images < 1:
        raise SegdeployError("--max-images", f"must be at least 1, got {max_images}")
    if images is not None:
        check_folder_options(images, labels, dataset, split, reduce_labels)
        recorded = recorded_label_settings(model_dir)
        ignore = recorded["ignore_index"] if ignore_index is None else ignore_index
        reduce = recorded["reduce_labels"] if reduce_labels is None else reduce_labels

        def from_images(work: Path, num_labels: int) -> BenchInputs:
            return from_folders(
                images, labels, work, ignore_index=ignore, reduce_labels=reduce,
                max_images=max_images,
            )  # fmt: skip

        return from_images
    if labels is not None:
        raise SegdeployError("--labels", "goes with --images (a dataset brings its own labels)")
    from segdeploy.validate import resolve_dataset

    spec = resolve_dataset(
        model_dir,
        dataset=dataset,
        split=split,
        reduce_labels=reduce_labels,
        ignore_index=ignore_index,
    )
    if spec is None:
        raise SegdeployError(
            "--images",
            f"nothing to benchmark on: give --images DIR or --dataset NAME ({model_dir} records "
            "no training dataset in train_args.json)",
        )

    def from_spec(work: Path, num_labels: int) -> BenchInputs:
        return from_dataset(spec, work, num_labels=num_labels, max_images=max_images)

    return from_spec


def check_folder_options(images, labels, dataset, split, reduce_labels) -> None:
    """--images takes a folder whole: refuse the dataset options, each by its own name."""
    if dataset is not None:
        raise SegdeployError("--dataset", "give either --images (a folder) or --dataset, not both")
    if split is not None:
        raise SegdeployError(
            "--split", "names a split of --dataset; --images takes its folder whole"
        )
    if reduce_labels is not None and labels is None:
        option = "--reduce-labels" if reduce_labels else "--no-reduce-labels"
        raise SegdeployError(option, "says how to read label files: it goes with --labels")
    if not Path(images).is_dir():
        raise SegdeployError(images, "--images must be a folder of images")
    if labels is not None and not Path(labels).is_dir():
        raise SegdeployError(labels, "--labels must be a folder of label PNGs")


def recorded_label_settings(model_dir: Path) -> dict[str, Any]:
    """The ignore index and label reduction `segdeploy train` recorded for the model's
    dataset (label files of that dataset are read so), else 255 and no reduction."""
    from segdeploy.data import DatasetSpec
    from segdeploy.folders import TRAIN_ARGS_FILE, read_json

    args = read_json(Path(model_dir) / TRAIN_ARGS_FILE)  # None: not trained by segdeploy
    recorded = args.get("dataset") if isinstance(args, dict) else None
    if not isinstance(recorded, dict):
        return {"ignore_index": 255, "reduce_labels": False}
    spec = DatasetSpec.from_dict(recorded)
    return {"ignore_index": spec.ignore_index, "reduce_labels": bool(spec.reduce_labels)}
