"""Folders written by `datasets.save_to_disk` (a DatasetDict or a single Dataset)."""

from __future__ import annotations

from pathlib import Path

from segdeploy.data.columns import standard_columns
from segdeploy.data.splits import resolve_split
from segdeploy.errors import SegdeployError


def is_saved_dataset(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def load_saved(root: Path):
    """The DatasetDict saved in `root`; a single saved Dataset becomes its only split."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(root))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise SegdeployError(root, f"cannot load save_to_disk folder: {err}") from None
    if isinstance(saved, datasets.Dataset):
        # A lone Dataset remembers the split it was cut from, if any.
        saved = datasets.DatasetDict({str(saved.split) if saved.split else "train": saved})
    return saved


def saved_split(saved, root: Path, expr: str, *, option: str = "--split"):
    """Rows of a loaded DatasetDict selected by `expr`, with standard columns."""
    import datasets

    ranges = resolve_split(
        expr, {k: len(v) for k, v in saved.items()}, where=str(root), option=option
    )
    parts = [
        standard_columns(
            saved[split].select(range(start, stop)),
            where=str(root),
            row_prefix=f"{root}/{split}/row ",
            first_row=start,
        )
        for split, start, stop in ranges
    ]
    if len(parts) == 1:
        return parts[0]
    return datasets.concatenate_datasets(parts)
