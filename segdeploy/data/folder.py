"""Local folders in the ADE20K layout: images/<split>/*.jpg|jpeg|png + annotations/<split>/*.png.

Images and masks pair by file stem. Everything that can be checked without
decoding pixels is checked here, at load time: the folders exist, every image
has a mask and every mask an image, each file's header is readable, and each
mask has its image's size. Label values need the decoded mask; `label_array`
and `check_dataset` report those by file.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from segdeploy.data.splits import resolve_split, split_names
from segdeploy.errors import SegdeployError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIXES = (".png",)
# EXIF orientations that rotate by 90 degrees; datasets' Image feature applies
# EXIF orientation on decode, so the size it yields has width and height swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def is_ade_folder(root: Path) -> bool:
    return (root / "images").is_dir() or (root / "annotations").is_dir()


def folder_split_names(root: Path) -> list[str]:
    images = root / "images"
    return sorted(p.name for p in images.iterdir() if p.is_dir()) if images.is_dir() else []


def folder_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of one split, sorted by stem; raises on any unpaired file."""
    img_dir, mask_dir = root / "images" / split, root / "annotations" / split
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise SegdeployError(
                d, "folder not found (expected images/<split>/ and annotations/<split>/)"
            )
    images = _by_stem(img_dir, IMAGE_SUFFIXES)
    masks = _by_stem(mask_dir, MASK_SUFFIXES)
    if not images:
        raise SegdeployError(img_dir, f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    if not masks:
        raise SegdeployError(mask_dir, "no masks (.png) in this folder")
    lonely_images = sorted(set(images) - set(masks))
    if lonely_images:
        first = images[lonely_images[0]]
        more = f" (and {len(lonely_images) - 1} more images)" if len(lonely_images) > 1 else ""
        raise SegdeployError(first, f"image has no mask {mask_dir / (first.stem + '.png')}{more}")
    lonely_masks = sorted(set(masks) - set(images))
    if lonely_masks:
        first = masks[lonely_masks[0]]
        more = f" (and {len(lonely_masks) - 1} more masks)" if len(lonely_masks) > 1 else ""
        raise SegdeployError(
            first, f"mask has no image {img_dir / first.stem}.jpg|.jpeg|.png{more}"
        )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.name.startswith(".") or p.suffix.lower() not in suffixes or not p.is_file():
            continue
        if p.stem in found:
            raise SegdeployError(p, f"two files share the stem {p.stem!r}: {found[p.stem].name}")
        found[p.stem] = p
    return found


def decoded_size(path: Path) -> tuple[int, int]:
    """(width, height) as datasets will decode the file (EXIF orientation applied).

    Reads only the header. Raises SegdeployError naming the file if it is unreadable.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            # PNG keeps EXIF anywhere in the file and getexif() would decode it all;
            # cameras write JPEG, which is where orientation tags live.
            rotated = (im.format == "JPEG" or "exif" in im.info) and (
                im.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS
            )
            if rotated:
                width, height = height, width
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise SegdeployError(path, f"cannot read image: {err}") from None
    return width, height


def check_pair(image: Path, mask: Path) -> None:
    """Header-level checks of one pair: both readable, same size."""
    isize, msize = decoded_size(image), decoded_size(mask)
    if isize != msize:
        raise SegdeployError(
            mask,
            f"mask is {msize[0]}x{msize[1]} but its image {image.name} is {isize[0]}x{isize[1]}",
        )


def folder_split(root: Path, expr: str, *, option: str = "--split"):
    """Rows of an ADE20K-layout folder selected by `expr`, images and masks checked at header level."""
    import datasets

    names = split_names(expr, option=option)
    available = folder_split_names(root)
    missing = [n for n in names if n not in available]
    if missing:
        raise SegdeployError(
            root,
            f"has no split {missing[0]!r} (images/{missing[0]}/); available: "
            f"{', '.join(available) or 'none'}",
        )
    pairs = {n: folder_pairs(root, n) for n in dict.fromkeys(names)}
    ranges = resolve_split(
        expr, {n: len(p) for n, p in pairs.items()}, where=str(root), option=option
    )
    selected = [pair for split, start, stop in ranges for pair in pairs[split][start:stop]]
    for image, mask in selected:
        check_pair(image, mask)
    features = datasets.Features(
        image=datasets.Image(mode="RGB"), annotation=datasets.Image(), name=datasets.Value("string")
    )
    return datasets.Dataset.from_dict(
        {
            "image": [str(i) for i, _ in selected],
            "annotation": [str(m) for _, m in selected],
            # The mask path: label errors, the ones found after loading, are about the mask.
            "name": [str(m) for _, m in selected],
        },
        features=features,
    )
