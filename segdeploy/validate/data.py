"""Which data a graph is validated on: the options given, else what `segdeploy train` recorded."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from segdeploy.errors import SegdeployError
from segdeploy.folders import ModelFolder
from segdeploy.validate.settings import ValidationSettings


def recorded_dataset(model: ModelFolder):
    """The DatasetSpec that `segdeploy train` recorded in train_args.json, or None."""
    from segdeploy.data import DatasetSpec

    recorded = model.recorded_dataset
    if not recorded:
        return None
    try:
        return DatasetSpec.from_dict(recorded)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise SegdeployError(
            model.train_args_path, f"the recorded dataset is not a DatasetSpec: {err}"
        ) from err


def resolve_dataset(
    model_dir,
    *,
    dataset: str | None = None,
    split: str | None = None,
    reduce_labels: bool | None = None,
    ignore_index: int | None = None,
    id2label_file: str | None = None,
):
    """The data to validate on: the options given, else what train recorded, else None.

    `split` is the split to validate on as a whole (e.g. "val", "validation[:50]").
    `dataset` without `split` validates on the held-out part that `segdeploy train`
    would evaluate on with the same dataset. The label options override the
    recorded ones.
    """
    from segdeploy.data import DatasetSpec

    model = model_dir if isinstance(model_dir, ModelFolder) else _folder(model_dir)
    recorded = recorded_dataset(model)
    if dataset is None and recorded is None:
        if split is not None or reduce_labels is not None or ignore_index is not None:
            raise SegdeployError(
                "--split", f"no dataset recorded in {model.train_args_path}: pass --dataset too"
            )
        return None
    if dataset is not None and (recorded is None or recorded.name != dataset):
        spec = DatasetSpec(dataset)
    else:
        spec = recorded
    changes: dict[str, Any] = {}
    if split is not None:
        changes.update(split=split, eval_split=split)
    if reduce_labels is not None:
        changes["reduce_labels"] = reduce_labels
    if ignore_index is not None:
        changes["ignore_index"] = ignore_index
    if id2label_file is not None:
        changes["id2label_file"] = id2label_file
    return replace(spec, **changes) if changes else spec


def _folder(path) -> ModelFolder:
    # Only train_args.json is read here: config.json is checked where the model is opened.
    return ModelFolder(path=Path(path), config={})


def load_validation_data(spec, *, num_labels: int):
    """Load the evaluation split of `spec`; SegdeployError if its classes do not fit the model."""
    from segdeploy.data import load_splits

    data = load_splits(spec, need_train=False)
    if len(data.id2label) != num_labels:
        raise SegdeployError(
            "--dataset",
            f"{spec.name} has {len(data.id2label)} classes but the model has {num_labels}",
        )
    if len(data.eval) == 0:
        raise SegdeployError("--split", f"the evaluation split of {spec.name} is empty")
    return data


def load_data_for(model: ModelFolder, settings: ValidationSettings, warn: Callable[[str], None]):
    """The validation data the settings name (or train recorded); None -> random inputs,
    which `warn` is told about."""
    spec = resolve_dataset(
        model,
        dataset=settings.dataset,
        split=settings.split,
        reduce_labels=settings.reduce_labels,
        ignore_index=settings.ignore_index,
        id2label_file=settings.id2label_file,
    )
    if spec is None:
        warn(
            f"no dataset given and none recorded in {model.train_args_path}: "
            "checking logits on random inputs only, which proves less (pass --dataset)"
        )
        return None
    return load_validation_data(spec, num_labels=model.num_labels)


def labelled_batches(data, batch_size: int, num_labels: int) -> Iterator[tuple[list, list]]:
    """(RGB images, label maps) of data.eval; a bad file raises SegdeployError naming it."""
    from segdeploy.data import iter_examples

    examples = iter_examples(data, "eval", num_labels)
    while batch := list(itertools.islice(examples, batch_size)):
        yield [image for image, _, _ in batch], [labels for _, labels, _ in batch]


def random_batches(n: int, batch_size: int, size: tuple[int, int]) -> Iterator[tuple[list, None]]:
    images = random_images(n, size)
    for start in range(0, n, batch_size):
        yield images[start : start + batch_size], None


def random_images(n: int, size: tuple[int, int], seed: int = 0) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8), mode="RGB")
        for _ in range(n)
    ]
