"""Bring Hub and save_to_disk datasets to segdeploy's columns: image, annotation, name."""

from __future__ import annotations

from segdeploy.errors import SegdeployError

# Column names used by segmentation datasets on the Hub: scene_parse_150 has
# image/annotation, segments/sidewalk-semantic pixel_values/label, others mask.
IMAGE_COLUMNS = ("image", "pixel_values", "img")
MASK_COLUMNS = ("annotation", "label", "mask", "semantic_map", "segmentation", "labels")


def standard_columns(ds, *, where: str, row_prefix: str, first_row: int = 0):
    """`ds` with only image (PIL RGB), annotation (PIL) and name (row id) columns."""
    import datasets

    image_col = _pick(ds, IMAGE_COLUMNS, "image", where)
    mask_col = _pick(ds, MASK_COLUMNS, "annotation", where)
    for col in (image_col, mask_col):
        if not isinstance(ds.features[col], datasets.Image):
            raise SegdeployError(
                where,
                f"column {col!r} is {type(ds.features[col]).__name__}, expected an Image feature",
            )
    ds = ds.select_columns([image_col, mask_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if mask_col != "annotation":
        ds = ds.rename_column(mask_col, "annotation")
    ds = ds.cast_column("image", datasets.Image(mode="RGB"))
    ds = ds.cast_column("annotation", datasets.Image())
    return ds.add_column("name", [f"{row_prefix}{first_row + i}" for i in range(len(ds))])


def _pick(ds, candidates: tuple[str, ...], role: str, where: str) -> str:
    for name in candidates:
        if name in ds.column_names:
            return name
    raise SegdeployError(
        where,
        f"no {role} column (looked for {', '.join(candidates)}; found {', '.join(ds.column_names)})",
    )
