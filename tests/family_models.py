"""Tiny random models of every family for the tests, re-initialised so their logits mean something.

transformers' default init draws conv/linear weights from N(0, 0.02) and, for MobileViT,
the BatchNorm scales too: a tiny MobileViT then outputs logits of ~1e-8 (1e-45 in some
configs), and "ONNX agrees with torch" or "masks agree" would hold for any graph. He-normal
weights and identity norms give logits of order 1-100.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (model_type, scratch size): every family's tiny config, UPerNet with both backbones.
CASES = [
    ("segformer", "tiny"),
    ("dpt", "tiny"),
    ("beit", "tiny"),
    ("data2vec-vision", "tiny"),
    ("mobilenet_v2", "tiny"),
    ("mobilevit", "tiny"),
    ("mobilevitv2", "tiny"),
    ("upernet", "tiny"),
    ("upernet", "tiny-swin"),
]
CASE_IDS = [f"{t}-{s}" for t, s in CASES]
ID2LABEL = {0: "road", 1: "sky", 2: "tree", 3: "car", 4: "person"}
SIDE = 64  # every tiny model's input size


def reinit(model, seed: int = 0):
    """He-normal conv/linear weights (seeded), identity norm layers; returns the model in eval."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ConvTranspose2d):
            torch.nn.init.kaiming_normal_(module.weight, generator=gen)
        elif isinstance(module, norms) and module.weight is not None:
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model.eval()


def build_model(model_type: str, size: str, seed: int = 0):
    from transformers import AutoModelForSemanticSegmentation

    from segdeploy.families import scratch_config

    config = scratch_config(model_type, size, ID2LABEL)
    return reinit(AutoModelForSemanticSegmentation.from_config(config), seed)


def save_model_folder(out: Path, model_type: str, size: str) -> Path:
    """A Hugging Face model folder: config.json, weights, preprocessor_config.json."""
    from segdeploy.families import family_of, processor_class, square_processor_kwargs

    family = family_of(model_type)
    build_model(model_type, size).save_pretrained(out)
    processor_class(family)(**square_processor_kwargs(family, SIDE)).save_pretrained(out)
    return out


#: (name, (height, width), mode): landscape, portrait, square, very wide, smaller than
#: the model's input (crops pad), and the modes infer converts (gray, RGBA, palette).
PHOTOS = [
    ("landscape.jpg", (150, 200), "RGB"),
    ("portrait.png", (97, 61), "RGB"),
    ("square.png", (64, 64), "RGB"),
    ("wide.png", (33, 120), "L"),
    ("small.png", (40, 50), "RGBA"),
    ("palette.png", (81, 70), "P"),
]


def write_photos(root: Path) -> Path:
    """PHOTOS as files in `root`: synthetic scenes (shapes on gradients) of each size and mode."""
    from PIL import Image

    from segdeploy.data.synthetic import synthetic_sample

    for i, (name, size, mode) in enumerate(PHOTOS):
        image = Image.fromarray(synthetic_sample(i, size=size)[0])
        image = image.convert(mode) if mode != "P" else image.quantize(32)
        image.save(root / name)
    return root


def torch_mask(model_dir: Path, image) -> np.ndarray:
    """The guide's path: slow processor, forward, bilinear upsample to the photo, argmax."""
    import torch
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(model_dir, use_fast=False)
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(model_dir).eval()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    up = torch.nn.functional.interpolate(
        logits, size=(image.height, image.width), mode="bilinear", align_corners=False
    )
    return up.argmax(1)[0].numpy()


def label_map(out: Path, photo: Path) -> np.ndarray:
    """The label PNG `segdeploy infer -o out` wrote for `photo`."""
    from PIL import Image

    with Image.open(out / photo.parent.name / photo.with_suffix(".png").name) as im:
        return np.asarray(im)
