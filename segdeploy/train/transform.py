"""The training and evaluation batch transform: checked labels, augmentation, the processor."""

from __future__ import annotations

import numpy as np

from segdeploy.data import label_array
from segdeploy.train.augment import AugmentParams, augment_pair, labels_to_image, resize_pair


def make_transform(
    processor,
    image_size: int,
    *,
    reduce_labels: bool,
    ignore_index: int,
    num_labels: int,
    augment: AugmentParams | None,
):
    """A `datasets` batch transform: rows -> {"pixel_values", "labels"} at image_size.

    Applied lazily (with_transform), so every epoch draws new augmentations.
    Without `augment` (evaluation) the processor resizes the image exactly as
    deployment will, and the mask follows with nearest-neighbour. A processor that
    center-crops (MobileNetV2, MobileViT) would score a crop against the whole mask,
    so evaluation squashes the photo to the square first, as training does.
    """
    crops = bool(getattr(processor, "do_center_crop", False))

    def transform(batch: dict[str, list]) -> dict[str, list]:
        rng = _batch_rng() if augment is not None else None
        images, masks = [], []
        for image, annotation, name in zip(
            batch["image"], batch["annotation"], batch["name"], strict=True
        ):
            labels = label_array(
                annotation,
                reduce_labels=reduce_labels,
                ignore_index=ignore_index,
                num_labels=num_labels,
                where=name,
            )
            image = image.convert("RGB")
            mask = labels_to_image(labels)
            if rng is not None:
                image, mask = augment_pair(image, mask, image_size, rng, augment)
            else:
                square, mask = resize_pair(image, mask, image_size)
                image = square if crops else image
            images.append(image)
            masks.append(np.asarray(mask, dtype=np.int64))
        pixels = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": list(pixels), "labels": masks}

    return transform


def _batch_rng() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG.

    torch's RNG is what the Trainer seeds, restores on --resume, and re-seeds
    per DataLoader worker and epoch; drawing from it keeps augmentation
    reproducible and different in every worker (torchvision does the same).
    """
    import torch

    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
